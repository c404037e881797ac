"""Torch-free config of the ``cross_attention`` arch."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from vlm_config import ArchConfig, ConfigFieldError, ModelConfig


class CrossAttentionConfig(ArchConfig):
    """Text queries attend to the visual tokens in cross-attention blocks inserted after
    every ``cross_attention_every_n_layers``-th decoder block (after blocks ``N-1, 2N-1,
    ...``). Each block is pre-norm cross-attention (no rotary positions on either side)
    followed by a pre-norm MLP; both output projections start at zero, so a fresh model
    computes exactly the text-only decoder. The residual stream holds text only.

    Fields:
        cross_attention_every_n_layers: ``N >= 1``; must not exceed ``model.n_layers``.
        cross_attention_kv_heads: key/value heads of the cross-attention (GQA); ``None``
            = the decoder's ``kv_heads``. Must divide ``model.n_heads``.

    Both constraints are checked against the model section by :meth:`check_model` when
    the job config validates (``vlm validate``), and again when the model is built.

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

    def check_model(self, model: ModelConfig) -> None:
        """Reject a block spacing longer than the decoder and KV heads that do not
        divide ``model.n_heads``.

        Raises:
            ConfigFieldError: naming ``cross_attention_every_n_layers`` or
                ``cross_attention_kv_heads`` and the allowed values.
        """
        n, layers = self.cross_attention_every_n_layers, model.n_layers
        if n > layers:
            raise ConfigFieldError(
                "cross_attention_every_n_layers",
                f"arch.cross_attention_every_n_layers ({n}) exceeds model.n_layers ({layers}): "
                f"no cross-attention block would be inserted; allowed: 1..{layers}",
            )
        kv = self.cross_attention_kv_heads
        if kv is not None and model.n_heads % kv:
            raise ConfigFieldError(
                "cross_attention_kv_heads",
                f"arch.cross_attention_kv_heads ({kv}) must divide model.n_heads "
                f"({model.n_heads}); allowed: {divisors(model.n_heads)} or unset (the "
                "decoder's kv heads)",
            )


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n`` in increasing order."""
    return [d for d in range(1, n + 1) if n % d == 0]
