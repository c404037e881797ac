"""The Perceiver resampler adapter (torch side).

Why a spatial prior: a freshly initialised Perceiver resampler is a global average pool.
Its queries and keys are random projections, so every latent attends almost uniformly to
all patches (normalised attention entropy ~0.99) and its output tokens all carry nearly
the same image average (mean pairwise cosine ~0.9).  A digit's identity is in *where*
its strokes are, so that average carries little of it, and sharpening the attention is
a chicken-and-egg problem: the gradient that would make a latent look at one region is
only as large as that region's usefulness, which is ~0 while the decoder ignores the
image.  Trained from scratch, the resampler was the weak part of the example run.

With ``spatial_prior=True`` (the default) each latent has a 2-D reference point on a
``ceil(sqrt(L))``-wide grid over the image and every key a 2-D position (patches: their
centre on the square patch grid; latents: their reference point), and head ``h`` adds
``-exp(log_slope[h]) * distance**2`` to the attention logits (an ALiBi-style bias in 2-D,
as Honeybee's locality argument and D-Abstractor's grid reference points).  The slopes
start at Gaussian widths of half a latent cell doubling per head, so a fresh resampler is
a set of multi-scale local pools (head 0 local, the last head near global); they are
learned, so a head can widen to global or narrow further.  Token counts that are not a
square grid get no bias on the patches (``N = g*g + 1``: the first token is taken as a
CLS token, visible to every latent).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm_adapters import VisionAdapter
from vlm_plugin_resampler.configs import PerceiverResamplerConfig

__all__ = [
    "PerceiverResampler",
    "ResamplerLayer",
    "build_perceiver_resampler",
    "grid_points",
    "patch_points",
]


SIGMA_RATIO = 1.5
"""Ratio of the initial widths of consecutive heads' spatial biases."""


def grid_points(n: int) -> Tensor:
    """``(n, 2)`` cell centres in ``[0, 1]^2`` of ``n`` points laid row-major on a grid
    ``ceil(sqrt(n))`` wide (the last row may be partial)."""
    side = math.isqrt(n)
    side += side * side < n
    rows = -(-n // side)
    i = torch.arange(n, dtype=torch.float32)
    return torch.stack(((i // side + 0.5) / rows, (i % side + 0.5) / side), dim=-1)


def patch_points(n: int) -> tuple[Tensor | None, int]:
    """Positions of ``n`` patch tokens and how many leading tokens have none.

    A square ``g x g`` grid gives ``(grid_points(n), 0)``; ``g*g + 1`` tokens are a CLS
    token then the grid, ``(grid_points(n - 1), 1)``; any other count has no known
    layout, ``(None, 0)``.
    """
    g = math.isqrt(n)
    if g * g == n:
        return grid_points(n), 0
    if g * g == n - 1:
        return grid_points(n - 1), 1
    return None, 0


class ResamplerLayer(nn.Module):
    """Latents ``(B, L, D)`` attend to ``[features; latents]`` ``(B, N+L, D)``, then an FFN;
    ``bias`` ``(H, L, N+L)`` is added to the attention logits."""

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

    def _qkv(self, media: Tensor, latents: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n_lat, d = latents.shape
        h = self.num_heads
        lat = self.norm_latents(latents)
        kv_in = torch.cat((self.norm_media(media), lat), dim=1)
        q = self.q_proj(lat).view(b, n_lat, h, d // h).transpose(1, 2)
        k, v = self.kv_proj(kv_in).chunk(2, dim=-1)
        k = k.view(b, -1, h, d // h).transpose(1, 2)
        v = v.view(b, -1, h, d // h).transpose(1, 2)
        return q, k, v

    def forward(self, media: Tensor, latents: Tensor, bias: Tensor | None = None) -> Tensor:
        b, n_lat, d = latents.shape
        q, k, v = self._qkv(media, latents)
        mask = None if bias is None else bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        latents = latents + self.o_proj(out.transpose(1, 2).reshape(b, n_lat, d))
        return latents + self.ffn(latents)

    def attention_probs(self, media: Tensor, latents: Tensor, bias: Tensor | None = None) -> Tensor:
        """The attention weights ``(B, H, L, N+L)`` of :meth:`forward` (for diagnostics)."""
        q, k, _ = self._qkv(media, latents)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        return logits.softmax(dim=-1)


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
        self.num_heads = config.num_heads
        self.prior_sigma = config.prior_sigma
        self.input_proj = nn.Linear(in_dim, out_dim)
        self.latents = nn.Parameter(torch.empty(config.num_latents, out_dim))
        # per-head slope of the 2-D distance bias (see the module docstring)
        self.log_slope = (
            nn.Parameter(torch.empty(config.num_heads)) if config.spatial_prior else None
        )
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
            if self.log_slope is not None:
                # Gaussian width of head h: prior_sigma * SIGMA_RATIO**h latent-grid cells
                side = math.isqrt(self.num_latents)
                side += side * side < self.num_latents
                heads = torch.arange(self.num_heads, dtype=torch.float32)
                sigma = self.prior_sigma * SIGMA_RATIO**heads / side
                self.log_slope.copy_(torch.log(0.5 / sigma**2))

    def spatial_bias(self, num_input_tokens: int) -> Tensor | None:
        """``(H, L, N+L)`` logit bias ``-slope_h * distance**2`` between each latent's
        reference point and each key's position; ``None`` without the prior."""
        if self.log_slope is None:
            return None
        n, dev = num_input_tokens, self.log_slope.device
        lat = grid_points(self.num_latents).to(dev)
        dist2 = torch.zeros(self.num_latents, n + self.num_latents, device=dev)
        points, skip = patch_points(n)
        if points is not None:
            dist2[:, skip:n] = torch.cdist(lat, points.to(dev)).square()
        dist2[:, n:] = torch.cdist(lat, lat).square()
        return -self.log_slope.float().exp()[:, None, None] * dist2

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
        bias = self.spatial_bias(x.shape[1])
        for layer in self.layers:
            latents = layer(media, latents, bias)
        return self.norm(latents)

    def attention_probs(self, x: Tensor) -> Tensor:
        """First layer's attention weights ``(B, H, L, N+L)`` on features ``x`` (the last
        ``L`` keys are the latents); for diagnostics such as attention entropy."""
        self.check_input(x)
        media = self.input_proj(x)
        latents = self.latents.to(media.dtype).expand(x.shape[0], -1, -1)
        first: ResamplerLayer = self.layers[0]  # type: ignore[assignment]
        return first.attention_probs(media, latents, self.spatial_bias(x.shape[1]))


def build_perceiver_resampler(
    config: PerceiverResamplerConfig, in_dim: int, out_dim: int
) -> PerceiverResampler:
    """The builder named by :class:`PerceiverResamplerConfig`."""
    return PerceiverResampler(config, in_dim, out_dim)
