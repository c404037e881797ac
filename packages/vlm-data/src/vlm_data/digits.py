"""The embedded default data: scikit-learn's 8x8 digits as image / clip captioning.

``load_digits`` ships inside scikit-learn (no download).  Images are grey 8x8 arrays
(0..16) turned into PIL images and upscaled to the encoder's resolution by the
encoder's own ``preprocess`` (its image processor).  The train/test split is a fixed,
stratified, seeded split of the 1797 images; clips draw their frames from the images
of their own split only, so held-out clips contain only held-out digits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from vlm_data.dataset import DatasetContext, ImageTextDataset, Preprocess, Sample
from vlm_data.errors import DataError
from vlm_data.images import pad_clip, random_shift

if TYPE_CHECKING:
    from vlm_data.configs import DigitsDatasetConfig, DigitsVideoDatasetConfig

__all__ = [
    "DIGIT_WORDS",
    "DigitsCaptionDataset",
    "DigitsVideoDataset",
    "build_digits",
    "build_digits_video",
    "digit_images",
    "digits_split",
]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digits_split(test_fraction: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
    """Indices of the ``train`` and ``test`` split (stratified by digit, seeded)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train, test = train_test_split(
        np.arange(len(target)), test_size=test_fraction, random_state=seed, stratify=target
    )
    return {"train": np.sort(train), "test": np.sort(test)}


