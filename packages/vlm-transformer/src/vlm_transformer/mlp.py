"""Feed-forward blocks: SwiGLU (fused gate/up projection) and GELU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm_config import ModelConfig
from vlm_transformer.init import mark_output_projection

__all__ = ["GeluMLP", "SwiGLU", "build_mlp"]


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with ``gate``/``up`` fused in one linear.

    ``gate_up_proj.weight`` is ``(2 * hidden, dim)`` = ``cat([gate_proj, up_proj], 0)``
    of Hugging Face Llama. Shapes: ``(..., dim) -> (..., dim)``.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.gate_up_proj = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.down_proj = mark_output_projection(nn.Linear(hidden_dim, dim, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return self.down_proj(F.silu(gate) * up)
        # no autograd graph: multiply into silu's fresh output (one allocation fewer,
        # bitwise the same); the projection's own output is never written to
        return self.down_proj(F.silu(gate).mul_(up))


class GeluMLP(nn.Module):
    """``down(gelu(up(x)))`` (exact erf GELU, no biases). ``(..., dim) -> (..., dim)``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = mark_output_projection(nn.Linear(hidden_dim, dim, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


def build_mlp(config: ModelConfig) -> nn.Module:
    """``SwiGLU`` or ``GeluMLP`` of width ``config.hidden_dim`` per ``config.mlp``.

    Raises:
        ValueError: unknown ``config.mlp``.
    """
    if config.mlp == "swiglu":
        return SwiGLU(config.dim, config.hidden_dim)
    if config.mlp == "gelu":
        return GeluMLP(config.dim, config.hidden_dim)
    raise ValueError(f"mlp must be 'swiglu' or 'gelu', got {config.mlp!r}")
