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

    ``forward(x (B,S,D), state: TrunkInputs, cache: LayerKVCache | None, output_from=0)
    -> (B, S - output_from, D)``: every position attends as usual (and fills the cache),
    but the attention output projection, the residual and the MLP run on positions
    ``>= output_from`` only.

    Args:
        config: the decoder config: ``dim``, heads, ``qk_norm``, ``norm_type``, ``mlp``
            and ``hidden_dim`` choose the submodules ``attn_norm``, ``attn``,
            ``mlp_norm`` and ``mlp``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = build_norm(config.norm_type, config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = build_norm(config.norm_type, config.dim, config.norm_eps)
        self.mlp = build_mlp(config)

    def forward(
        self,
        x: Tensor,
        state: TrunkInputs,
        cache: LayerKVCache | None = None,
        output_from: int = 0,
    ) -> Tensor:
        h = self.attn(self.attn_norm(x), state.cos, state.sin, state.mask, cache, output_from)
        x = (x[:, output_from:] if output_from else x) + h
        return x + self.mlp(self.mlp_norm(x))
