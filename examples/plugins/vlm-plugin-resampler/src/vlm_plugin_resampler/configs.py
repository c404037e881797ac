"""Torch-free configs of the plugin (entry-point targets)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from vlm_config import AdapterConfig, ArchConfig, ConfigFieldError, ModelConfig


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class PerceiverResamplerConfig(AdapterConfig):
    """Flamingo's Perceiver resampler: ``num_latents`` learned queries cross-attend to the
    patch features (and to themselves) for ``depth`` layers.

    The output token count is ``num_latents`` whatever the input grid, so it also takes
    non-square token counts (a CLS token left in).

    Fields:
        num_latents: output tokens ``M``.
        depth: resampler layers (attention + FFN each).
        num_heads: attention heads; must divide the decoder width ``model.dim`` (checked
            by :meth:`check_model` when the job validates, and again at build).
        ffn_mult: FFN hidden width as a multiple of the decoder width.
        spatial_prior: give each latent a 2-D reference point on a grid over the image
            and add ``-slope_h * distance**2`` (learned per head) to the attention
            logits, so a fresh resampler is a set of multi-scale local pools rather
            than a global average (see :mod:`vlm_plugin_resampler.resampler`).  Off:
            the plain Flamingo resampler.
        prior_sigma: the initial Gaussian width of head 0's bias, in latent-grid cells;
            head ``h`` starts at ``prior_sigma * 1.5**h``.
    """

    type: Literal["perceiver_resampler"] = "perceiver_resampler"
    num_latents: int = Field(default=16, ge=1, le=4096)
    depth: int = Field(default=1, ge=1, le=12)
    num_heads: int = Field(default=4, ge=1)
    ffn_mult: int = Field(default=4, ge=1, le=16)
    spatial_prior: bool = True
    prior_sigma: float = Field(default=0.25, gt=0.0, le=100.0)
    implementation: ClassVar[str] = "vlm_plugin_resampler.resampler:build_perceiver_resampler"

    def predicted_num_tokens(self, num_input_tokens: int) -> int:
        if num_input_tokens < 1:
            raise ValueError(f"perceiver_resampler needs >= 1 input token, got {num_input_tokens}")
        return self.num_latents

    def check_model(self, model: ModelConfig) -> None:
        """The resampler works at the decoder width: ``num_heads`` must divide ``model.dim``.

        Raises:
            ConfigFieldError: naming ``num_heads`` and the allowed values.
        """
        if model.dim % self.num_heads:
            raise ConfigFieldError(
                "num_heads",
                f"adapter.num_heads ({self.num_heads}) must divide the decoder width "
                f"model.dim ({model.dim}); allowed: {_divisors(model.dim)}",
            )


class GatedCrossAttentionConfig(ArchConfig):
    """Flamingo-style gated cross-attention dense blocks inserted before every
    ``every_n_layers``-th decoder block: ``x += tanh(a_attn) * xattn(x, img)`` then
    ``x += tanh(a_ffn) * ffn(x)``, the gates starting at ``gate_init`` (0: a fresh model
    equals the text-only model). The residual stream holds text only.

    Fields:
        every_n_layers: insert a gated block before decoder blocks ``0, N, 2N, ...``.
        kv_heads: key/value heads of the cross-attention (``None`` = decoder's); must
            divide ``model.n_heads`` (checked by :meth:`check_model` when the job
            validates, and again at build).
        gate_init: initial value of the ``tanh`` gates' parameters.
        media_mask: text attends only to the visual tokens of real frames (always on;
            kept as a field to document the Flamingo option of per-token media masks).
    """

    arch: Literal["gated_cross_attention"] = "gated_cross_attention"
    every_n_layers: int = Field(default=1, ge=1)
    kv_heads: int | None = Field(default=None, ge=1)
    gate_init: float = Field(default=0.0, ge=-3.0, le=3.0)
    implementation: ClassVar[str] = "vlm_plugin_resampler.gated:GatedCrossAttention"
    module_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "gated_cross_attention": ("transformer.trunk.gated_layers.*",),
        "gates": ("transformer.trunk.gated_layers.*.gate_*",),
    }

    @model_validator(mode="after")
    def _frames_need_positions(self) -> GatedCrossAttentionConfig:
        if self.frames_per_clip > 1 and self.frame_positions == "none":
            raise ValueError(
                "gated_cross_attention cannot tell frame order without frame positions: "
                "set frame_positions to 'auto' or 'learned' for clips"
            )
        return self

    def residual_image_positions(self, num_visual_tokens: int) -> int:
        return 0

    def check_model(self, model: ModelConfig) -> None:
        """``kv_heads``, when set, must divide ``model.n_heads`` (grouped-query attention).

        Raises:
            ConfigFieldError: naming ``kv_heads`` and the allowed values.
        """
        if self.kv_heads is not None and model.n_heads % self.kv_heads:
            raise ConfigFieldError(
                "kv_heads",
                f"arch.kv_heads ({self.kv_heads}) must divide model.n_heads ({model.n_heads}); "
                f"allowed: {_divisors(model.n_heads)} or unset (the decoder's kv heads)",
            )
