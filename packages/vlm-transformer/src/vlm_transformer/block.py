"""The pre-norm decoder block."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from vlm_config import ModelConfig
from vlm_transformer.attention import Attention
from vlm_transformer.mlp import build_mlp
from vlm_transformer.norms import build_norm

if TYPE_CHECKING:
    from vlm_transformer.cache import LayerKVCache
    from vlm_transformer.trunk import TrunkInputs

__all__ = ["DecoderBlock"]


class DecoderBlock(nn.Module):
    """``h = x + attn(attn_norm(x)); out = h + mlp(mlp_norm(h))``.

    ``forward(x (B,S,D), state: TrunkInputs, cache: LayerKVCache | None) -> (B,S,D)``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = build_norm(config.norm_type, config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = build_norm(config.norm_type, config.dim, config.norm_eps)
        self.mlp = build_mlp(config)

    def forward(self, x: Tensor, state: TrunkInputs, cache: LayerKVCache | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), state.cos, state.sin, state.mask, cache)
        return x + self.mlp(self.mlp_norm(x))
