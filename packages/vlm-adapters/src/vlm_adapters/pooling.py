"""Pooling adapters over the square patch grid: ``avgpool`` and ``attentional_pool``.

Tokens are read as a ``g x g`` grid in row-major order (token ``t`` is patch
``(t // g, t % g)``) and the output windows are emitted in row-major order too.
Both adapters take a per-call ``window=`` override so that, for example, video
frames can be pooled more coarsely than still images with one set of weights.
Everything is vectorised (reshape / permute), with no Python loop over windows.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm_adapters._grid import avgpool_num_tokens, check_window, divisible_pool_num_tokens
from vlm_adapters.base import VisionAdapter, check_config
from vlm_adapters.configs import AttentionalPoolAdapterConfig, AvgPoolAdapterConfig

__all__ = [
    "AttentionalPoolAdapter",
    "AvgPoolAdapter",
    "build_attentional_pool",
    "build_avgpool",
    "window_average",
]


def window_average(x: Tensor, window: int) -> Tensor:
    """Average ``window x window`` patches of a square grid: ``(B, g*g, C) -> (B, s*s, C)``.

    ``s = ceil(g / window)``.  Ragged edge windows (when ``window`` does not
    divide ``g``) are averaged over their real patches only: the grid is
    zero-padded to ``s * window`` for the reshape, and each window sum is divided
    by its count of real patches, not by ``window ** 2``.  A window larger than
    the grid averages the whole grid into one token.
    """
    batch, n, dim = x.shape
    g = math.isqrt(n)
    if g * g != n:
        avgpool_num_tokens(n, window)  # raises the descriptive error
    w = min(check_window(window, "avgpool"), g)
    s = -(-g // w)
    grid = x.reshape(batch, g, g, dim)
    if s * w == g:
        return grid.reshape(batch, s, w, s, w, dim).mean(dim=(2, 4)).reshape(batch, s * s, dim)
    pad = s * w - g
    grid = F.pad(grid, (0, 0, 0, pad, 0, pad))  # pad columns then rows at the far edge
    sums = grid.reshape(batch, s, w, s, w, dim).sum(dim=(2, 4))  # (B, s, s, C)
    # real patches per window row/column: w everywhere except the last (g - (s-1)*w)
    per_side = torch.clamp(g - torch.arange(s, device=x.device) * w, max=w)
    counts = (per_side[:, None] * per_side[None, :]).to(sums.dtype)  # (s, s)
    return (sums / counts[:, :, None]).reshape(batch, s * s, dim)


class AvgPoolAdapter(VisionAdapter):
    """Window-average the square patch grid, then ``Linear(in_dim, out_dim)``.

    Order: **pool, then project.**  The projection is affine, and an affine map
    commutes with averaging (``mean(W x + b) = W mean(x) + b``, also for the
    ragged edge means), so both orders give the same output; pooling first runs
    the projection on ``window**2`` times fewer tokens.
    """

    adapter_name: ClassVar[str] = "avgpool"

    def __init__(self, in_dim: int, out_dim: int, window: int = 2, bias: bool = True) -> None:
        super().__init__(in_dim, out_dim)
        self.window = check_window(window, self.adapter_name)
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def output_num_tokens(self, num_input_tokens: int, window: int | None = None) -> int:
        """``ceil(g / window) ** 2`` for ``N = g * g``; default window: the configured one."""
        return avgpool_num_tokens(
            num_input_tokens, self.window if window is None else window, self.adapter_name
        )

    def forward(self, x: Tensor, window: int | None = None) -> Tensor:
        """``(B, g*g, in_dim) -> (B, ceil(g/window)**2, out_dim)``."""
        n = self.check_input(x)
        w = self.window if window is None else window
        self.output_num_tokens(n, w)  # validates the grid and the window
        return self.proj(window_average(x, w))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}"


class AttentionalPoolAdapter(VisionAdapter):
    """Per ``window x window`` block: multi-head attention with the block mean as query.

    For each block of patches ``P`` (``window**2`` tokens of width ``in_dim``):
    ``q = W_q mean(P)``, ``k = W_k P``, ``v = W_v P`` split into ``num_heads``
    heads, ``softmax(q k^T / sqrt(d)) v``, and the output projection
    ``Linear(in_dim, out_dim)`` (the attention's own output projection doubles
    as the projection to the language-model width).  ``W_k`` has no bias: a key
    bias only adds a per-query constant to the scores, which softmax ignores.
    ``window`` must divide the grid side.
    """

    adapter_name: ClassVar[str] = "attentional_pool"

    def __init__(self, in_dim: int, out_dim: int, window: int = 2, num_heads: int = 1) -> None:
        super().__init__(in_dim, out_dim)
        self.window = check_window(window, self.adapter_name)
        self.num_heads = check_window(num_heads, self.adapter_name, "num_heads")
        if in_dim % num_heads:
            raise ValueError(
                f"attentional_pool: num_heads={num_heads} must divide the encoder width "
                f"in_dim={in_dim}"
            )
        self.head_dim = in_dim // num_heads
        self.q_proj = nn.Linear(in_dim, in_dim)
        self.k_proj = nn.Linear(in_dim, in_dim, bias=False)
        self.v_proj = nn.Linear(in_dim, in_dim)
        self.out_proj = nn.Linear(in_dim, out_dim)

    def output_num_tokens(self, num_input_tokens: int, window: int | None = None) -> int:
        """``(g / window) ** 2`` for ``N = g * g``; ``ValueError`` unless ``window`` divides g."""
        return divisible_pool_num_tokens(
            num_input_tokens, self.window if window is None else window, self.adapter_name
        )

    def forward(self, x: Tensor, window: int | None = None) -> Tensor:
        """``(B, g*g, in_dim) -> (B, (g/window)**2, out_dim)``."""
        n = self.check_input(x)
        w = self.window if window is None else window
        m = self.output_num_tokens(n, w)
        batch, _, dim = x.shape
        g = math.isqrt(n)
        s = g // w
        # (B, g, g, C) -> (B, s, w, s, w, C) -> (B, s, s, w, w, C) -> (B*M, w*w, C)
        blocks = (
            x.reshape(batch, s, w, s, w, dim)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(batch * m, w * w, dim)
        )
        query = blocks.mean(dim=1, keepdim=True)  # (B*M, 1, C)
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(batch * m, 1, h, d).transpose(1, 2)
        k = self.k_proj(blocks).view(batch * m, w * w, h, d).transpose(1, 2)
        v = self.v_proj(blocks).view(batch * m, w * w, h, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B*M, h, 1, d)
        return self.out_proj(out.transpose(1, 2).reshape(batch, m, dim))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}, num_heads={self.num_heads}"


def build_avgpool(config: AvgPoolAdapterConfig, in_dim: int, out_dim: int) -> AvgPoolAdapter:
    """Builder of ``type = "avgpool"``."""
    check_config(config, AvgPoolAdapterConfig)
    return AvgPoolAdapter(in_dim, out_dim, window=config.window, bias=config.bias)


def build_attentional_pool(
    config: AttentionalPoolAdapterConfig, in_dim: int, out_dim: int
) -> AttentionalPoolAdapter:
    """Builder of ``type = "attentional_pool"``.

    Raises:
        ValueError: ``num_heads`` does not divide ``in_dim``.
    """
    check_config(config, AttentionalPoolAdapterConfig)
    return AttentionalPoolAdapter(in_dim, out_dim, window=config.window, num_heads=config.num_heads)
