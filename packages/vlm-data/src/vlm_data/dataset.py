"""The dataset implementation API (torch side of the ``vlm.datasets`` plugin group).

A dataset plugin is a torch-free config class (a :class:`vlm_config.DatasetConfig`
subclass registered under ``vlm.datasets``) whose ``implementation`` names a builder::

    def build(config, context: DatasetContext) -> dict[str, Dataset]: ...

returning a ``"train"`` split and, when the dataset has held-out data, a ``"test"``
split.  A split is either

* a map-style :class:`ImageTextDataset` (``__len__``, ``__getitem__(index) -> Sample``,
  optionally ``augment`` and ``lengths``): the trainer samples it with
  :class:`~vlm_data.GlobalBatchSampler`, so every random choice is a function of the
  seed, the sample index and the epoch; or
* a :class:`StreamingDataset` (``records(stream_id, num_streams, epoch)`` and
  ``decode(record) -> Sample``): shards are split over every rank and worker
  (``webdataset``).

A :class:`Sample` is a dict: ``pixel_values`` (``(3, H, W)``, or ``(F, 3, H, W)`` for a
clip padded to ``F`` frames, absent for a text-only sample), ``frame_mask`` (clips),
``prompt``, ``caption`` and free-form ``meta``.  Samples are built in ``DataLoader``
workers: decode and preprocess there (``context.preprocess``), not in ``__init__``,
unless the whole dataset is tiny.  Raise :class:`~vlm_data.DataError` naming the file,
the record and what is wrong for a sample that cannot be read; the loader applies
``on_bad_sample``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vlm_config import DatasetConfig, load_implementation
from vlm_data.errors import DataError

__all__ = [
    "Batch",
    "DatasetContext",
    "ImageTextDataset",
    "Preprocess",
    "Sample",
    "StreamingDataset",
    "build_datasets",
    "sample_generator",
]

#: PIL images -> float32 ``(B, 3, S, S)`` pixels (the encoder's ``preprocess``)
Preprocess = Callable[[list[Any]], Tensor]


class Sample(TypedDict, total=False):
    """One image-text (or text-only) sample; see the module docstring."""

    pixel_values: Tensor
    frame_mask: Tensor
    prompt: str
    caption: str
    meta: dict[str, Any]


class Batch(TypedDict, total=False):
    """A collated micro-batch (:class:`~vlm_data.ImageTextCollator`).

    ``image_mask`` ``(B,)`` bool is ``False`` for text-only samples (whose
    ``pixel_values`` rows are zeros); ``skipped`` lists the bad samples replaced in this
    batch (``on_bad_sample = "skip"``).
    """

    pixel_values: Tensor
    frame_mask: Tensor | None
    image_mask: Tensor
    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor
    prompts: list[str]
    captions: list[str]
    meta: list[dict[str, Any]]
    skipped: list[str]


@dataclass(frozen=True)
class DatasetContext:
    """What a dataset builder gets besides its config.

    Attributes:
        preprocess: the vision encoder's image processor (PIL images ->
            ``(B, 3, S, S)`` float pixels); picklable enough for forked workers.
        frames_per_clip: ``arch.frames_per_clip`` (``> 1``: every sample is a clip).
        splits: the splits wanted (``("train", "test")``, or one for ``vlm eval``).
        seed: ``train.seed``.
    """

    preprocess: Preprocess
    frames_per_clip: int = 1
    splits: tuple[str, ...] = ("train", "test")
    seed: int = 0


class ImageTextDataset(Dataset[Sample]):
    """Base of map-style image-text datasets: ``__len__`` and ``__getitem__ -> Sample``.

    ``captions()`` lists every caption (used to train a tokeniser); the default reads
    the items, subclasses override it with something cheaper.  ``describe(index)`` names
    a record in error messages.

    Class attributes:
        captions_known: ``captions()`` decodes nothing, so the trainer checks before the
            first step that every caption fits ``arch.max_text_len``.
        curriculum_steps: with a ``lengths()`` method (per-sample lengths, e.g. frames),
            the first ``curriculum_steps`` steps draw short samples first
            (:class:`~vlm_data.GlobalBatchSampler`).
    """

    captions_known: bool = False
    curriculum_steps: int = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        raise NotImplementedError

    def captions(self) -> list[str]:
        return [self[i]["caption"] for i in range(len(self))]

    def augment(self, pixel_values: Tensor, generator: torch.Generator) -> Tensor:
        """Training-time augmentation of ONE sample's pixels (``(3, H, W)`` or
        ``(F, 3, H, W)``); default: none.  ``generator`` is seeded from (seed, sample
        index, epoch) only (:func:`sample_generator`), never from the rank, so any world
        size and any resume point sees the same pixels."""
        return pixel_values

    def describe(self, index: int) -> str:
        """Where sample ``index`` comes from, for messages (default: its index)."""
        return f"sample {index}"


class StreamingDataset(torch.utils.data.IterableDataset[Sample]):
    """Base of datasets streamed in order (larger than memory).

    :meth:`records` yields the raw records of stream ``stream_id`` of ``num_streams``
    (one stream per rank and ``DataLoader`` worker) for ``epoch``; the streams of one
    epoch partition the data.  :meth:`decode` turns a record into a :class:`Sample`
    (in the worker; a resume skips records without decoding them).  ``captions()``
    may return an empty list when the config names a tokeniser.
    """

    def records(self, stream_id: int, num_streams: int, epoch: int) -> Iterator[Any]:
        raise NotImplementedError

    def decode(self, record: Any) -> Sample:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Sample]:
        return (self.decode(r) for r in self.records(0, 1, 0))

    def captions(self) -> list[str]:
        return []

    def augment(self, pixel_values: Tensor, generator: torch.Generator) -> Tensor:
        """As :meth:`ImageTextDataset.augment`."""
        return pixel_values


def sample_generator(seed: int, index: int, epoch: int) -> torch.Generator:
    """The generator of sample ``index`` in ``epoch``: a pure function of the three."""
    key = ((seed * 1_000_003 + epoch) * 2_654_435_761 + index) % (2**63 - 1)
    return torch.Generator().manual_seed(key)


def build_datasets(config: DatasetConfig, context: DatasetContext) -> dict[str, Any]:
    """Call the config's builder (its ``implementation``) and check what it returns.

    Raises:
        DataError: the builder returned no ``"train"`` split while one was asked for, or
            something that is not a dict of datasets.
    """
    builder = load_implementation(config)
    sets = builder(config, context)
    if not isinstance(sets, dict):
        raise DataError(
            f"{type(config).__qualname__}.implementation returned {type(sets).__name__}, "
            "expected a dict of split name -> dataset"
        )
    for split in context.splits:
        if split == "train" and split not in sets:
            raise DataError(f"the {config.type!r} dataset has no 'train' split")
    return {k: v for k, v in sets.items() if k in context.splits}
