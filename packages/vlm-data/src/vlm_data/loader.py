"""The training input pipeline: a ``DataLoader`` whose workers read, decode,
preprocess and augment samples, fed by a step-indexed batch sampler.

:func:`train_loader` builds it for a map-style dataset: the batch sampler
(:class:`~vlm_data.StepBatchSampler`) yields this rank's micro-batches of each step
starting at the resume step, as ``(index, epoch)`` keys; :class:`TrainView` turns a key
into an augmented sample in a worker (augmentation seeded by (seed, index, epoch), never
the rank) and applies ``on_bad_sample``.  A :class:`~vlm_data.StreamingDataset` gets
:class:`StreamView` instead: one stream per (rank, worker).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from vlm_data.dataset import (
    ImageTextDataset,
    Sample,
    StreamingDataset,
    sample_generator,
)
from vlm_data.errors import CaptionTooLongError, DataError
from vlm_data.sampler import GlobalBatchSampler, SampleKey, StepBatchSampler

__all__ = [
    "MAX_SKIPS",
    "SafeCollate",
    "StreamView",
    "TrainView",
    "raise_batch_error",
    "train_loader",
]

#: consecutive unreadable samples tolerated by ``on_bad_sample = "skip"`` before giving up
MAX_SKIPS = 100

OnBad = Literal["error", "skip"]

#: a collator: samples -> batch (:class:`~vlm_data.ImageTextCollator`, or
#: :class:`~vlm_data.PackingCollator` for packed training rows)
Collate = Callable[[list[Sample]], Any]


def _augmented(dataset: Any, sample: Sample, generator: torch.Generator) -> Sample:
    if "pixel_values" in sample:
        sample = dict(sample)  # type: ignore[assignment]
        sample["pixel_values"] = dataset.augment(sample["pixel_values"], generator)
    return sample


def _error_sample(exc: DataError) -> Sample:
    """A placeholder carrying a data error out of a worker: raised in the training
    process by :func:`raise_batch_error` with its own message (a worker's exception
    would arrive wrapped in the worker's traceback)."""
    return {"meta": {"error": str(exc), "error_type": type(exc).__name__}}


class SafeCollate:
    """The collator of a training loader: a sample carrying an error, or a
    :class:`DataError` of the collator (e.g. a caption too long), becomes a batch
    ``{"error": message}`` that :func:`raise_batch_error` raises in the main process."""

    def __init__(self, collator: Collate) -> None:
        self.collator = collator

    def __call__(self, samples: list[Sample]) -> Any:
        for sample in samples:
            meta = sample.get("meta", {})
            if "error" in meta:
                return {"error": meta["error"], "error_type": meta["error_type"]}
        try:
            return self.collator(samples)
        except DataError as exc:
            return {"error": str(exc), "error_type": type(exc).__name__}


def raise_batch_error(batch: Any) -> None:
    """Raise the :class:`DataError` (or :class:`CaptionTooLongError`) a worker put in
    ``batch`` (see :class:`SafeCollate`); no-op for a normal batch."""
    if isinstance(batch, dict) and "error" in batch:
        cls = CaptionTooLongError if batch.get("error_type") == "CaptionTooLongError" else DataError
        raise cls(batch["error"])


class TrainView(Dataset[Sample]):
    """A training view of a map-style dataset, indexed by :class:`SampleKey`.

    ``view[(index, epoch)]`` is ``dataset[index]`` augmented with
    :func:`~vlm_data.sample_generator` ``(seed, index, epoch)``.  With
    ``on_bad_sample = "skip"``, a sample raising :class:`DataError` is replaced by the
    next readable index (``index + 1``, ...) and its message recorded in the
    replacement's ``meta["skipped"]``; with ``"error"`` the error (prefixed by the
    record, ``dataset.describe(index)``) is returned as an error sample that
    :class:`SafeCollate` and :func:`raise_batch_error` raise in the training process.
    """

    def __init__(self, dataset: ImageTextDataset, *, seed: int, on_bad_sample: OnBad) -> None:
        self.dataset = dataset
        self.seed = seed
        self.on_bad_sample = on_bad_sample

    def __len__(self) -> int:
        return len(self.dataset)

    def _read(self, index: int) -> Sample:
        try:
            return self.dataset[index]
        except DataError as exc:
            where = self.dataset.describe(index)
            text = str(exc)
            raise type(exc)(text if where in text else f"{where}: {text}") from exc

    def __getitem__(self, key: SampleKey | tuple[int, int]) -> Sample:  # type: ignore[override]
        index, epoch = int(key[0]), int(key[1])
        skipped: list[str] = []
        n = len(self.dataset)
        for attempt in range(min(MAX_SKIPS, n) + 1):
            current = (index + attempt) % n
            try:
                sample = self._read(current)
            except DataError as exc:
                if self.on_bad_sample == "error":
                    return _error_sample(exc)
                skipped.append(str(exc))
                continue
            if skipped:
                sample = dict(sample)  # type: ignore[assignment]
                sample["meta"] = {**sample.get("meta", {}), "skipped": skipped}
            # seeded by the requested key, so a replacement is augmented deterministically
            return _augmented(self.dataset, sample, sample_generator(self.seed, index, epoch))
        raise DataError(
            f"on_bad_sample='skip' found {len(skipped)} unreadable samples in a row from "
            f"{self.dataset.describe(index)}; the dataset looks broken. Last: {skipped[-1]}"
        )


class StreamView(IterableDataset[Sample]):
    """One stream of a :class:`StreamingDataset` per (rank, worker): stream
    ``rank * W + worker`` of ``world_size * W`` (``W = max(num_workers, 1)``), epochs
    one after another.  The first ``skip_batches`` micro-batches of this rank are read
    but not decoded (a resume at the same world size and worker count continues the
    stream exactly)."""

    def __init__(
        self,
        dataset: StreamingDataset,
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        micro_batch: int,
        skip_batches: int,
        seed: int,
        on_bad_sample: OnBad,
    ) -> None:
        self.dataset = dataset
        self.rank, self.world_size = rank, world_size
        self.workers = max(num_workers, 1)
        self.micro_batch = micro_batch
        self.skip_batches = skip_batches
        self.seed = seed
        self.on_bad_sample = on_bad_sample

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stream = self.rank * self.workers + worker
        streams = self.world_size * self.workers
        # global micro-batch b comes from worker b % W (the DataLoader reads in order)
        mine = max(0, (self.skip_batches - worker + self.workers - 1) // self.workers)
        to_skip = mine * self.micro_batch
        skipped: list[str] = []
        epoch = 0
        while True:
            produced = False
            for position, record in enumerate(self.dataset.records(stream, streams, epoch)):
                produced = True
                if to_skip:
                    to_skip -= 1
                    continue
                try:
                    sample = self.dataset.decode(record)
                except DataError as exc:
                    if self.on_bad_sample == "error":
                        yield _error_sample(exc)
                        return
                    skipped.append(str(exc))
                    continue
                if skipped:
                    sample = dict(sample)  # type: ignore[assignment]
                    sample["meta"] = {**sample.get("meta", {}), "skipped": skipped}
                    skipped = []
                gen = sample_generator(self.seed, stream * 2**32 + position, epoch)
                yield _augmented(self.dataset, sample, gen)
            if not produced:
                raise DataError(
                    f"stream {stream} of {streams} (rank {self.rank}, worker {worker}) got "
                    "no samples: the dataset has fewer shards/samples than streams"
                )
            epoch += 1


def train_loader(
    dataset: ImageTextDataset | StreamingDataset,
    collator: Collate,
    sampler: GlobalBatchSampler | None,
    *,
    num_micro: int,
    micro_batch: int,
    rank: int,
    world_size: int,
    start_step: int,
    end_step: int,
    seed: int,
    num_workers: int,
    prefetch_factor: int,
    on_bad_sample: OnBad,
    pin_memory: bool,
) -> DataLoader[Any]:
    """The training ``DataLoader`` of one rank (see the module docstring).

    Workers are persistent (forked once, reused when the stream restarts); ``pin_memory``
    should be true only with CUDA.  Pass every batch to :func:`raise_batch_error`.  For a
    map-style dataset, restart the stream at a step with
    ``loader.batch_sampler.start_step = step`` before ``iter(loader)``.
    """
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor}
    if isinstance(dataset, StreamingDataset):
        view = StreamView(
            dataset,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            micro_batch=micro_batch,
            skip_batches=start_step * num_micro,
            seed=seed,
            on_bad_sample=on_bad_sample,
        )
        return DataLoader(
            view,
            batch_size=micro_batch,
            collate_fn=SafeCollate(collator),
            num_workers=num_workers,
            pin_memory=pin_memory,
            **extra,
        )
    if sampler is None:
        raise DataError("a map-style training dataset needs a GlobalBatchSampler")
    batches = StepBatchSampler(
        sampler,
        num_micro=num_micro,
        rank=rank,
        world_size=world_size,
        start_step=start_step,
        end_step=end_step,
    )
    return DataLoader(
        TrainView(dataset, seed=seed, on_bad_sample=on_bad_sample),
        batch_sampler=batches,
        collate_fn=SafeCollate(collator),
        num_workers=num_workers,
        pin_memory=pin_memory,
        **extra,
    )
