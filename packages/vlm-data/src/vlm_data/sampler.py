"""Samplers: the global batch of every step as a pure function of the step."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from vlm_data.errors import DataError

__all__ = ["GlobalBatchSampler", "SampleKey", "StepBatchSampler"]


class SampleKey(NamedTuple):
    """What a training ``DataLoader`` asks its dataset for: a sample index and the
    epoch it is drawn in (the augmentation generator's inputs besides the seed)."""

    index: int  # type: ignore[assignment]  # shadows tuple.index, as intended
    epoch: int


class GlobalBatchSampler:
    """The global batch of every optimiser step as a pure function of the step.

    The sample stream is the concatenation of per-epoch permutations (epoch ``e`` uses
    seed ``seed * 1000003 + e``); step ``s`` takes positions ``[s*B, (s+1)*B)``.
    Resuming at a step therefore reproduces the uninterrupted run's batches, and any
    world size sees the same global batches.  :meth:`shard` splits one micro-batch over
    ranks (``rank::world``, like ``DistributedSampler``).

    With ``lengths`` (per-sample, e.g. frames per clip) and ``curriculum_steps > 0``,
    the first ``curriculum_steps`` steps draw (seeded by the step) only samples no
    longer than :meth:`allowed_length` (short clips first), still a pure function of
    the step; their epoch (:meth:`keys`) is ``-1 - step``.
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

    def keys(self, step: int) -> list[SampleKey]:
        """The global batch of ``step`` as ``(index, epoch)`` keys."""
        allowed = self.allowed_length(step)
        if allowed is not None:
            pool = self._by_length[allowed]
            if len(pool):
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * step + 1)
                pick = torch.randint(len(pool), (self.batch_size,), generator=gen)
                return [SampleKey(i, -1 - step) for i in pool[pick].tolist()]
        start = step * self.batch_size
        return [
            SampleKey(self._perm(pos // self.n)[pos % self.n], pos // self.n)
            for pos in range(start, start + self.batch_size)
        ]

    def global_batch(self, step: int) -> list[int]:
        """The sample indices of ``step``'s global batch."""
        return [k.index for k in self.keys(step)]

    def shard_keys(
        self, step: int, micro: int, num_micro: int, rank: int = 0, world_size: int = 1
    ) -> list[SampleKey]:
        """Keys of micro-batch ``micro`` (of ``num_micro``) of ``step`` for ``rank``."""
        batch = self.keys(step)
        size = self.batch_size // num_micro
        return batch[micro * size : (micro + 1) * size][rank::world_size]

    def shard(
        self, step: int, micro: int, num_micro: int, rank: int = 0, world_size: int = 1
    ) -> list[int]:
        """Indices of micro-batch ``micro`` (of ``num_micro``) of ``step`` for ``rank``."""
        return [k.index for k in self.shard_keys(step, micro, num_micro, rank, world_size)]


class StepBatchSampler:
    """A ``DataLoader`` ``batch_sampler``: this rank's micro-batches of steps
    ``start_step, start_step + 1, ...`` (``num_micro`` per step) up to ``end_step``.

    Set :attr:`start_step` before ``iter(loader)`` to restart the stream at a step (a
    resume, or after steps fed from elsewhere); nothing else holds state.
    """

    def __init__(
        self,
        sampler: GlobalBatchSampler,
        *,
        num_micro: int,
        rank: int,
        world_size: int,
        start_step: int,
        end_step: int,
    ) -> None:
        self.sampler = sampler
        self.num_micro = num_micro
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step
        self.end_step = end_step

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for step in range(self.start_step, self.end_step):
            for micro in range(self.num_micro):
                yield self.sampler.shard_keys(
                    step, micro, self.num_micro, self.rank, self.world_size
                )

    def __len__(self) -> int:
        return max(self.end_step - self.start_step, 0) * self.num_micro
