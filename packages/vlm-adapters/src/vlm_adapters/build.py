"""Build any adapter (first-party or plugin) from its config."""

from __future__ import annotations

from torch import nn

from vlm_adapters.base import VisionAdapter
from vlm_config import AdapterConfig, load_implementation

__all__ = ["build_adapter"]


def build_adapter(config: AdapterConfig, in_dim: int, out_dim: int) -> VisionAdapter:
    """Import ``type(config).implementation`` and call it with ``(config, in_dim, out_dim)``.

    Raises:
        TypeError: the builder returned something that is not an ``nn.Module``
            with an ``output_num_tokens`` method.
    """
    builder = load_implementation(config)
    adapter = builder(config, in_dim, out_dim)
    if not isinstance(adapter, nn.Module) or not callable(
        getattr(adapter, "output_num_tokens", None)
    ):
        raise TypeError(
            f"{type(config).implementation} (for {type(config).__qualname__}) must return an "
            f"nn.Module with output_num_tokens(n), got {type(adapter).__name__}"
        )
    return adapter  # type: ignore[return-value]
