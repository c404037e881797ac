"""Torch-free configs, plugin registry and CLI of the VLM toolkit."""

from vlm_config.__about__ import __version__
from vlm_config.components import (
    AdapterConfig,
    ArchConfig,
    ComponentConfig,
    ConfigFieldError,
    EncoderConfig,
    FreezeSpec,
    FreezeStage,
    StrictModel,
    matches_any,
)
from vlm_config.data import ConfigDeprecationWarning, DataConfig, DatasetConfig, NoDatasetConfig
from vlm_config.files import (
    ConfigFileError,
    apply_overrides,
    dump_toml,
    load_job_config,
    read_config_file,
    write_toml,
)
from vlm_config.implementation import load_implementation
from vlm_config.job import (
    JobConfig,
    SequenceBudget,
    check_sequence_budget,
    compute_sequence_budget,
    resolved_job_config_class,
)
from vlm_config.lazy import lazy_exports
from vlm_config.model import ModelConfig
from vlm_config.parallel import ParallelConfig
from vlm_config.registry import PluginEntry, PluginError, PluginRegistry, get_registry
from vlm_config.train import TrainConfig

__all__ = [
    "AdapterConfig",
    "ConfigFileError",
    "ConfigDeprecationWarning",
    "DataConfig",
    "DatasetConfig",
    "NoDatasetConfig",
    "JobConfig",
    "PluginEntry",
    "PluginError",
    "PluginRegistry",
    "SequenceBudget",
    "TrainConfig",
    "apply_overrides",
    "check_sequence_budget",
    "compute_sequence_budget",
    "dump_toml",
    "get_registry",
    "lazy_exports",
    "load_job_config",
    "read_config_file",
    "resolved_job_config_class",
    "write_toml",
    "ArchConfig",
    "ComponentConfig",
    "ConfigFieldError",
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
