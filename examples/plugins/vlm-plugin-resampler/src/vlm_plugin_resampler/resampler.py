"""The Perceiver resampler adapter (torch side)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm_adapters import VisionAdapter
from vlm_plugin_resampler.configs import PerceiverResamplerConfig

__all__ = ["PerceiverResampler", "ResamplerLayer", "build_perceiver_resampler"]


class ResamplerLayer(nn.Module):
    """Latents ``(B, L, D)`` attend to ``[features; latents]`` ``(B, N+L, D)``, then an FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.ffn = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, ffn_mult * dim, bias=False),
            nn.GELU(),
            nn.Linear(ffn_mult * dim, dim, bias=False),
        )

    def forward(self, media: Tensor, latents: Tensor) -> Tensor:
        b, n_lat, d = latents.shape
        h = self.num_heads
        lat = self.norm_latents(latents)
        kv_in = torch.cat((self.norm_media(media), lat), dim=1)
        q = self.q_proj(lat).view(b, n_lat, h, d // h).transpose(1, 2)
        k, v = self.kv_proj(kv_in).chunk(2, dim=-1)
        k = k.view(b, -1, h, d // h).transpose(1, 2)
        v = v.view(b, -1, h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n_lat, d)
        latents = latents + self.o_proj(out)
        return latents + self.ffn(latents)


class PerceiverResampler(VisionAdapter):
    """``(B, N, in_dim) -> (B, num_latents, out_dim)``; ``N`` may be anything >= 1.

    Raises:
        ValueError: ``num_heads`` does not divide ``out_dim`` (at construction), or a
            malformed input (see :meth:`VisionAdapter.check_input`).
    """

    adapter_name = "perceiver_resampler"

    def __init__(self, config: PerceiverResamplerConfig, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim)
        if out_dim % config.num_heads:
            raise ValueError(
                f"perceiver_resampler: num_heads ({config.num_heads}) must divide the decoder "
                f"width ({out_dim})"
            )
        self.num_latents = config.num_latents
        self.input_proj = nn.Linear(in_dim, out_dim)
        self.latents = nn.Parameter(torch.empty(config.num_latents, out_dim))
        self.layers = nn.ModuleList(
            ResamplerLayer(out_dim, config.num_heads, config.ffn_mult) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(out_dim)
        self.reset_parameters()

    def output_num_tokens(self, num_input_tokens: int) -> int:
        if num_input_tokens < 1:
            raise ValueError(f"perceiver_resampler needs >= 1 input token, got {num_input_tokens}")
        return self.num_latents

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            nn.init.normal_(self.latents, std=0.02)

    def check_input(self, x: Tensor) -> int:
        if x.ndim != 3 or x.shape[-1] != self.in_dim or not torch.is_floating_point(x):
            raise ValueError(
                f"perceiver_resampler expects floating features (B, N, in_dim={self.in_dim}), "
                f"got {tuple(x.shape)} {x.dtype}"
            )
        return int(x.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        media = self.input_proj(x)
        latents = self.latents.to(media.dtype).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents)


def build_perceiver_resampler(
    config: PerceiverResamplerConfig, in_dim: int, out_dim: int
) -> PerceiverResampler:
    """The builder named by :class:`PerceiverResamplerConfig`."""
    return PerceiverResampler(config, in_dim, out_dim)
