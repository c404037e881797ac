"""Warm-start a MoT model from a dense (text-only or ``joint_decoder``) checkpoint.

Every modality copy of a layer receives the dense block's weights, both final norms
the dense final norm, and embedding / LM head are copied as they are. A MoT model
warm-started this way computes exactly the dense model (same logits) until training
moves the copies apart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from vlm_strategies.unwrap import unwrap_transformer

__all__ = ["dense_name_for", "warm_start_from_dense"]

_LAYER = re.compile(r"^trunk\.layers\.(\d+)\.(?:image|text)\.(.+)$")
_NORM = re.compile(r"^trunk\.norm\.(?:image|text)\.(.+)$")
_PREFIX = "transformer."


def dense_name_for(name: str) -> str:
    """The dense ``Transformer`` state-dict key that feeds MoT key ``name``
    (``trunk.layers.3.image.attn.qkv_proj.weight -> trunk.layers.3.attn.qkv_proj.weight``,
    ``trunk.norm.text.weight -> trunk.norm.weight``, others unchanged)."""
    m = _LAYER.match(name)
    if m:
        return f"trunk.layers.{m.group(1)}.{m.group(2)}"
    m = _NORM.match(name)
    if m:
        return f"trunk.norm.{m.group(1)}"
    return name


@torch.no_grad()
def warm_start_from_dense(
    model: nn.Module, dense_state_dict: Mapping[str, Tensor], *, strict: bool = True
) -> list[str]:
    """Copy a dense checkpoint into a MoT model in place.

    Args:
        model: a MoT :class:`~vlm_strategies.VLMWrapper` or its ``Transformer`` (possibly
            ``torch.compile`` d), unsharded.
        dense_state_dict: the ``state_dict()`` of a dense ``Transformer``, or of a
            ``VLMWrapper`` (keys ``transformer.*``; e.g. a ``joint_decoder`` model). With
            a wrapper checkpoint and a wrapper ``model``, the non-decoder entries
            (adapter, frame positions, encoder) present in both are copied too.
        strict: require every MoT decoder entry to have a dense source and every dense
            decoder entry to be used.

    Returns:
        The ``model`` state-dict keys that were written.

    Raises:
        ValueError: a shape mismatch, or (``strict``) missing / unused dense entries.
    """
    wrapper_ckpt = any(k.startswith(_PREFIX) for k in dense_state_dict)
    dense = {
        (k[len(_PREFIX) :] if wrapper_ckpt else k): v
        for k, v in dense_state_dict.items()
        if not wrapper_ckpt or k.startswith(_PREFIX)
    }
    transformer = unwrap_transformer(model)
    inner = getattr(model, "_orig_mod", model)
    is_wrapper = inner is not transformer
    target_prefix = _PREFIX if is_wrapper else ""
    targets = inner.state_dict()

    written: list[str] = []
    used: set[str] = set()
    missing: list[str] = []

    def copy(target_key: str, source: Tensor) -> None:
        dst = targets[target_key]
        if dst.shape != source.shape:
            raise ValueError(
                f"warm start: {target_key} has shape {tuple(dst.shape)} but its dense source "
                f"has {tuple(source.shape)}"
            )
        dst.copy_(source)
        written.append(target_key)

    for name in transformer.state_dict():
        src = dense_name_for(name)
        if src not in dense:
            missing.append(f"{name} (from {src})")
            continue
        copy(target_prefix + name, dense[src])
        used.add(src)
    if strict:
        unused = sorted(set(dense) - used)
        if missing or unused:
            raise ValueError(
                "warm start from a dense checkpoint: "
                + (f"no dense source for {missing[:5]}" if missing else "")
                + ("; " if missing and unused else "")
                + (f"dense entries not used {unused[:5]}" if unused else "")
                + " (is the checkpoint from a dense model with the same model config?)"
            )
    if is_wrapper and wrapper_ckpt:
        for key, value in dense_state_dict.items():
            if not key.startswith(_PREFIX) and key in targets:
                copy(key, value)
    return written
