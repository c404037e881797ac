"""Packing: several samples per training row, no padding between them.

:class:`PackingCollator` turns the samples of one micro-batch into rows of at most
``row_length`` positions holding whole samples back to back, and emits the fields of a
``vlm_strategies.MediaBatch`` (this package imports no model code: the trainer builds
the ``MediaBatch`` from the dict).  A sample occupies

    ``[placeholders] BOS prompt caption EOS``

(``placeholders`` = the arch's placeholder ids per image, only for a sample with an
image or clip), exactly the row the unpacked ``MediaBatch`` path gives it, so its loss
terms are the same tokens.

Which samples share a row is **first-fit decreasing** on the sample lengths (ties by
position in the micro-batch): a pure function of the micro-batch's samples, so a
resumed run, and every world size, packs every step exactly like the uninterrupted run.
Samples and their images are laid out in micro-batch order within a row.

Per position the collator emits:

- ``sequence_ids``: the sample's position in the micro-batch (``0..n-1``); padding is
  :data:`PAD_SEQUENCE_ID` (its own "sample", so it is attended by nothing real);
- ``position_ids``: ``0, 1, ...`` restarting at every sample (the positions the sample
  has alone; ``0`` on padding);
- ``labels``: the sample's labels, with ``-100`` on every sample's first position
  (placeholders, BOS and the prompt are ``-100`` anyway), so no sample is trained to
  predict the first token of the next one, and ``-100`` on padding;
- ``attention_mask`` ``False`` and ``input_ids`` ``pad_id`` on padding (right
  padding, rows trimmed to the longest one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from torch import Tensor

from vlm_data.collate import IGNORE_INDEX, ImageTextCollator
from vlm_data.dataset import Sample
from vlm_data.errors import DataError

__all__ = [
    "MEDIA_FIELDS",
    "PAD_SEQUENCE_ID",
    "PackedBatch",
    "PackingCollator",
    "first_fit_decreasing",
]

#: ``sequence_ids`` value of padding positions
PAD_SEQUENCE_ID = -1


class PackedBatch(TypedDict, total=False):
    """A packed micro-batch (:class:`PackingCollator`); ``R`` rows of ``L`` positions,
    ``N`` images, ``n`` samples.

    The first ten keys are the ``vlm_strategies.MediaBatch`` fields
    (``MediaBatch(**{k: batch[k] for k in MEDIA_FIELDS})``); ``sample_row``,
    ``sample_start`` and ``sample_length`` ``(n,)`` locate every sample (in micro-batch
    order); ``useful_tokens`` counts the real positions; ``prompts``, ``captions``,
    ``meta`` and ``skipped`` are as in :class:`~vlm_data.Batch`.
    """

    input_ids: Tensor
    image_token_id: int
    pixel_values: Tensor
    image_sample_index: Tensor
    frame_mask: Tensor | None
    attention_mask: Tensor
    position_ids: Tensor
    sequence_ids: Tensor
    labels: Tensor
    placeholder_mask: Tensor
    sample_row: Tensor
    sample_start: Tensor
    sample_length: Tensor
    useful_tokens: int
    prompts: list[str]
    captions: list[str]
    meta: list[dict[str, Any]]
    skipped: list[str]


#: the keys of a :class:`PackedBatch` that are ``vlm_strategies.MediaBatch`` fields
MEDIA_FIELDS = (
    "input_ids",
    "image_token_id",
    "pixel_values",
    "image_sample_index",
    "frame_mask",
    "attention_mask",
    "position_ids",
    "sequence_ids",
    "labels",
    "placeholder_mask",
)


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of at most ``capacity`` (sum of lengths) by first-fit decreasing.

    Items are placed longest first (ties: lower index first), each into the first bin
    it fits, else a new bin; each bin lists its items in increasing index order.  A
    pure function of its arguments.

    Raises:
        DataError: an item is longer than ``capacity`` (or not positive).
    """
    for i, n in enumerate(lengths):
        if n < 1 or n > capacity:
            raise DataError(
                f"sample {i} of the micro-batch takes {n} positions; a packed row holds "
                f"{capacity} (data.packed_length)"
            )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


@dataclass(frozen=True)
class _Encoded:
    ids: list[int]
    labels: list[int]
    placeholders: int  # leading placeholder positions (0: text-only)


