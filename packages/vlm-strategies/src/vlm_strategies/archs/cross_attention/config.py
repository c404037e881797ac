"""Torch-free config of the ``cross_attention`` arch."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from vlm_config import ArchConfig


class CrossAttentionConfig(ArchConfig):
    """Text queries attend to the visual tokens in cross-attention blocks inserted after
    every ``cross_attention_every_n_layers``-th decoder block (after blocks ``N-1, 2N-1,
    ...``). Each block is pre-norm cross-attention (no rotary positions on either side)
    followed by a pre-norm MLP; both output projections start at zero, so a fresh model
    computes exactly the text-only decoder. The residual stream holds text only.

    Fields:
        cross_attention_every_n_layers: ``N >= 1``; must not exceed ``model.n_layers``
            (checked when the model is built, a ``ValueError``).
        cross_attention_kv_heads: key/value heads of the cross-attention (GQA); ``None``
            = the decoder's ``kv_heads``. Must divide ``model.n_heads`` (checked at build).

    Freeze alias ``cross_attention``: every parameter of the inserted blocks
    (``transformer.trunk.cross_layers.*``); ``transformer`` covers them too, so
    ``[{module="transformer"}, {module="cross_attention", frozen=false}]`` trains only
    the new blocks (plus adapter).
    """

    arch: Literal["cross_attention"] = "cross_attention"
    cross_attention_every_n_layers: int = Field(default=1, ge=1)
    cross_attention_kv_heads: int | None = Field(default=None, ge=1)

    implementation: ClassVar[str] = "vlm_strategies.archs.cross_attention.impl:CrossAttention"
    module_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "cross_attention": ("transformer.trunk.cross_layers.*",),
    }

    def residual_image_positions(self, num_visual_tokens: int) -> int:
        """Images enter from the side: no image positions in the residual stream."""
        return 0