def digit_images(indices: np.ndarray | None = None) -> tuple[list, np.ndarray]:
    """PIL ``L`` images (8x8, ink bright on black) and labels of the given indices."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    idx = np.arange(len(digits.target)) if indices is None else indices
    images = [
        Image.fromarray(np.clip(digits.images[i] * 255.0 / 16.0, 0, 255).astype(np.uint8), "L")
        for i in idx
    ]
    return images, digits.target[idx]


def _preprocess_all(preprocess: Preprocess, images: list, chunk: int = 512) -> Tensor:
    out = [
        preprocess([im.convert("RGB") for im in images[i : i + chunk]])
        for i in range(0, len(images), chunk)
    ]
    return torch.cat(out).contiguous()


class DigitsCaptionDataset(ImageTextDataset):
    captions_known = True

    """Digit image -> caption naming it ("seven").

    Pixels are preprocessed once at construction (1797 tiny images); the training
    augmentation (a random shift) runs per sample in the loader's workers.

    Args:
        split: ``"train"`` or ``"test"``.
        preprocess: the encoder's ``preprocess`` (PIL images -> ``(B, 3, S, S)``).
    """

    def __init__(
        self,
        split: str,
        preprocess: Preprocess,
        *,
        test_fraction: float = 0.2,
        seed: int = 0,
        prompt: str = "",
        augment_shift: int = 0,
    ) -> None:
        if split not in ("train", "test"):
            raise DataError(f"split must be 'train' or 'test', got {split!r}")
        self.split = split
        self.prompt = prompt
        self.indices = digits_split(test_fraction, seed)[split]
        images, self.labels = digit_images(self.indices)
        self.pixels = _preprocess_all(preprocess, images)
        self.augment_shift = augment_shift
        # one source pixel in the upscaled image; the background value after normalisation
        self.shift_unit = max(self.pixels.shape[-1] // 8, 1)
        self.background = float(self.pixels[:, :, 0, 0].mode(dim=0).values[0])

    @property
    def augments(self) -> bool:
        """Whether :meth:`augment` changes pixels (``augment_shift > 0``)."""
        return self.augment_shift > 0

    def augment(self, pixel_values: Tensor, generator: torch.Generator) -> Tensor:
        """Random translation of one sample (each frame of a clip on its own) by up to
        ``augment_shift`` source pixels of the 8x8 grid."""
        return random_shift(
            pixel_values, self.augment_shift, self.shift_unit, self.background, generator
        )

    def __len__(self) -> int:
        return len(self.labels)

    def captions(self) -> list[str]:
        return [DIGIT_WORDS[int(y)] for y in self.labels]

    def describe(self, index: int) -> str:
        return f"digits {self.split} sample {index}"

    def __getitem__(self, index: int) -> Sample:
        label = int(self.labels[index])
        return {
            "pixel_values": self.pixels[index],
            "prompt": self.prompt,
            "caption": DIGIT_WORDS[label],
            "meta": {"num_frames": 1, "digits": [label], "source_index": int(self.indices[index])},
        }


class DigitsVideoDataset(ImageTextDataset):
    captions_known = True

    """Clips of ``min_frames..max_frames`` digit frames; caption = the digits in order.

    Clip ``i`` of a split is a pure function of ``(seed, split, i)``: its length is
    uniform in ``[min_frames, max_frames]`` and its frames are drawn (with replacement)
    from the split's images.  Clips are padded to ``frames_per_clip`` with zero frames
    and a ``frame_mask``.
    """

    def __init__(
        self,
        split: str,
        preprocess: Preprocess,
        *,
        num_clips: int,
        frames_per_clip: int,
        min_frames: int = 1,
        max_frames: int | None = None,
        test_fraction: float = 0.2,
        seed: int = 0,
        prompt: str = "",
        images: DigitsCaptionDataset | None = None,
        augment_shift: int = 0,
        curriculum_steps: int = 0,
    ) -> None:
        self.curriculum_steps = curriculum_steps
        max_frames = max_frames or frames_per_clip
        if not 1 <= min_frames <= max_frames <= frames_per_clip:
            raise DataError(
                f"need 1 <= min_frames ({min_frames}) <= max_frames ({max_frames}) <= "
                f"frames_per_clip ({frames_per_clip})"
            )
        self.images = images or DigitsCaptionDataset(
            split, preprocess, test_fraction=test_fraction, seed=seed, augment_shift=augment_shift
        )
        self.split = split
        self.prompt = prompt
        self.frames_per_clip = frames_per_clip
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, 7])
        lengths = rng.integers(min_frames, max_frames + 1, size=num_clips)
        self.clips = [rng.integers(0, len(self.images), size=int(n)) for n in lengths]

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def augments(self) -> bool:
        """Whether :meth:`augment` changes pixels (``augment_shift > 0``)."""
        return self.images.augments

    def augment(self, pixel_values: Tensor, generator: torch.Generator) -> Tensor:
        return self.images.augment(pixel_values, generator)

    def lengths(self) -> list[int]:
        """Real frames of every clip (used by the curriculum sampler)."""
        return [len(c) for c in self.clips]

    def _digits(self, index: int) -> list[int]:
        return [int(self.images.labels[j]) for j in self.clips[index]]

    def captions(self) -> list[str]:
        return [" ".join(DIGIT_WORDS[d] for d in self._digits(i)) for i in range(len(self))]

    def __getitem__(self, index: int) -> Sample:
        frames = self.images.pixels[torch.as_tensor(self.clips[index])]
        pixels, mask = pad_clip(frames, self.frames_per_clip)
        digits = self._digits(index)
        return {
            "pixel_values": pixels,
            "frame_mask": mask,
            "prompt": self.prompt,
            "caption": " ".join(DIGIT_WORDS[d] for d in digits),
            "meta": {"num_frames": len(digits), "digits": digits},
        }


def build_digits(
    config: DigitsDatasetConfig, context: DatasetContext
) -> dict[str, ImageTextDataset]:
    """Builder of the ``digits`` dataset (still images only)."""
    if context.frames_per_clip != 1:
        raise DataError(
            f"data.type='digits' is still images but arch.frames_per_clip="
            f"{context.frames_per_clip}; use data.type='digits_video'"
        )
    return {
        split: DigitsCaptionDataset(
            split,
            context.preprocess,
            test_fraction=config.test_fraction,
            seed=config.split_seed,
            prompt=config.prompt,
            augment_shift=config.augment_shift if split == "train" else 0,
        )
        for split in context.splits
    }


def build_digits_video(
    config: DigitsVideoDatasetConfig, context: DatasetContext
) -> dict[str, ImageTextDataset]:
    """Builder of the ``digits_video`` dataset (clips of ``arch.frames_per_clip``)."""
    return {
        split: DigitsVideoDataset(
            split,
            context.preprocess,
            num_clips=config.train_clips if split == "train" else config.test_clips,
            frames_per_clip=context.frames_per_clip,
            min_frames=config.min_frames,
            max_frames=config.max_frames,
            test_fraction=config.test_fraction,
            seed=config.split_seed,
            prompt=config.prompt,
            augment_shift=config.augment_shift if split == "train" else 0,
            curriculum_steps=config.curriculum_steps if split == "train" else 0,
        )
        for split in context.splits
    }
