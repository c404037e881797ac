"""``train(job)``: the whole run in one call, driving a :class:`vlm_train.Trainer`.

Kept as the one-line entry point of the CLI, the docs and notebooks; the Trainer holds
the loop (setup, step, checkpoint, evaluate, finish).
"""

from __future__ import annotations

from collections.abc import Callable

from vlm_config import JobConfig
from vlm_train.trainer import Trainer, TrainResult, build_optimizer, build_scheduler

__all__ = ["TrainResult", "build_optimizer", "build_scheduler", "train"]


def train(
    job: JobConfig,
    *,
    log: Callable[[str], None] = print,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Train ``job`` to ``train.steps`` (resuming from ``train.output_dir`` when possible),
    then evaluate on the held-out split, export the model and plot the loss curve.

    Every rank of a ``torchrun`` job calls this with the same config.  Equivalent to
    ``with Trainer(job, log=log) as t: return t.run(stop_after_steps)``.

    Args:
        log: where the main rank's messages go.
        stop_after_steps: run at most this many steps in this call, then save a
            checkpoint and return as if interrupted (``interrupted == 0``); for
            time-sliced jobs and resume tests.

    Raises:
        ConfigError: the config cannot resume its run folder, or its model cannot be
            built (see :meth:`Trainer.setup`).
        VLMTrainError: bad data, a non-finite loss.
        OSError: a checkpoint or export could not be written.
        TrainingInterrupted: a second Ctrl-C during a checkpoint save (after it).
    """
    with Trainer(job, log=log) as trainer:
        return trainer.run(stop_after_steps)
