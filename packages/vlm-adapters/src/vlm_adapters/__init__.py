"""Vision->language adapters of the VLM toolkit.

The configs (and :func:`square_grid_side`) are torch-free and imported eagerly;
the torch-side names (modules and builders) are imported lazily on first
attribute access, so ``import vlm_adapters.configs`` (the entry-point targets)
never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlm_adapters.__about__ import __version__
from vlm_adapters._grid import square_grid_side
from vlm_adapters.configs import (
    AttentionalPoolAdapterConfig,
    AvgPoolAdapterConfig,
    LinearAdapterConfig,
    MLP2LayerAdapterConfig,
    PixelShuffleAdapterConfig,
)
from vlm_config.lazy import lazy_exports

if TYPE_CHECKING:
    from vlm_adapters.base import VisionAdapter
    from vlm_adapters.build import build_adapter
    from vlm_adapters.pooling import (
        AttentionalPoolAdapter,
        AvgPoolAdapter,
        build_attentional_pool,
        build_avgpool,
        window_average,
    )
    from vlm_adapters.projection import (
        LinearAdapter,
        MLP2LayerAdapter,
        build_linear,
        build_mlp_2layer,
    )
    from vlm_adapters.shuffle import PixelShuffleAdapter, build_pixel_shuffle, pixel_shuffle

_LAZY: dict[str, str] = {
    "VisionAdapter": "vlm_adapters.base",
    "build_adapter": "vlm_adapters.build",
    "MLP2LayerAdapter": "vlm_adapters.projection",
    "LinearAdapter": "vlm_adapters.projection",
    "build_mlp_2layer": "vlm_adapters.projection",
    "build_linear": "vlm_adapters.projection",
    "AvgPoolAdapter": "vlm_adapters.pooling",
    "AttentionalPoolAdapter": "vlm_adapters.pooling",
    "build_avgpool": "vlm_adapters.pooling",
    "build_attentional_pool": "vlm_adapters.pooling",
    "window_average": "vlm_adapters.pooling",
    "PixelShuffleAdapter": "vlm_adapters.shuffle",
    "build_pixel_shuffle": "vlm_adapters.shuffle",
    "pixel_shuffle": "vlm_adapters.shuffle",
}

__all__ = [
    "AttentionalPoolAdapter",
    "AttentionalPoolAdapterConfig",
    "AvgPoolAdapter",
    "AvgPoolAdapterConfig",
    "LinearAdapter",
    "LinearAdapterConfig",
    "MLP2LayerAdapter",
    "MLP2LayerAdapterConfig",
    "PixelShuffleAdapter",
    "PixelShuffleAdapterConfig",
    "VisionAdapter",
    "__version__",
    "build_adapter",
    "build_attentional_pool",
    "build_avgpool",
    "build_linear",
    "build_mlp_2layer",
    "build_pixel_shuffle",
    "pixel_shuffle",
    "square_grid_side",
    "window_average",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
