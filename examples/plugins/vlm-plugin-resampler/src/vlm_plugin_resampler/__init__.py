"""Example plugin for the VLM toolkit: ``perceiver_resampler`` and ``gated_cross_attention``.

Only the torch-free config module is imported by the plugin registry; the torch side
(:mod:`vlm_plugin_resampler.resampler`, :mod:`vlm_plugin_resampler.gated`) is imported
when a model is built.
"""

from vlm_plugin_resampler.__about__ import __version__
from vlm_plugin_resampler.configs import GatedCrossAttentionConfig, PerceiverResamplerConfig

__all__ = ["GatedCrossAttentionConfig", "PerceiverResamplerConfig", "__version__"]
