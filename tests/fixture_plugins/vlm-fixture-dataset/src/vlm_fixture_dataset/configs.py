"""Torch-free config of the ``fixture_shapes`` dataset."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from vlm_config import DatasetConfig


class ShapesDatasetConfig(DatasetConfig):
    """Synthetic images of one coloured square on black; caption = its colour."""

    type: Literal["fixture_shapes"] = "fixture_shapes"
    train_size: int = Field(default=96, ge=1)
    test_size: int = Field(default=24, ge=1)
    image_size: int = Field(default=16, ge=8)
    implementation: ClassVar[str] = "vlm_fixture_dataset.data:build_shapes"