class PackingCollator:
    """Pack a micro-batch's samples into rows of at most ``row_length`` positions.

    See the module docstring for the layout.  Text is tokenised by ``collator``
    (:meth:`ImageTextCollator.encode`: the same ids and labels as unpacked training,
    and the same ``arch.max_text_len`` limit).

    Args:
        collator: the unpacked collator (tokeniser, ``max_text_len``, ``image_shape``).
        row_length: positions per packed row (``data.packed_length``).
        placeholders_per_image: placeholder ids per image or clip
            (``vlm_strategies.placeholders_per_image(model.num_image_positions)``).
        image_token_id: the id written at placeholder positions (default the
            tokeniser's pad id; ``placeholder_mask`` marks them either way, so it may
            equal a text id).

    Raises (from ``__call__``):
        CaptionTooLongError: a caption does not fit ``max_text_len``.
        DataError: an empty batch, a sample longer than ``row_length``, or images of
            different shapes.
    """

    def __init__(
        self,
        collator: ImageTextCollator,
        *,
        row_length: int,
        placeholders_per_image: int,
        image_token_id: int | None = None,
    ) -> None:
        if row_length < 1:
            raise ValueError(f"row_length must be >= 1, got {row_length}")
        if placeholders_per_image < 1:
            raise ValueError(f"placeholders_per_image must be >= 1, got {placeholders_per_image}")
        self.collator = collator
        self.row_length = row_length
        self.placeholders = placeholders_per_image
        pad = collator.tokenizer.pad_id
        self.image_token_id = pad if image_token_id is None else image_token_id

    def encode(self, sample: Sample) -> _Encoded:
        """One sample's unpadded ids and labels, placeholders first when it has an image."""
        ids, labels = self.collator.encode(sample.get("prompt", ""), sample["caption"])
        k = self.placeholders if "pixel_values" in sample else 0
        return _Encoded(
            [self.image_token_id] * k + ids, [IGNORE_INDEX] * k + labels, placeholders=k
        )

    def sample_lengths(self, samples: Sequence[Sample]) -> list[int]:
        """Positions each sample takes in a packed row."""
        return [len(self.encode(s).ids) for s in samples]

    def __call__(self, samples: Sequence[Sample]) -> PackedBatch:
        if not samples:
            raise DataError("cannot collate an empty batch")
        encoded = [self.encode(s) for s in samples]
        rows = first_fit_decreasing([len(e.ids) for e in encoded], self.row_length)
        width = max(sum(len(encoded[i].ids) for i in row) for row in rows)
        shape = (len(rows), width)
        ids = torch.full(shape, self.collator.tokenizer.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros(shape, dtype=torch.bool)
        placeholder = torch.zeros(shape, dtype=torch.bool)
        positions = torch.zeros(shape, dtype=torch.long)
        sequence = torch.full(shape, PAD_SEQUENCE_ID, dtype=torch.long)
        n = len(samples)
        sample_row = torch.zeros(n, dtype=torch.long)
        sample_start = torch.zeros(n, dtype=torch.long)
        sample_length = torch.zeros(n, dtype=torch.long)
        image_order: list[int] = []  # samples with an image, in row then text order
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                e = encoded[i]
                end = at + len(e.ids)
                ids[r, at:end] = torch.tensor(e.ids)
                labels[r, at:end] = torch.tensor(e.labels)
                labels[r, at] = IGNORE_INDEX  # never predict a sample's first token
                attention[r, at:end] = True
                placeholder[r, at : at + e.placeholders] = True
                positions[r, at:end] = torch.arange(len(e.ids))
                sequence[r, at:end] = i
                sample_row[i], sample_start[i], sample_length[i] = r, at, len(e.ids)
                if e.placeholders:
                    image_order.append(i)
                at = end
        pixels, frame_mask = self._images(samples, image_order)
        skipped = [m for s in samples for m in s.get("meta", {}).get("skipped", [])]
        return {
            "input_ids": ids,
            "image_token_id": self.image_token_id,
            "pixel_values": pixels,
            "image_sample_index": sample_row[image_order],
            "frame_mask": frame_mask,
            "attention_mask": attention,
            "position_ids": positions,
            "sequence_ids": sequence,
            "labels": labels,
            "placeholder_mask": placeholder,
            "sample_row": sample_row,
            "sample_start": sample_start,
            "sample_length": sample_length,
            "useful_tokens": int(attention.sum()),
            "prompts": [s.get("prompt", "") for s in samples],
            "captions": [s["caption"] for s in samples],
            "meta": [s.get("meta", {}) for s in samples],
            "skipped": skipped,
        }

    def _images(self, samples: Sequence[Sample], order: list[int]) -> tuple[Tensor, Tensor | None]:
        """``(N, ...)`` pixels of the samples in ``order`` and their ``(N, F)`` frame mask
        (``None`` unless a sample has one); ``(0, *image_shape)`` when there is none."""
        shapes = {tuple(samples[i]["pixel_values"].shape) for i in order}
        if len(shapes) > 1:
            raise DataError(f"samples of one batch have different pixel shapes: {sorted(shapes)}")
        if not order:
            shape = self.collator.image_shape or (3, 1, 1)
            return torch.zeros((0, *shape)), None
        pixels = torch.stack([samples[i]["pixel_values"] for i in order])
        frame_mask = None
        if any("frame_mask" in samples[i] for i in order):
            frames = pixels.shape[1]
            frame_mask = torch.ones((len(order), frames), dtype=torch.bool)
            for j, i in enumerate(order):
                if "frame_mask" in samples[i]:
                    frame_mask[j] = samples[i]["frame_mask"]
        return pixels, frame_mask
