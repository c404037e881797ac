"""Shared test helpers: torch-free plugin classes registered in-process, ``base_job``.

(A uniquely named module, not ``conftest``: several packages' tests run in one pytest.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar, Literal

import pytest
from pydantic import Field

from vlm_config import (
    AdapterConfig,
    ArchConfig,
    DatasetConfig,
    EncoderConfig,
    PluginRegistry,
    get_registry,
)


class GridEncoderConfig(EncoderConfig):
    type: Literal["test_grid"] = "test_grid"
    grid: int = Field(default=4, ge=1)
    implementation: ClassVar[str] = "builtins:print"

    def predicted_num_tokens(self) -> int:
        return self.grid * self.grid


class StrideAdapterConfig(AdapterConfig):
    type: Literal["test_stride"] = "test_stride"
    stride: int = Field(default=1, ge=1)

    def predicted_num_tokens(self, num_input_tokens: int) -> int:
        if num_input_tokens % self.stride:
            raise ValueError(f"stride {self.stride} must divide {num_input_tokens} tokens")
        return num_input_tokens // self.stride


class PrefixArchConfig(ArchConfig):
    arch: Literal["test_prefix"] = "test_prefix"
    module_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"special": ("transformer.x.*",)}


class SideArchConfig(ArchConfig):
    arch: Literal["test_side"] = "test_side"
    every: int = Field(default=2, ge=1)

    def residual_image_positions(self, num_visual_tokens: int) -> int:
        return 0


class DefaultDataConfig(DatasetConfig):
    """Stands in for vlm-data's ``digits`` (the default ``[data]`` type), so that these
    tests run in a venv holding only vlm-config; registered in-process it overrides
    the installed one for the duration of a test."""

    type: Literal["digits"] = "digits"
    augment_shift: int = Field(default=0, ge=0)
    implementation: ClassVar[str] = "builtins:print"


class ManifestDataConfig(DatasetConfig):
    type: Literal["test_manifest"] = "test_manifest"
    train_file: str
    implementation: ClassVar[str] = "builtins:print"


TEST_CLASSES = [
    ("vlm.encoders", GridEncoderConfig),
    ("vlm.adapters", StrideAdapterConfig),
    ("vlm.archs", PrefixArchConfig),
    ("vlm.archs", SideArchConfig),
    ("vlm.datasets", DefaultDataConfig),
    ("vlm.datasets", ManifestDataConfig),
]


@pytest.fixture
def registered() -> Iterator[PluginRegistry]:
    """The default registry with the torch-free test plugins registered in-process."""
    registry = get_registry()
    for group, cls in TEST_CLASSES:
        registry.register(group, cls, replace=True)
    yield registry
    for group, cls in TEST_CLASSES:
        registry.unregister(group, cls.plugin_name())


def base_job(**sections: object) -> dict[str, object]:
    job: dict[str, object] = {
        "model": {"dim": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 64},
        "encoder": {"type": "test_grid", "grid": 4},
        "adapter": {"type": "test_stride", "stride": 2},
        "arch": {"arch": "test_prefix", "max_text_len": 16},
    }
    job.update(sections)
    return job
