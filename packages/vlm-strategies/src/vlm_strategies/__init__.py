"""The VLM wrapper, ``build_vlm`` and the first-party fusion archs.

Importing this package does not import torch: the arch config modules (torch-free,
loaded by the plugin registry) live under it, so torch-side names load lazily.

:mod:`vlm_strategies.testing` is the conformance kit an arch author runs on an arch.
"""

from __future__ import annotations

from vlm_config.lazy import lazy_exports
from vlm_strategies.__about__ import __version__

_LAZY = {
    "ArchImplementation": "vlm_strategies.api",
    "PrefixArchImplementation": "vlm_strategies.api",
    "VLMWrapper": "vlm_strategies.wrapper",
    "VisionFeatures": "vlm_strategies.wrapper",
    "MediaBatch": "vlm_strategies.media",
    "MediaEmbeds": "vlm_strategies.media",
    "MediaLayout": "vlm_strategies.media",
    "placeholders_per_image": "vlm_strategies.media",
    "IGNORE_INDEX": "vlm_strategies.wrapper",
    "causal_lm_loss": "vlm_strategies.wrapper",
    "shift_labels": "vlm_strategies.wrapper",
    "build_arch": "vlm_strategies.build",
    "build_vlm": "vlm_strategies.build",
    "build_vlm_from_configs": "vlm_strategies.build",
    "apply_freeze": "vlm_strategies.freezing",
    "freeze_specs_at": "vlm_strategies.freezing",
    "trainable_parameter_names": "vlm_strategies.freezing",
    "unwrap_transformer": "vlm_strategies.unwrap",
    "FramePositionEmbedding": "vlm_strategies.video",
    "expand_frame_mask": "vlm_strategies.video",
    "fold_frames": "vlm_strategies.video",
}

__all__ = ["__version__", *sorted(_LAZY)]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
