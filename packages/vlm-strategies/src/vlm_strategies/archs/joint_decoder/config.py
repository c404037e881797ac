"""Torch-free config of the ``joint_decoder`` arch."""

from __future__ import annotations

from typing import ClassVar, Literal

from vlm_config import ArchConfig


class JointDecoderConfig(ArchConfig):
    """Adapter output prepended to the text embeddings; image positions trimmed before
    the LM head.

    Fields:
        prefix_bidirectional: the image prefix attends to itself in both directions
            (prefix-LM, as PaliGemma); text stays causal.
    """

    arch: Literal["joint_decoder"] = "joint_decoder"
    prefix_bidirectional: bool = False
    implementation: ClassVar[str] = "vlm_strategies.archs.joint_decoder.impl:JointDecoder"
