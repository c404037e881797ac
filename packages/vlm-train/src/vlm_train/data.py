"""Map-style image-text datasets, the collator and the global-batch sampler.

A dataset item is a :class:`Sample` dict: ``pixel_values`` (``(3, H, W)`` for an image,
``(F, 3, H, W)`` for a clip padded to ``F`` frames), ``frame_mask`` (``(F,)`` bool,
clips only), ``prompt`` and ``caption`` strings, and ``meta`` (free-form, e.g. the real
frame count).  The :class:`ImageTextCollator` tokenises prompt and caption separately
and pads every sequence to the same ``max_text_len``, so every rank of a data-parallel
job sees identical shapes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vlm_strategies import IGNORE_INDEX
from vlm_train.errors import CaptionTooLongError, DataError
from vlm_train.tokenizer import TextTokenizer

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "FilesDataset",
    "GlobalBatchSampler",
    "HFImageTextDataset",
    "ImageTextCollator",
    "ImageTextDataset",
    "Preprocess",
    "Sample",
    "load_image",
    "random_shift",
]


#: PIL images -> float32 ``(B, 3, S, S)`` pixels (the encoder's ``preprocess``)
Preprocess = Callable[[list[Any]], Tensor]


class Sample(TypedDict, total=False):
    pixel_values: Tensor
    frame_mask: Tensor
    prompt: str
    caption: str
    meta: dict[str, Any]


class Batch(TypedDict):
    pixel_values: Tensor
    frame_mask: Tensor | None
    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor
    prompts: list[str]
    captions: list[str]
    meta: list[dict[str, Any]]


class ImageTextDataset(Dataset[Sample]):
    """Base of map-style image-text datasets: ``__len__`` and ``__getitem__ -> Sample``.

    ``captions()`` lists every caption (used to train a tokeniser); the default reads
    the items, subclasses override it with something cheaper.
    """

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        raise NotImplementedError

    def captions(self) -> list[str]:
        return [self[i]["caption"] for i in range(len(self))]

    def augment(self, pixel_values: Tensor, generator: torch.Generator) -> Tensor:
        """Training-time augmentation of a collated ``(B, ..., 3, H, W)`` batch (default:
        none).  ``generator`` is seeded from the step, so resumed runs augment alike."""
        return pixel_values


def random_shift(
    pixel_values: Tensor, max_shift: int, unit: int, fill: float, generator: torch.Generator
) -> Tensor:
    """Translate each image of ``(B, ..., 3, H, W)`` by up to ``max_shift * unit`` pixels
    (a whole number of ``unit`` steps) in x and y, filling with ``fill``."""
    if max_shift <= 0:
        return pixel_values
    shape = pixel_values.shape
    flat = pixel_values.reshape(-1, *shape[-3:])
    pad = max_shift * unit
    padded = torch.nn.functional.pad(flat, (pad, pad, pad, pad), value=fill)
    shifts = torch.randint(-max_shift, max_shift + 1, (flat.shape[0], 2), generator=generator)
    h, w = shape[-2], shape[-1]
    out = torch.empty_like(flat)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        y0, x0 = pad - dy * unit, pad - dx * unit
        out[i] = padded[i, :, y0 : y0 + h, x0 : x0 + w]
    return out.view(shape)


def load_image(path: str | Path) -> Any:
    """Open an image file with PIL as RGB (fully decoded before it is returned).

    Raises:
        DataError: the file is missing, is not a readable image, is truncated, or has
            more pixels than Pillow's decompression-bomb limit
            (``2 * PIL.Image.MAX_IMAGE_PIXELS``); the message names the file.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"cannot read image {path}: too large to decode safely: {exc} "
            f"(Pillow's PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}; raise it "
            "only for images you trust)"
        ) from exc
    except OSError as exc:  # incl. UnidentifiedImageError: not an image format PIL knows
        if "truncated" in str(exc):
            raise DataError(
                f"cannot read image {path}: the file is truncated (incomplete copy or "
                f"download?): {exc}"
            ) from exc
        raise DataError(f"cannot read image {path}: {exc}") from exc
    except (ValueError, SyntaxError) as exc:  # malformed headers
        raise DataError(f"cannot read image {path}: {exc}") from exc


def _pad_clip(frames: Tensor, frames_per_clip: int) -> tuple[Tensor, Tensor]:
    """``(n, 3, H, W)`` -> ``(F, 3, H, W)`` zero-padded and its ``(F,)`` frame mask."""
    n = frames.shape[0]
    if n > frames_per_clip:
        raise DataError(f"a clip has {n} frames, more than frames_per_clip={frames_per_clip}")
    if n < 1:
        raise DataError("a clip needs at least one frame")
    out = frames.new_zeros((frames_per_clip, *frames.shape[1:]))
    out[:n] = frames
    mask = torch.zeros(frames_per_clip, dtype=torch.bool)
    mask[:n] = True
    return out, mask


