"""Torch-free pydantic configs of the first-party adapters (entry-point group ``vlm.adapters``).

Every class here is an entry-point target, so this module must never import
torch: listing plugins and validating a config file stay torch-free.  Each
class names its torch-side builder in ``implementation``; the builder signature
is ``(config, in_dim: int, out_dim: int) -> VisionAdapter``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from vlm_adapters._grid import (
    avgpool_num_tokens,
    check_num_tokens,
    divisible_pool_num_tokens,
)
from vlm_config import AdapterConfig

Activation = Literal["gelu", "silu", "relu"]

__all__ = [
    "Activation",
    "AttentionalPoolAdapterConfig",
    "AvgPoolAdapterConfig",
    "LinearAdapterConfig",
    "MLP2LayerAdapterConfig",
    "PixelShuffleAdapterConfig",
]


class MLP2LayerAdapterConfig(AdapterConfig):
    """LLaVA-1.5 style projector: ``Linear(in, hidden) -> act -> Linear(hidden, out)``, per token.

    The toolkit's default adapter.  Keeps the token count (``M == N``).

    Fields:
        hidden_dim: width of the hidden layer; ``None`` means ``out_dim``.
        activation: ``"gelu"`` (default), ``"silu"`` or ``"relu"``.
    """

    implementation: ClassVar[str] = "vlm_adapters.projection:build_mlp_2layer"

    type: Literal["mlp_2layer"] = "mlp_2layer"
    hidden_dim: int | None = Field(default=None, ge=1, description="None means out_dim")
    activation: Activation = "gelu"

    def predicted_num_tokens(self, num_input_tokens: int) -> int:
        return check_num_tokens(num_input_tokens, self.type)


class LinearAdapterConfig(AdapterConfig):
    """A single per-token ``Linear(in_dim, out_dim)``.  Keeps the token count.

    Fields:
        bias: whether the projection has a bias.
    """

    implementation: ClassVar[str] = "vlm_adapters.projection:build_linear"

    type: Literal["linear"] = "linear"
    bias: bool = True

    def predicted_num_tokens(self, num_input_tokens: int) -> int:
        return check_num_tokens(num_input_tokens, self.type)


class AvgPoolAdapterConfig(AdapterConfig):
    """Average ``window x window`` patches of the square grid, then ``Linear(in_dim, out_dim)``.

    ``N = g*g`` tokens become ``ceil(g / window) ** 2``.  When ``window`` does
    not divide ``g`` the last row/column of windows is ragged and is averaged
    over its real patches only (never over zero padding).  The module takes a
    per-call ``window=`` override (e.g. a coarser window for video frames with
    the same weights).

    Fields:
        window: pooling window side (>= 1); a window larger than the grid pools
            the whole grid into one token.
        bias: whether the projection has a bias.
    """

    implementation: ClassVar[str] = "vlm_adapters.pooling:build_avgpool"

    type: Literal["avgpool"] = "avgpool"
    window: int = Field(default=2, ge=1)
    bias: bool = True

    def predicted_num_tokens(self, num_input_tokens: int, window: int | None = None) -> int:
        return avgpool_num_tokens(
            num_input_tokens, self.window if window is None else window, self.type
        )


class AttentionalPoolAdapterConfig(AdapterConfig):
    """Per ``window x window`` block, multi-head attention whose query is the block mean.

    Keys/values are the block's patches; the attention output projection maps
    to ``out_dim``.  ``N = g*g`` tokens become ``(g / window) ** 2``; ``window``
    must divide ``g``, which can only be checked once ``N`` is known, so
    :meth:`predicted_num_tokens` (and the module) raise ``ValueError`` otherwise.

    Fields:
        window: pooling window side (>= 1).
        num_heads: attention heads; must divide the encoder width ``in_dim``
            (checked by the builder).  Default 1 builds for any ``in_dim``.
    """

    implementation: ClassVar[str] = "vlm_adapters.pooling:build_attentional_pool"

    type: Literal["attentional_pool"] = "attentional_pool"
    window: int = Field(default=2, ge=1)
    num_heads: int = Field(default=1, ge=1)

    def predicted_num_tokens(self, num_input_tokens: int, window: int | None = None) -> int:
        return divisible_pool_num_tokens(
            num_input_tokens, self.window if window is None else window, self.type
        )


class PixelShuffleAdapterConfig(AdapterConfig):
    """Space-to-depth by ``factor`` (Idefics3 / SmolVLM), then a two-layer MLP to ``out_dim``.

    ``g x g x C`` becomes ``(g/r) x (g/r) x (C*r*r)``; ``factor`` must divide
    ``g`` (checked once ``N`` is known).

    Fields:
        factor: the shuffle factor ``r`` (>= 1).
        hidden_dim: MLP hidden width; ``None`` means ``out_dim``.
        activation: MLP activation.
    """

    implementation: ClassVar[str] = "vlm_adapters.shuffle:build_pixel_shuffle"

    type: Literal["pixel_shuffle"] = "pixel_shuffle"
    factor: int = Field(default=2, ge=1)
    hidden_dim: int | None = Field(default=None, ge=1, description="None means out_dim")
    activation: Activation = "gelu"

    def predicted_num_tokens(self, num_input_tokens: int) -> int:
        return divisible_pool_num_tokens(num_input_tokens, self.factor, self.type, "factor")
