"""Sharded, re-shardable, atomic training checkpoints (DCP): :class:`CheckpointManager`.

Layout of ``directory``::

    step_000006/                 a complete checkpoint (has COMPLETE)
        .metadata, __*_*.distcp  DCP: model + optimizer state (sharded, any world size)
        trainer_state.pt         rank 0: step, scheduler state, extra, world size
        rank_00000.pt ...        per rank: RNG states (torch, CUDA, random, numpy), extra
        COMPLETE                 JSON marker ({"step", "world_size", "format_version"}),
                                 written last
    step_000009.tmp/             a save in progress: never loaded, removed when a save fails

A save writes into ``step_XXXXXX.tmp``; after every rank finished rank 0 writes
``COMPLETE`` and renames the folder to ``step_XXXXXX``, then deletes the oldest complete
checkpoints beyond ``keep_last``.  :meth:`CheckpointManager.latest` only considers
complete ones.  A save that fails (disk full, any ``OSError``) removes its ``.tmp`` folder
and leaves the previous checkpoint untouched; ``SIGINT`` / ``SIGTERM`` arriving during a
save are held back until the save has finished, then delivered.  With several processes,
a save first checks that every rank sees the ``.tmp`` folder rank 0 created (``directory``
must be on a filesystem shared by all nodes) and fails on every rank, before any shard is
written, when one does not.

This module holds the manager (listing, save / commit / prune, load / load_model /
load_latest, signal deferral, agreement between ranks).  Loading never runs code from
the checkpoint: the files are read by :mod:`vlm_parallel.safe_load`; RNG states are
captured as plain values by :mod:`vlm_parallel.rng_state`.  Checkpoints of format 1
(pickled NumPy / ``random`` states) are refused with a :class:`CheckpointError` saying
so.  Consolidated exports are :mod:`vlm_parallel.export`; the errors are
:mod:`vlm_parallel.errors` (all public names are importable from here too).
"""

from __future__ import annotations

import contextlib
import errno as _errno
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from vlm_parallel.dist import all_reduce_max, get_rank, get_world_size, is_distributed
from vlm_parallel.errors import (
    CheckpointError,
    CheckpointMismatchError,
    _first_failure,
    _reason,
    _shape,
)
from vlm_parallel.export import export_consolidated, load_consolidated
from vlm_parallel.rng_state import capture_rng_state, restore_rng_state
from vlm_parallel.safe_load import (
    _dcp_load,
    _load_plain,
    _read_metadata,
    _serialize_plain,
    _single_process_quiet,
)

# The manager's names, plus the checkpoint errors, RNG and export functions that lived
# here before the split (still importable from this module).
__all__ = [
    "COMPLETE_MARKER",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "capture_rng_state",
    "export_consolidated",
    "load_consolidated",
    "restore_rng_state",
]

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_FORMAT_VERSION = 2  # 1: trainer_state.pt / rank_*.pt held pickled NumPy / random states
_TRAINER_FILE = "trainer_state.pt"
_SHARED_FILE = ".shared_check"  # rank 0's nonce in a new .tmp folder; removed at once
_SHARED_WAIT_S = 2.0  # how long a rank looks for it (another node's new file may lag)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _check_model_matches(path: Path, metadata: Metadata, model_sd: dict[str, Any]) -> None:
    """Every model entry is in the checkpoint with the same (global) shape, and vice versa.

    Raises:
        CheckpointMismatchError: naming the first differing parameter and both shapes.
    """
    saved = {
        key[len("model.") :]: entry
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith("model.")
    }
    for name, value in model_sd.items():
        entry = saved.get(name)
        if entry is None:
            raise CheckpointMismatchError(
                f"{path}: the model has parameter {name!r} but the checkpoint does not"
            )
        if isinstance(value, torch.Tensor):
            if not isinstance(entry, TensorStorageMetadata):
                raise CheckpointMismatchError(
                    f"{path}: parameter {name!r} is not a tensor in the checkpoint"
                )
            if _shape(entry.size) != _shape(value.shape):
                raise CheckpointMismatchError(
                    f"{path}: parameter {name!r} has shape {_shape(entry.size)} in the "
                    f"checkpoint but {_shape(value.shape)} in the model"
                )
    unexpected = sorted(set(saved) - set(model_sd))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointMismatchError(
            f"{path}: the checkpoint has parameter {unexpected[0]!r}{more} that the model does not"
        )