class FilesDataset(ImageTextDataset):
    """Image-text pairs listed in a JSONL manifest, images read with PIL.

    Each line: ``{"image": "path.png", "caption": "...", "prompt": "..."}`` or, for a
    clip, ``"images": ["f0.png", "f1.png"]``.  Relative paths are relative to the
    manifest's folder.  Images are decoded and preprocessed on access.

    Args:
        frames_per_clip: ``> 1`` makes every item a clip padded to this many frames.
    """

    def __init__(
        self,
        manifest: str | Path,
        preprocess: Preprocess,
        *,
        prompt: str = "",
        frames_per_clip: int = 1,
    ) -> None:
        self.manifest = Path(manifest)
        self.preprocess = preprocess
        self.prompt = prompt
        self.frames_per_clip = frames_per_clip
        if not self.manifest.is_file():
            raise DataError(f"manifest not found: {self.manifest}")
        self.rows: list[dict[str, Any]] = []
        for n, line in enumerate(self.manifest.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{self.manifest}:{n}: not valid JSON: {exc}") from exc
            if not isinstance(row, dict) or "caption" not in row:
                raise DataError(f"{self.manifest}:{n}: needs a 'caption' and an 'image'")
            images = row.get("images", [row["image"]] if "image" in row else None)
            if not images:
                raise DataError(f"{self.manifest}:{n}: needs 'image' or 'images'")
            row["images"] = [str(self.manifest.parent / p) for p in images]
            self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def captions(self) -> list[str]:
        return [str(r["caption"]) for r in self.rows]

    def __getitem__(self, index: int) -> Sample:
        row = self.rows[index]
        pixels = self.preprocess([load_image(p) for p in row["images"]])
        sample: Sample = {
            "prompt": str(row.get("prompt", self.prompt)),
            "caption": str(row["caption"]),
            "meta": {"num_frames": len(row["images"])},
        }
        if self.frames_per_clip > 1:
            sample["pixel_values"], sample["frame_mask"] = _pad_clip(pixels, self.frames_per_clip)
        else:
            if pixels.shape[0] != 1:
                raise DataError(f"item {index} lists several images but frames_per_clip is 1")
            sample["pixel_values"] = pixels[0]
        return sample


class HFImageTextDataset(ImageTextDataset):
    """A Hugging Face ``datasets`` split with an image column and a text column.

    ``datasets`` is imported lazily (install the ``vlm-train[datasets]`` extra).
    ``path`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
    or anything ``datasets.load_dataset`` reads locally (e.g. ``"imagefolder"`` with
    ``data_dir``); nothing is downloaded by this class itself.
    """

    def __init__(
        self,
        path: str,
        split: str,
        preprocess: Preprocess,
        *,
        name: str | None = None,
        image_column: str = "image",
        text_column: str = "text",
        prompt: str = "",
    ) -> None:
        try:
            import datasets
        except ImportError as exc:
            raise DataError(
                "data.source='hf' needs the 'datasets' package: pip install 'vlm-train[datasets]'"
            ) from exc
        self.preprocess = preprocess
        self.prompt = prompt
        self.image_column = image_column
        self.text_column = text_column
        local = Path(path).expanduser()
        try:
            if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
                loaded = datasets.load_from_disk(str(local))
                ds = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
            else:
                ds = datasets.load_dataset(path, name, split=split)
        except Exception as exc:
            raise DataError(f"cannot load dataset {path!r} split {split!r}: {exc}") from exc
        missing = [c for c in (image_column, text_column) if c not in ds.column_names]
        if missing:
            raise DataError(
                f"dataset {path!r} has no column(s) {missing}; columns: {ds.column_names}"
            )
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def captions(self) -> list[str]:
        return [str(t) for t in self.ds[self.text_column]]

    def __getitem__(self, index: int) -> Sample:
        row = self.ds[int(index)]
        image = row[self.image_column]
        if isinstance(image, (str, Path)):
            image = load_image(image)
        else:
            image = image.convert("RGB")
        return {
            "pixel_values": self.preprocess([image])[0],
            "prompt": self.prompt,
            "caption": str(row[self.text_column]),
            "meta": {"num_frames": 1},
        }


class ImageTextCollator:
    """Stack pixels and tokenise text into fixed-length ``(B, max_text_len)`` tensors.

    Text layout: ``[BOS] prompt caption [EOS] [PAD]...``.  Prompt and caption are
    tokenised separately, so ``labels`` are exactly ``-100`` on BOS, the prompt and the
    padding and equal ``input_ids`` on the caption and its EOS.

    Raises (from ``__call__`` / :meth:`encode`):
        CaptionTooLongError: BOS + prompt + caption + EOS exceed ``max_text_len``.
    """

    def __init__(self, tokenizer: TextTokenizer, max_text_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len

    def prompt_ids(self, prompt: str) -> list[int]:
        return [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]

    def encode(self, prompt: str, caption: str) -> tuple[list[int], list[int]]:
        """Unpadded ``(input_ids, labels)`` of one sample."""
        head = self.prompt_ids(prompt)
        tail = [*self.tokenizer.encode(caption), self.tokenizer.eos_id]
        if len(head) + len(tail) > self.max_text_len:
            raise CaptionTooLongError(
                f"prompt + caption take {len(head) + len(tail)} tokens (with BOS/EOS) but "
                f"arch.max_text_len is {self.max_text_len}: {caption[:60]!r}"
            )
        return head + tail, [IGNORE_INDEX] * len(head) + tail

    def max_new_tokens(self, prompt: str) -> int:
        """Room left after ``prompt`` for generated tokens."""
        return self.max_text_len - len(self.prompt_ids(prompt))

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        if not samples:
            raise DataError("cannot collate an empty batch")
        size = self.max_text_len
        ids = torch.full((len(samples), size), self.tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), size), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), size), dtype=torch.bool)
        for row, sample in enumerate(samples):
            x, y = self.encode(sample.get("prompt", ""), sample["caption"])
            ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(y)] = torch.tensor(y)
            mask[row, : len(x)] = True
        has_mask = "frame_mask" in samples[0]
        return {
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "frame_mask": torch.stack([s["frame_mask"] for s in samples]) if has_mask else None,
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask,
            "prompts": [s.get("prompt", "") for s in samples],
            "captions": [s["caption"] for s in samples],
            "meta": [s.get("meta", {}) for s in samples],
        }

    def prompt_batch(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Left-padded ``(B, P)`` prompt ids (BOS + prompt) and their attention mask."""
        encoded = [self.prompt_ids(p) for p in prompts]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.bool)
        for row, e in enumerate(encoded):
            ids[row, width - len(e) :] = torch.tensor(e)
            mask[row, width - len(e) :] = True
        return ids, mask


class GlobalBatchSampler:
    """The global batch of every optimiser step as a pure function of the step.

    The sample stream is the concatenation of per-epoch permutations (epoch ``e`` uses
    seed ``seed + e``); step ``s`` takes positions ``[s*B, (s+1)*B)``.  Resuming at a
    step therefore reproduces the uninterrupted run's batches, and any world size sees
    the same global batches.  :meth:`shard` splits one micro-batch over ranks
    (``rank::world``, like ``DistributedSampler``).

    With ``lengths`` (per-sample, e.g. frames per clip) and ``curriculum_steps > 0``,
    the first ``curriculum_steps`` steps draw (seeded by the step) only samples no
    longer than :meth:`allowed_length` (short clips first), still a pure function of
    the step.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        *,
        lengths: Sequence[int] | None = None,
        curriculum_steps: int = 0,
    ) -> None:
        if num_samples < 1:
            raise DataError("the training dataset is empty")
        self.n = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self._perms: dict[int, list[int]] = {}
        self.curriculum_steps = curriculum_steps if lengths is not None else 0
        self._by_length: dict[int, Tensor] = {}
        if lengths is not None and curriculum_steps > 0:
            lens = torch.as_tensor(list(lengths))
            self.max_length = int(lens.max())
            for k in range(1, self.max_length + 1):
                self._by_length[k] = torch.nonzero(lens <= k).flatten()

    def allowed_length(self, step: int) -> int | None:
        """Longest sample (e.g. clip length) allowed at ``step`` by the curriculum:
        ``1, 2, ..., max`` in equal stages over ``curriculum_steps``; ``None`` = all."""
        if step >= self.curriculum_steps:
            return None
        return 1 + (step * self.max_length) // self.curriculum_steps

    def _perm(self, epoch: int) -> list[int]:
        perm = self._perms.get(epoch)
        if perm is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=gen).tolist()
            self._perms = {epoch: perm}  # keep one epoch cached
        return perm

    def global_batch(self, step: int) -> list[int]:
        allowed = self.allowed_length(step)
        if allowed is not None:
            pool = self._by_length[allowed]
            if len(pool):
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * step + 1)
                pick = torch.randint(len(pool), (self.batch_size,), generator=gen)
                return pool[pick].tolist()
        start = step * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            out.append(self._perm(pos // self.n)[pos % self.n])
        return out

    def shard(
        self, step: int, micro: int, num_micro: int, rank: int = 0, world_size: int = 1
    ) -> list[int]:
        """Indices of micro-batch ``micro`` (of ``num_micro``) of ``step`` for ``rank``."""
        batch = self.global_batch(step)
        size = self.batch_size // num_micro
        return batch[micro * size : (micro + 1) * size][rank::world_size]
