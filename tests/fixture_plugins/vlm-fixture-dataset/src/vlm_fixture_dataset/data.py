"""Torch side of ``fixture_shapes``: a map-style dataset built on the vlm-data API."""

from __future__ import annotations

import random

import torch
from PIL import Image

from vlm_data import DatasetContext, ImageTextDataset, Sample
from vlm_fixture_dataset.configs import ShapesDatasetConfig

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class ShapesDataset(ImageTextDataset):
    """Sample ``i`` of a split is a pure function of ``(split, i)``; images are drawn
    and preprocessed when a sample is read (in the loader's workers)."""

    captions_known = True

    def __init__(self, config: ShapesDatasetConfig, context: DatasetContext, split: str) -> None:
        self.config, self.preprocess = config, context.preprocess
        self.split = split
        self.size = config.train_size if split == "train" else config.test_size
        self.names = sorted(COLOURS)

    def __len__(self) -> int:
        return self.size

    def _colour(self, index: int) -> str:
        return self.names[index % len(self.names)]

    def captions(self) -> list[str]:
        return [self._colour(i) for i in range(self.size)]

    def __getitem__(self, index: int) -> Sample:
        rng = random.Random(f"{self.split}-{index}")
        side = self.config.image_size
        square = rng.randint(side // 4, side // 2)
        x, y = rng.randint(0, side - square), rng.randint(0, side - square)
        image = Image.new("RGB", (side, side))
        image.paste(COLOURS[self._colour(index)], (x, y, x + square, y + square))
        return {
            "pixel_values": self.preprocess([image])[0],
            "prompt": self.config.prompt,
            "caption": self._colour(index),
            "meta": {"num_frames": 1},
        }

    def augment(self, pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A horizontal flip with probability 1/2."""
        if torch.rand((), generator=generator) < 0.5:
            return pixel_values.flip(-1)
        return pixel_values


def build_shapes(config: ShapesDatasetConfig, context: DatasetContext) -> dict[str, ShapesDataset]:
    return {split: ShapesDataset(config, context, split) for split in context.splits}
