"""Torch-free configs of the built-in datasets (entry-point group ``vlm.datasets``).

Each class adds its own fields to the common ones of :class:`vlm_config.DatasetConfig`
and names its builder in ``implementation``; the builder modules import torch and are
imported only when a dataset is built.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from vlm_config import DatasetConfig

__all__ = [
    "DigitsDatasetConfig",
    "DigitsVideoDatasetConfig",
    "HFDatasetConfig",
    "JsonlDatasetConfig",
    "WebDatasetConfig",
]


class DigitsDatasetConfig(DatasetConfig):
    """scikit-learn's embedded 8x8 digits as captioning ("seven"), no download; a fixed,
    stratified, seeded train/test split.  Needs ``vlm-data[digits]`` (scikit-learn)."""

    type: Literal["digits"] = "digits"
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    split_seed: int = 0
    augment_shift: int = Field(
        default=0, ge=0, le=3, description="random shift of the 8x8 source by up to N pixels"
    )
    implementation: ClassVar[str] = "vlm_data.digits:build_digits"


class DigitsVideoDatasetConfig(DigitsDatasetConfig):
    """Clips of ``min_frames..max_frames`` digit frames (padded to
    ``arch.frames_per_clip`` with a ``frame_mask``); caption = the digits in order."""

    type: Literal["digits_video"] = "digits_video"  # type: ignore[assignment]
    min_frames: int = Field(default=1, ge=1)
    max_frames: int | None = Field(default=None, ge=1, description="None: arch.frames_per_clip")
    train_clips: int = Field(default=6000, ge=1)
    test_clips: int = Field(default=800, ge=1)
    curriculum_steps: int = Field(
        default=0, ge=0, description="raise the longest clip 1..max over these steps"
    )
    implementation: ClassVar[str] = "vlm_data.digits:build_digits_video"

    @model_validator(mode="after")
    def _frames(self) -> DigitsVideoDatasetConfig:
        if self.max_frames is not None and self.max_frames < self.min_frames:
            raise ValueError(
                f"max_frames ({self.max_frames}) must be >= min_frames ({self.min_frames})"
            )
        return self


class JsonlDatasetConfig(DatasetConfig):
    """JSONL manifests of local image files and text, one object per line::

        {"image": "a.png", "caption": "...", "prompt": "..."}   # an image sample
        {"images": ["f0.png", "f1.png"], "caption": "..."}       # a clip
        {"caption": "..."}                                        # a text-only sample

    Relative paths are resolved against the manifest's folder.
    """

    type: Literal["jsonl"] = "jsonl"
    train_file: str = Field(description="training manifest (.jsonl)")
    test_file: str | None = Field(default=None, description="held-out manifest (.jsonl)")
    implementation: ClassVar[str] = "vlm_data.jsonl:build_jsonl"


class HFDatasetConfig(DatasetConfig):
    """A local Hugging Face ``datasets`` folder (``save_to_disk``) with an image column
    and a text column.  Needs ``vlm-data[hf]``; nothing is downloaded."""

    type: Literal["hf"] = "hf"
    path: str = Field(description="folder written by Dataset(Dict).save_to_disk")
    name: str | None = Field(default=None, description="configuration name (load_dataset)")
    train_split: str = "train"
    test_split: str = "test"
    image_column: str = "image"
    text_column: str = "text"
    implementation: ClassVar[str] = "vlm_data.hf:build_hf"


class WebDatasetConfig(DatasetConfig):
    """Tar shards in the WebDataset layout (files sharing a key form a sample:
    ``000123.jpg`` + ``000123.txt``), streamed without loading them into memory and
    split by rank and worker.  Shards are paths or glob patterns (relative to the
    working directory); each sample needs an image (one of ``image_extensions``,
    unless ``allow_text_only``) and a ``caption_extension`` text member."""

    type: Literal["webdataset"] = "webdataset"
    train_shards: list[str] = Field(min_length=1, description="tar files or glob patterns")
    test_shards: list[str] = Field(default_factory=list)
    image_extensions: list[str] = Field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    caption_extension: str = "txt"
    allow_text_only: bool = False
    shuffle_shards: bool = Field(default=True, description="reshuffle shard order each epoch")
    implementation: ClassVar[str] = "vlm_data.webdataset:build_webdataset"
