"""The ``pixel_shuffle`` adapter: space-to-depth (Idefics3 / SmolVLM), then an MLP.

Ordering (identical to Idefics3's ``pixel_shuffle``, checked in the tests):
with ``N = g*g`` tokens in row-major order and factor ``r``, output token
``i * (g/r) + j`` (row-major over the ``(g/r) x (g/r)`` grid) is the ``r x r``
block of patches with rows ``i*r .. i*r+r-1`` and columns ``j*r .. j*r+r-1``,
concatenated in row-major order inside the block: channels
``[(dr*r + dc) * C, (dr*r + dc + 1) * C)`` hold patch ``(i*r + dr, j*r + dc)``.
"""

from __future__ import annotations

import math
from typing import ClassVar

from torch import Tensor, nn

from vlm_adapters._grid import check_window, divisible_pool_num_tokens
from vlm_adapters.base import VisionAdapter, check_config, make_activation
from vlm_adapters.configs import PixelShuffleAdapterConfig

__all__ = ["PixelShuffleAdapter", "build_pixel_shuffle", "pixel_shuffle"]


def pixel_shuffle(x: Tensor, factor: int) -> Tensor:
    """Space-to-depth on a square token grid: ``(B, g*g, C) -> (B, (g/r)**2, C*r*r)``.

    Raises:
        ValueError: ``N`` is not a square, or ``factor`` does not divide ``g``.
    """
    batch, n, dim = x.shape
    m = divisible_pool_num_tokens(n, factor, "pixel_shuffle", "factor")
    r = factor
    s = math.isqrt(n) // r
    # (B, g, g, C) -> (B, s, r, s, r, C) -> (B, s, s, r, r, C) -> (B, s*s, r*r*C)
    return (
        x.reshape(batch, s, r, s, r, dim).permute(0, 1, 3, 2, 4, 5).reshape(batch, m, r * r * dim)
    )


class PixelShuffleAdapter(VisionAdapter):
    """Space-to-depth by ``factor`` r, then an MLP ``C*r*r -> hidden -> out_dim``."""

    adapter_name: ClassVar[str] = "pixel_shuffle"

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        factor: int = 2,
        hidden_dim: int | None = None,
        activation: str = "gelu",
    ) -> None:
        super().__init__(in_dim, out_dim)
        self.factor = check_window(factor, self.adapter_name, "factor")
        hidden = out_dim if hidden_dim is None else hidden_dim
        self.fc1 = nn.Linear(in_dim * factor * factor, hidden)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden, out_dim)

    def output_num_tokens(self, num_input_tokens: int) -> int:
        """``(g / factor) ** 2`` for ``N = g * g``; ``ValueError`` unless ``factor`` divides g."""
        return divisible_pool_num_tokens(num_input_tokens, self.factor, self.adapter_name, "factor")

    def forward(self, x: Tensor) -> Tensor:
        """``(B, g*g, in_dim) -> (B, (g/factor)**2, out_dim)``."""
        self.check_input(x)
        return self.fc2(self.act(self.fc1(pixel_shuffle(x, self.factor))))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, factor={self.factor}"


def build_pixel_shuffle(
    config: PixelShuffleAdapterConfig, in_dim: int, out_dim: int
) -> PixelShuffleAdapter:
    """Builder of ``type = "pixel_shuffle"``."""
    check_config(config, PixelShuffleAdapterConfig)
    return PixelShuffleAdapter(
        in_dim,
        out_dim,
        factor=config.factor,
        hidden_dim=config.hidden_dim,
        activation=config.activation,
    )
