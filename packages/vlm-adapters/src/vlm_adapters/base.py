"""The :class:`VisionAdapter` base every adapter module derives from."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from vlm_adapters._grid import check_num_tokens

__all__ = ["VisionAdapter", "check_config", "make_activation"]


def make_activation(name: str) -> nn.Module:
    """``"gelu" | "silu" | "relu"`` -> the matching parameter-free module."""
    if name == "gelu":
        return nn.GELU()
    if name == "silu":
        return nn.SiLU()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {name!r}; expected 'gelu', 'silu' or 'relu'")


def check_config(config: object, cls: type) -> None:
    """Builders' guard: ``config`` must be an instance of ``cls`` (or a subclass)."""
    if not isinstance(config, cls):
        raise TypeError(f"expected a {cls.__name__}, got {type(config).__name__}")


def _check_dim(value: int, name: str, adapter: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{adapter}: {name} must be an int >= 1, got {value!r}")
    return value


class VisionAdapter(nn.Module):
    """Base of vision->language adapters: ``(B, N, in_dim) -> (B, M, out_dim)``.

    Contract (relied on by the archs):

    * ``forward(x)`` takes patch features ``(B, N, in_dim)``; video frames are
      folded into the batch as ``(B*F, N, in_dim)`` and every adapter is
      batch-agnostic (each row is processed independently).
    * :meth:`output_num_tokens` returns the exact ``M`` for ``N`` before any
      forward and raises ``ValueError`` for an ``N`` the adapter cannot take;
      it always equals the config's ``predicted_num_tokens``.
    * :meth:`reset_parameters` (re)initialises every parameter, so a module
      built on the meta device is usable after ``to_empty(device=...)`` followed
      by ``reset_parameters()``.  Adapters hold no buffers.

    Subclasses set ``adapter_name`` (used in error messages) and override
    ``forward`` and, for pooling adapters, ``output_num_tokens``.
    """

    adapter_name: ClassVar[str] = "adapter"

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim = _check_dim(in_dim, "in_dim", self.adapter_name)
        self.out_dim = _check_dim(out_dim, "out_dim", self.adapter_name)

    def output_num_tokens(self, num_input_tokens: int) -> int:
        """Exact output token count ``M`` for ``N`` input tokens (projection: ``M == N``)."""
        return check_num_tokens(num_input_tokens, self.adapter_name)

    def reset_parameters(self) -> None:
        """Re-initialise every parameter with the submodules' own ``reset_parameters``.

        Subclasses whose parameters are not all owned by a submodule with a
        ``reset_parameters`` method must override this.
        """
        for module in self.modules():
            if module is not self:
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()

    def check_input(self, x: Tensor) -> int:
        """Validate ``x`` against ``(B, N, in_dim)`` and return ``N``.

        Raises:
            ValueError: wrong rank, wrong feature width, no tokens or a
                non-floating dtype, naming the expected shape.
        """
        expected = f"(B, N, in_dim={self.in_dim}) (video: frames folded into B)"
        if not isinstance(x, Tensor):
            raise ValueError(f"{self.adapter_name} expects a tensor {expected}, got {type(x)}")
        if x.ndim != 3:
            raise ValueError(
                f"{self.adapter_name} expects features of shape {expected}, "
                f"got a {x.ndim}-d tensor of shape {tuple(x.shape)}"
            )
        if x.shape[-1] != self.in_dim:
            raise ValueError(
                f"{self.adapter_name} expects features of shape {expected}, got shape "
                f"{tuple(x.shape)} (last dim {x.shape[-1]} != in_dim {self.in_dim})"
            )
        if not torch.is_floating_point(x):
            raise ValueError(
                f"{self.adapter_name} expects floating-point features, got dtype {x.dtype}"
            )
        return check_num_tokens(int(x.shape[1]), self.adapter_name)

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}"