def _agree(error: BaseException | None, path: Path) -> None:
    """Collective: raise on every rank when any rank failed (so all take one decision).

    A rank raises its own error; the others a :class:`CheckpointError` of the same kind
    (mismatch or unreadable) saying another rank failed.
    """
    code = 0 if error is None else 2 if isinstance(error, CheckpointMismatchError) else 1
    agreed = all_reduce_max(code)
    if error is not None:
        raise error
    if agreed == 2:
        raise CheckpointMismatchError(f"{path} does not match the model on another rank")
    if agreed == 1:
        raise CheckpointError(f"{path} is unreadable on another rank")


def _read_marker(path: Path) -> dict[str, Any]:
    """The ``COMPLETE`` marker of a complete checkpoint, format-checked.

    Raises:
        FileNotFoundError: no marker (not a complete checkpoint).
        CheckpointError: an unreadable marker, or another format version.
    """
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)"
        )
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        version = int(info.get("format_version", 1))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{marker} is not a readable marker ({_reason(exc)})") from None
    if version < _FORMAT_VERSION:
        raise CheckpointError(
            f"{path / _TRAINER_FILE} was written by an older vlm-parallel (checkpoint format "
            f"{version}, pickled NumPy / Python objects) and cannot be loaded safely; "
            "retrain, or resave it with the older version in a trusted environment"
        )
    if version > _FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}; this vlm-parallel reads format "
            f"{_FORMAT_VERSION}: upgrade vlm-parallel"
        )
    return dict(info)


def _read_trainer_state(path: Path) -> dict[str, Any]:
    trainer = _load_plain(path / _TRAINER_FILE, "trainer state")
    if not isinstance(trainer, dict) or not {"step", "world_size"} <= set(trainer):
        raise CheckpointError(
            f"{path / _TRAINER_FILE} is not a trainer state (expected a dict with 'step' "
            "and 'world_size')"
        )
    return trainer


def _agreed_nonce() -> int:
    """Collective: one random number, the same on every rank (``os.urandom``: the RNG
    states being checkpointed are left alone)."""
    return all_reduce_max(int.from_bytes(os.urandom(7), "big"))


