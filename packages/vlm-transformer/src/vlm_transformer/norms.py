"""Normalisation layers: RMSNorm and LayerNorm, both computed in float32."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LayerNorm", "RMSNorm", "build_norm"]


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension (Llama / T5 style).

    ``y = weight * (x / sqrt(mean(x**2, -1) + eps))``. The statistics are computed in
    float32 and the normalised value is cast back to ``x.dtype`` *before* the weight
    multiply, exactly like Hugging Face ``LlamaRMSNorm``.

    Args:
        dim: size of the normalised (last) dimension.
        eps: added to the mean square.

    Shapes: ``x (..., dim)`` of any floating dtype -> same shape and dtype (the result
    dtype follows type promotion with ``weight`` when they differ).
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)
        y = F.rms_norm(x.float(), (self.dim,), None, self.eps).to(x.dtype)
        return self.weight * y

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (with weight and bias) whose statistics are computed in float32.

    Shapes: ``x (..., dim)`` -> same shape, ``x.dtype``.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def build_norm(norm_type: Literal["rmsnorm", "layernorm"] | str, dim: int, eps: float) -> nn.Module:
    """Return ``RMSNorm`` or ``LayerNorm`` for ``ModelConfig.norm_type``.

    Raises:
        ValueError: unknown ``norm_type``.
    """
    if norm_type == "rmsnorm":
        return RMSNorm(dim, eps)
    if norm_type == "layernorm":
        return LayerNorm(dim, eps)
    raise ValueError(f"norm_type must be 'rmsnorm' or 'layernorm', got {norm_type!r}")
