"""Torch-free configs, plugin registry and CLI of the VLM toolkit."""

from vlm_config.__about__ import __version__
from vlm_config.components import (
    AdapterConfig,
    ArchConfig,
    ComponentConfig,
    EncoderConfig,
    FreezeSpec,
    FreezeStage,
    StrictModel,
    matches_any,
)
from vlm_config.implementation import load_implementation
from vlm_config.model import ModelConfig
from vlm_config.parallel import ParallelConfig

__all__ = [
    "AdapterConfig",
    "ArchConfig",
    "ComponentConfig",
    "EncoderConfig",
    "FreezeSpec",
    "FreezeStage",
    "ModelConfig",
    "ParallelConfig",
    "StrictModel",
    "__version__",
    "load_implementation",
    "matches_any",
]
