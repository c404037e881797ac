"""Projection adapters that keep the token count: ``mlp_2layer`` and ``linear``."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from vlm_adapters.base import VisionAdapter, check_config, make_activation
from vlm_adapters.configs import LinearAdapterConfig, MLP2LayerAdapterConfig

__all__ = ["LinearAdapter", "MLP2LayerAdapter", "build_linear", "build_mlp_2layer"]


class MLP2LayerAdapter(VisionAdapter):
    """``Linear(in, hidden) -> activation -> Linear(hidden, out)`` per token (LLaVA-1.5)."""

    adapter_name: ClassVar[str] = "mlp_2layer"

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int | None = None, activation: str = "gelu"
    ) -> None:
        super().__init__(in_dim, out_dim)
        hidden = out_dim if hidden_dim is None else hidden_dim
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.fc2(self.act(self.fc1(x)))


class LinearAdapter(VisionAdapter):
    """One ``Linear(in_dim, out_dim)`` per token."""

    adapter_name: ClassVar[str] = "linear"

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__(in_dim, out_dim)
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.proj(x)


def build_mlp_2layer(config: MLP2LayerAdapterConfig, in_dim: int, out_dim: int) -> MLP2LayerAdapter:
    """Builder of ``type = "mlp_2layer"``."""
    check_config(config, MLP2LayerAdapterConfig)
    return MLP2LayerAdapter(in_dim, out_dim, config.hidden_dim, config.activation)


def build_linear(config: LinearAdapterConfig, in_dim: int, out_dim: int) -> LinearAdapter:
    """Builder of ``type = "linear"``."""
    check_config(config, LinearAdapterConfig)
    return LinearAdapter(in_dim, out_dim, bias=config.bias)