def _sees(file: Path, nonce: int) -> bool:
    """Whether ``file`` holds ``nonce`` here, looked for up to :data:`_SHARED_WAIT_S`."""
    deadline = time.monotonic() + _SHARED_WAIT_S
    while True:
        try:
            if file.read_bytes() == str(nonce).encode("ascii"):
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _read_checked(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None = None,
    rank_file: Path | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Collective: check ``path`` against the model, then read its DCP entries.

    Checks the marker, the trainer state, that optimizer / scheduler state was saved when
    asked for, the per-rank file ``rank_file`` (when given), the DCP metadata and its
    shard files, and that the model's parameters match; every rank agrees on the outcome
    (:func:`_agree`); then DCP reads the model (and optimizer) entries into fresh state
    dicts, agreed again.

    Returns:
        ``(trainer state, per-rank state ({} without rank_file), state dicts)``: the
        state dicts are ``{"model"}`` (plus ``"optim"`` with an optimizer) to restore.
    """
    error: BaseException | None = None
    trainer: dict[str, Any] = {}
    per_rank: dict[str, Any] = {}
    state: dict[str, Any] = {}
    try:
        _read_marker(path)
        trainer = _read_trainer_state(path)
        if optimizer is not None and not trainer.get("has_optimizer", True):
            raise CheckpointMismatchError(f"{path} holds no optimizer state; pass optimizer=None")
        if scheduler is not None and trainer.get("scheduler") is None:
            raise CheckpointMismatchError(f"{path} holds no scheduler state")
        if rank_file is not None:
            loaded = _load_plain(rank_file, "per-rank state")
            if not isinstance(loaded, dict) or not isinstance(loaded.get("rng"), dict):
                raise CheckpointError(f"{rank_file} is not a per-rank state (no 'rng' dict)")
            per_rank = loaded
        metadata = _read_metadata(path)
        state = _state_dicts(model, optimizer)
        _check_model_matches(path, metadata, state["model"])
    except CheckpointError as exc:
        error = exc
    _agree(error, path)

    try:
        _dcp_load(path, state)
    except CheckpointError as exc:
        error = exc
    _agree(error, path)
    return trainer, per_rank, state


# ------------------------------------------------------------------ signal deferral
_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold back ``SIGINT`` / ``SIGTERM`` inside the block; deliver them after it.

    Only on the main thread (Python allows handlers nowhere else; elsewhere the block
    runs unprotected).  After the block the previous handlers are restored and each
    signal received is raised again once, so the default ``SIGINT`` handler raises
    :class:`KeyboardInterrupt` and a training loop's own handler sees its signal.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def record(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    previous: dict[signal.Signals, Any] = {}
    for sig in _DEFERRED_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, record)
        except (ValueError, OSError):  # pragma: no cover - e.g. signal not supported
            pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        for pending in dict.fromkeys(received):
            signal.raise_signal(pending)


class CheckpointManager:
    """Save / find / load training checkpoints under ``directory``.

    Every method that saves or loads is collective: call it on every rank (also with one
    process, where no process group is needed); every rank returns, or every rank
    raises.  Checkpoints re-shard: a checkpoint saved with N processes loads with M (DCP
    redistributes the shards).

    Args:
        directory: where the ``step_XXXXXX`` folders live (created on first save).
        keep_last: complete checkpoints kept after a save (older ones are deleted).

    Raises:
        ValueError: ``keep_last < 1``.
    """

    def __init__(self, directory: str | Path, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    # ----------------------------------------------------------------- listing
    @staticmethod
    def step_dir_name(step: int) -> str:
        return f"step_{step:06d}"

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every complete checkpoint, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and entry.is_dir() and (entry / COMPLETE_MARKER).is_file():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or ``None`` (``.tmp`` / unmarked folders are
        ignored).  It may still be unreadable: :meth:`load_latest` falls back."""
        found = self.complete_checkpoints()
        return found[-1][1] if found else None

    # -------------------------------------------------------------------- save
    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scheduler: Any | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Save model + optimizer (DCP, sharded), scheduler, ``step``, per-rank RNG states
        and ``extra`` (e.g. the data-loader position; each rank's own copy is kept).

        ``SIGINT`` / ``SIGTERM`` arriving meanwhile are delivered when the save has
        finished (or failed), so a second Ctrl-C never leaves a half-written checkpoint.

        Returns:
            The complete checkpoint folder ``directory/step_XXXXXX``.

        Raises:
            ValueError: ``step`` is negative, or ``extra`` / the scheduler state holds
                something other than plain Python values and tensors (nothing written).
            OSError: writing failed (e.g. the disk is full) on some rank; the message
                names the checkpoint folder, the partial ``.tmp`` folder is removed and
                the previous checkpoint is intact.  ``errno`` is the original one.  Also
                (``errno`` ``ENOENT``, on every rank, before any shard is written) when
                some rank cannot see the ``.tmp`` folder rank 0 created: ``directory``
                is not on a filesystem shared by all nodes.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rank, world = get_rank(), get_world_size()
        final = self.directory / self.step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        with _signals_deferred():
            nonce = _agreed_nonce() if world > 1 else 0
            failure: BaseException | None = None
            try:
                rank_bytes = _serialize_plain(
                    {"rng": capture_rng_state(), "extra": extra, "rank": rank},
                    f"the extra state of rank {rank}",
                )
                trainer_bytes = b""
                if rank == 0:
                    trainer_bytes = _serialize_plain(
                        {
                            "format_version": _FORMAT_VERSION,
                            "step": step,
                            "world_size": world,
                            "scheduler": None if scheduler is None else scheduler.state_dict(),
                            "extra": extra,
                            "has_optimizer": optimizer is not None,
                        },
                        "the scheduler state or extra",
                    )
                    self.directory.mkdir(parents=True, exist_ok=True)
                    if tmp.exists():
                        shutil.rmtree(tmp)
                    tmp.mkdir()
                    if world > 1:
                        _write_bytes(tmp / _SHARED_FILE, str(nonce).encode("ascii"))
            except (Exception, CheckpointException) as exc:
                failure = exc
            self._save_agree(failure, final, tmp)
            if world > 1:
                self._check_shared(final, tmp, nonce)

            try:
                with _single_process_quiet():
                    dcp.save(
                        _state_dicts(model, optimizer),
                        checkpoint_id=str(tmp),
                        no_dist=not is_distributed(),
                    )
                _write_bytes(tmp / f"rank_{rank:05d}.pt", rank_bytes)
                if rank == 0:
                    _write_bytes(tmp / _TRAINER_FILE, trainer_bytes)
            except (Exception, CheckpointException) as exc:
                failure = exc
            self._save_agree(failure, final, tmp)

            try:
                if rank == 0:
                    self._commit(step, world, final, tmp)
            except (Exception, CheckpointException) as exc:
                failure = exc
            self._save_agree(failure, final, tmp)
        return final

    def _check_shared(self, final: Path, tmp: Path, nonce: int) -> None:
        """Collective: every rank must see ``tmp`` with rank 0's ``nonce`` in it, else
        rank 0 removes ``tmp`` and every rank raises (before any shard is written)."""
        rank = get_rank()
        blind = all_reduce_max(0 if _sees(tmp / _SHARED_FILE, nonce) else rank + 1)
        if rank == 0:
            if blind:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                (tmp / _SHARED_FILE).unlink(missing_ok=True)
        if blind:
            err = OSError(
                f"saving checkpoint {final} failed: rank {blind - 1} cannot see the folder "
                f"{tmp} that rank 0 created; the checkpoint directory (train.output_dir) "
                "must be on a filesystem shared by all nodes, not on node-local disks; "
                "nothing was written"
            )
            err.errno = _errno.ENOENT
            raise err

    def _commit(self, step: int, world: int, final: Path, tmp: Path) -> None:
        """Rank 0: marker, then ``tmp -> final`` (an existing ``final`` of the same step
        is put back if the rename fails), then pruning."""
        marker = {"step": step, "world_size": world, "format_version": _FORMAT_VERSION}
        _write_bytes(tmp / COMPLETE_MARKER, json.dumps(marker).encode("utf-8"))
        _fsync_dir(tmp)
        stale = final.with_name(final.name + ".old")
        if final.exists():
            if stale.exists():
                shutil.rmtree(stale)
            final.rename(stale)
            try:
                tmp.rename(final)
            except BaseException:
                stale.rename(final)
                raise
            shutil.rmtree(stale, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(self.directory)
        self._prune(step)

    def _save_agree(self, failure: BaseException | None, final: Path, tmp: Path) -> None:
        """Collective: when any rank failed, rank 0 removes ``tmp`` and every rank raises."""
        if not all_reduce_max(int(failure is not None)):
            return
        if get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = [p for _s, p in self.complete_checkpoints() if p != final]
        kept = (
            f"the previous checkpoint {previous[-1]} is intact"
            if previous
            else ("there is no earlier checkpoint")
        )
        inner = None if failure is None else _first_failure(failure)
        if failure is None or isinstance(inner, OSError):
            reason = "it failed on another rank" if failure is None else _reason(failure)
            err = OSError(
                f"saving checkpoint {final} failed ({reason}); removed the partial "
                f"{tmp.name}, {kept}"
            )
            err.errno = inner.errno if isinstance(inner, OSError) else _errno.EIO
            raise err from failure
        if isinstance(failure, CheckpointException):
            raise RuntimeError(
                f"saving checkpoint {final} failed ({_reason(failure)}); {kept}"
            ) from failure
        raise failure

    def _prune(self, current: int) -> None:
        """Delete complete checkpoints beyond ``keep_last`` and interrupted ``.tmp``
        folders of earlier steps."""
        complete = self.complete_checkpoints()
        for _step, path in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)
        for entry in self.directory.glob("step_*.tmp"):
            match = _STEP_DIR.match(entry.name[: -len(".tmp")])
            if match and int(match.group(1)) < current:
                shutil.rmtree(entry, ignore_errors=True)

    # -------------------------------------------------------------------- load
    def load(
        self,
        path: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scheduler: Any | None = None,
    ) -> dict[str, Any]:
        """Restore model, optimizer, scheduler and this rank's RNG states from ``path``.

        The model (and optimizer) must be built the same way as when saving (e.g. with
        :func:`build_parallel_vlm`), at any world size.  ``optimizer=None`` loads the
        model only (also from a checkpoint holding optimizer state).  A rank that has no
        RNG file of its own (the checkpoint was saved with fewer processes) takes rank
        0's.  Nothing is unpickled beyond plain values, tensors and DCP's metadata
        classes.

        Returns:
            ``{"step", "extra", "world_size"}``: the saved step, this rank's ``extra``
            (rank 0's when this rank had none) and the world size at save time.

        Raises:
            FileNotFoundError: ``path`` is not a complete checkpoint.
            CheckpointMismatchError: the model's parameters differ from the checkpoint's
                (name and shapes in the message), or optimizer / scheduler state is
                asked for but was not saved.
            CheckpointError: a file is missing, truncated, corrupt or would need
                unsafe unpickling, or the checkpoint has an older format (the message
                names the file).
        """
        path = Path(path)
        own = path / f"rank_{get_rank():05d}.pt"
        rank_file = own if own.is_file() else path / "rank_00000.pt"
        trainer, per_rank, state = _read_checked(path, model, optimizer, scheduler, rank_file)
        error: BaseException | None = None
        try:
            if optimizer is None:
                set_model_state_dict(model, state["model"])
            else:
                set_state_dict(
                    model,
                    optimizer,
                    model_state_dict=state["model"],
                    optim_state_dict=state["optim"],
                )
            if scheduler is not None:
                scheduler.load_state_dict(trainer["scheduler"])
            restore_rng_state(per_rank["rng"])
        except (Exception, CheckpointException) as exc:
            error = CheckpointError(f"{path}: restoring the saved state failed ({_reason(exc)})")
        _agree(error, path)
        extra = per_rank.get("extra") if own.is_file() else trainer.get("extra")
        return {"step": trainer["step"], "extra": extra, "world_size": trainer["world_size"]}

    def load_model(self, path: str | Path, model: nn.Module) -> dict[str, Any]:
        """Restore only the model parameters from ``path`` (for inference): no optimizer,
        scheduler or RNG state is read or built.

        Returns:
            ``{"step", "world_size"}`` of the checkpoint.

        Raises:
            FileNotFoundError: ``path`` is not a complete checkpoint.
            CheckpointMismatchError: the model's parameters differ from the checkpoint's.
            CheckpointError: a file is missing, truncated, corrupt or unsafe, or the
                checkpoint has an older format.
        """
        path = Path(path)
        trainer, _per_rank, state = _read_checked(path, model, None)
        error: BaseException | None = None
        try:
            set_model_state_dict(model, state["model"])
        except Exception as exc:
            error = CheckpointError(f"{path}: restoring the model failed ({_reason(exc)})")
        _agree(error, path)
        return {"step": trainer["step"], "world_size": trainer["world_size"]}

    def load_latest(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        *,
        warn: Callable[[str], None] | None = None,
        model_only: bool = False,
    ) -> dict[str, Any] | None:
        """Load the newest complete checkpoint that is readable, newest first.

        An unreadable one (:class:`CheckpointError`) is reported through ``warn`` as
        ``"warning: checkpoint step_000012 is unreadable (<reason>); falling back to
        step_000006"`` and the previous one is tried.  Every rank takes the same
        decision (:meth:`load` agrees across ranks).

        Args:
            warn: receives each fall-back warning (one line); ``None`` stays silent.
            model_only: restore the model only (:meth:`load_model`); ``optimizer`` and
                ``scheduler`` must then be ``None``.

        Returns:
            ``None`` when there is no complete checkpoint, else :meth:`load`'s (or
            :meth:`load_model`'s) dict plus ``"path"``, the folder loaded.

        Raises:
            ValueError: ``model_only`` with an optimizer or scheduler.
            CheckpointMismatchError: the newest checkpoint does not fit the model (no
                fall back: an older one would not fit either).
            CheckpointError: no complete checkpoint loads; the message lists each with
                its reason.
        """
        if model_only and (optimizer is not None or scheduler is not None):
            raise ValueError("model_only=True loads no optimizer / scheduler; pass None")
        candidates = [p for _s, p in reversed(self.complete_checkpoints())]
        if not candidates:
            return None
        failures: list[str] = []
        for i, path in enumerate(candidates):
            try:
                if model_only:
                    info = self.load_model(path, model)
                else:
                    info = self.load(path, model, optimizer, scheduler)
            except CheckpointMismatchError:
                raise
            except CheckpointError as exc:
                failures.append(f"{path.name} ({exc})")
                if warn is not None and i + 1 < len(candidates):
                    warn(
                        f"warning: checkpoint {path.name} is unreadable ({exc}); falling "
                        f"back to {candidates[i + 1].name}"
                    )
                continue
            info["path"] = path
            return info
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be loaded: " + "; ".join(failures)
        )
