"""Vision encoders of the VLM toolkit.

The configs (``vlm_encoders.configs``) are imported eagerly and never import
torch; the torch-side names (``VisionEncoder``, the encoders and builders) are
imported on first attribute access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlm_config.lazy import lazy_exports
from vlm_encoders.__about__ import __version__
from vlm_encoders.configs import (
    ClipEncoderConfig,
    HFVisionEncoderConfig,
    RandomEncoderConfig,
    Siglip2EncoderConfig,
    SiglipEncoderConfig,
    read_vision_config,
)

if TYPE_CHECKING:
    from vlm_encoders.base import PreprocessingInfo, VisionEncoder
    from vlm_encoders.hf import HFVisionEncoder, build_hf_encoder
    from vlm_encoders.random_encoder import RandomEncoder, build_random_encoder

_LAZY = {
    "PreprocessingInfo": "vlm_encoders.base",
    "VisionEncoder": "vlm_encoders.base",
    "HFVisionEncoder": "vlm_encoders.hf",
    "build_hf_encoder": "vlm_encoders.hf",
    "RandomEncoder": "vlm_encoders.random_encoder",
    "build_random_encoder": "vlm_encoders.random_encoder",
}

__all__ = [
    "ClipEncoderConfig",
    "HFVisionEncoder",
    "HFVisionEncoderConfig",
    "PreprocessingInfo",
    "RandomEncoder",
    "RandomEncoderConfig",
    "Siglip2EncoderConfig",
    "SiglipEncoderConfig",
    "VisionEncoder",
    "__version__",
    "build_hf_encoder",
    "build_random_encoder",
    "read_vision_config",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
