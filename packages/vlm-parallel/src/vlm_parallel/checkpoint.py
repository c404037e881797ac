"""Sharded, re-shardable, atomic training checkpoints (DCP) and consolidated exports.

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
save are held back until the save has finished, then delivered.

Loading never runs code from the checkpoint:

* ``trainer_state.pt`` and ``rank_*.pt`` hold only plain Python values and tensors (the
  NumPy and ``random`` RNG states are stored as tensors / lists of ints) and are read with
  ``torch.load(weights_only=True)``; :meth:`CheckpointManager.save` checks that they can
  be read that way before writing them.
* DCP's ``.metadata`` (a pickle that ``FileSystemReader`` reads with plain
  ``pickle.load``) is read by a reader that admits only DCP's metadata classes, ``torch``
  dtypes / ``Size`` / layouts and ``pathlib`` paths.
* DCP's non-tensor entries (the optimizer's ``param_groups`` values, which DCP's
  ``DefaultLoadPlanner`` reads with ``torch.load(weights_only=False)``) must first load
  with ``weights_only=True``.

Checkpoints of format 1 (pickled NumPy / ``random`` states) are refused with a
:class:`CheckpointError` saying so.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from vlm_config import JobConfig, load_job_config, write_toml
from vlm_parallel.build import materialize
from vlm_parallel.dist import all_reduce_max, barrier, get_rank, get_world_size, is_distributed
from vlm_strategies import VLMWrapper, build_vlm

try:  # numpy is optional
    import numpy as _np
except ImportError:  # pragma: no cover - numpy ships with most torch installs
    _np = None  # type: ignore[assignment]

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
_METADATA_FILE = ".metadata"


class CheckpointError(ValueError):
    """A checkpoint or export that cannot be loaded: missing or truncated files, bytes
    that are not what they claim, a file that would need arbitrary unpickling (possibly
    running code), or a checkpoint written by an older format.  The message is one line
    naming the file or folder and what is wrong."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint or export that does not fit what it is loaded into (a
    parameter missing, extra, or of another shape; optimizer or scheduler state asked
    for but not saved).  Falling back to an older checkpoint does not help here."""


# ------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every single-process save/load; that case is intended here."""
    with warnings.catch_warnings():
        if not is_distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


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


def _first_failure(exc: BaseException) -> BaseException:
    """The first rank's exception inside a DCP ``CheckpointException``, else ``exc``."""
    if isinstance(exc, CheckpointException) and exc.failures:
        first: Any = next(iter(exc.failures.values()))
        return _first_failure(first[0] if isinstance(first, tuple) else first)
    return exc


def _reason(exc: BaseException) -> str:
    """A short one-line description of ``exc`` (the first failure of a DCP
    ``CheckpointException``; the offending global of a refused unpickle)."""
    if isinstance(exc, CheckpointException) and exc.failures:
        return _reason(_first_failure(exc))
    text = str(exc)
    unsafe = re.search(r"unsupported (global|operand)[: ]*(?:global )?([\w.]+)", text, re.I)
    if unsafe:
        return f"unsupported {unsafe.group(1).lower()} {unsafe.group(2)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    name = type(exc).__name__
    if not lines:
        return name
    first = lines[0] if len(lines[0]) <= 200 else lines[0][:197] + "..."
    return f"{name}: {first}"


def _is_unsafe_pickle(exc: BaseException) -> bool:
    return "Weights only load failed" in str(exc) or "is not allowed in DCP metadata" in str(exc)


def _serialize_plain(obj: Any, what: str) -> bytes:
    """``torch.save`` bytes of ``obj``, checked to load back with ``weights_only=True``.

    Raises:
        ValueError: ``obj`` holds something other than plain Python values (dict, list,
            tuple, set, str, bytes, int, float, bool, None) and tensors.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{what} cannot be checkpointed safely ({_reason(exc)}): use plain Python values "
            "(dict, list, tuple, set, str, bytes, int, float, bool, None) and tensors"
        ) from None
    return data


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _load_plain(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line :class:`CheckpointError`s."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing ({what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if _is_unsafe_pickle(exc):
            raise CheckpointError(
                f"{path}: refused to load ({_reason(exc)}); it holds objects other than "
                "plain values and tensors, and unpickling it could run code"
            ) from None
        raise CheckpointError(f"{path} is not a readable {what} file ({_reason(exc)})") from None


# --------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states: torch CPU, CUDA (all devices), ``random``, numpy.

    Every value is a tensor or a plain Python value, so the result saves with
    ``torch.save`` and loads back with ``torch.load(weights_only=True)``: ``"python"``
    is ``[version, [625 ints], gauss_next]``; ``"numpy"`` is ``{"bit_generator": str,
    "keys": int64 tensor (624,), "pos": int, "has_gauss": int, "cached_gaussian":
    float}``.
    """
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if _np is not None:
        name, keys, pos, has_gauss, cached = _np.random.get_state(legacy=True)
        state["numpy"] = {
            "bit_generator": str(name),
            "keys": torch.from_numpy(_np.asarray(keys, dtype=_np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (missing entries are left alone).

    Raises:
        ValueError: an entry is not in the form :func:`capture_rng_state` writes.
    """
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        try:
            version, internal, gauss_next = state["python"]
            random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed Python RNG state ({_reason(exc)})") from None
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    if "numpy" in state and _np is not None:
        np_state = state["numpy"]
        try:
            keys = np_state["keys"]
            keys = keys.numpy() if isinstance(keys, torch.Tensor) else _np.asarray(keys)
            _np.random.set_state(
                (
                    str(np_state["bit_generator"]),
                    keys.astype(_np.uint32),
                    int(np_state["pos"]),
                    int(np_state["has_gauss"]),
                    float(np_state["cached_gaussian"]),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed NumPy RNG state ({_reason(exc)})") from None


# -------------------------------------------------------- DCP without arbitrary pickle
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP ``.metadata`` admitting only data classes (no code execution)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in _METADATA_GLOBALS
        if module == "torch":
            allowed = allowed or isinstance(getattr(torch, name, None), torch.dtype)
        elif module == "torch.distributed.checkpoint.metadata":
            allowed = isinstance(getattr(dcp_metadata, name, None), type)
        if not allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")
        return super().find_class(module, name)


class _SafeReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is read by :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = _METADATA_FILE if rank is None else f"__{rank}{_METADATA_FILE}"
        path = self.fs.concat_path(self.path, name)
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not DCP Metadata")
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


_REFUSED_ENTRY = "refused: not plain data"


class _SafePlanner(DefaultLoadPlanner):
    """Non-tensor entries must load with ``weights_only=True`` before DCP reads them."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            torch.load(value, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise pickle.UnpicklingError(
                f"entry {read_item.dest_index.fqn} {_REFUSED_ENTRY} ({_reason(exc)})"
            ) from None
        value.seek(0)
        super().load_bytes(read_item, value)


def _read_metadata(path: Path) -> Metadata:
    """The checkpoint's DCP metadata, checked against the ``.distcp`` files it names.

    Raises:
        CheckpointError: ``.metadata`` missing / unreadable / unsafe, or a data file
            missing or shorter than the metadata says.
    """
    file = path / _METADATA_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing (DCP metadata); the checkpoint is incomplete")
    try:
        metadata = _SafeReader(path).read_metadata()
    except Exception as exc:
        if _is_unsafe_pickle(exc):
            raise CheckpointError(
                f"{file}: refused to load ({_reason(exc)}); unpickling it could run code"
            ) from None
        raise CheckpointError(f"{file} is not readable DCP metadata ({_reason(exc)})") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = str(getattr(info, "relative_path", ""))
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        if rel:
            needed[rel] = max(needed.get(rel, 0), end)
    for rel, end in sorted(needed.items()):
        data = path / rel
        if not data.is_file():
            raise CheckpointError(f"{data} is missing (named by {_METADATA_FILE})")
        size = data.stat().st_size
        if size < end:
            raise CheckpointError(
                f"{data} is truncated ({size} bytes; {_METADATA_FILE} expects at least {end})"
            )
    return metadata


def _shape(size: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in size)


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


def _dcp_load(path: Path, state: dict[str, Any]) -> None:
    try:
        with _single_process_quiet():
            dcp.load(
                state,
                checkpoint_id=str(path),
                storage_reader=_SafeReader(path),
                planner=_SafePlanner(),
                no_dist=not is_distributed(),
            )
    except (Exception, CheckpointException) as exc:
        inner = _first_failure(exc)
        if _is_unsafe_pickle(inner) or _REFUSED_ENTRY in str(inner):
            raise CheckpointError(
                f"{path}: refused to load DCP data ({_reason(exc)}); unpickling it could run code"
            ) from None
        raise CheckpointError(f"{path}: reading the DCP shards failed ({_reason(exc)})") from None


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


# ---------------------------------------------------------------------- manager
def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


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
                the previous checkpoint is intact.  ``errno`` is the original one.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rank, world = get_rank(), get_world_size()
        final = self.directory / self.step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        with _signals_deferred():
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
            except (Exception, CheckpointException) as exc:
                failure = exc
            self._save_agree(failure, final, tmp)

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
        error: BaseException | None = None
        state: dict[str, Any] = {}
        trainer: dict[str, Any] = {}
        per_rank: dict[str, Any] = {}
        own = path / f"rank_{get_rank():05d}.pt"
        try:
            _read_marker(path)
            trainer = _read_trainer_state(path)
            if optimizer is not None and not trainer.get("has_optimizer", True):
                raise CheckpointMismatchError(
                    f"{path} holds no optimizer state; pass optimizer=None"
                )
            if scheduler is not None and trainer.get("scheduler") is None:
                raise CheckpointMismatchError(f"{path} holds no scheduler state")
            rank_file = own if own.is_file() else path / "rank_00000.pt"
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
        error: BaseException | None = None
        state: dict[str, Any] = {}
        trainer: dict[str, Any] = {}
        try:
            _read_marker(path)
            trainer = _read_trainer_state(path)
            metadata = _read_metadata(path)
            state = {"model": get_model_state_dict(model)}
            _check_model_matches(path, metadata, state["model"])
        except CheckpointError as exc:
            error = exc
        _agree(error, path)
        try:
            _dcp_load(path, state)
            set_model_state_dict(model, state["model"])
        except CheckpointError as exc:
            error = exc
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


# ------------------------------------------------------------------ consolidated
def export_consolidated(model: nn.Module, job: JobConfig, out_dir: str | Path) -> Path:
    """Write ``out_dir/model.safetensors`` (full, unsharded parameters and persistent
    buffers) and ``out_dir/job.toml`` for single-process inference.

    Collective: call on every rank; rank 0 writes (the safetensors file through a
    temporary name, so a failed write never leaves a partial ``model.safetensors``).
    Returns ``out_dir``.
    """
    out = Path(out_dir)
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            name: t.detach().cpu().contiguous().clone()
            for name, t in full.items()
            if isinstance(t, torch.Tensor)
        }
        tmp = out / ".model.safetensors.tmp"
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "vlm-parallel"})
            tmp.replace(out / "model.safetensors")
        finally:
            tmp.unlink(missing_ok=True)
        write_toml(job, out / "job.toml")
    barrier()
    return out


def _safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the header of ``file`` (no data read).

    Raises:
        CheckpointError: ``file`` is not a readable safetensors file.
    """
    try:
        with safe_open(str(file), framework="pt") as handle:  # type: ignore[no-untyped-call]
            names = handle.keys()  # a safe_open handle is not iterable itself
            return {name: _shape(handle.get_slice(name).get_shape()) for name in names}
    except Exception as exc:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({_reason(exc)})"
        ) from None


def load_consolidated(
    out_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[VLMWrapper, JobConfig]:
    """Rebuild the model of :func:`export_consolidated` (single process, no sharding,
    eval mode, step-0 freeze state of the job).  Reads only ``job.toml`` (TOML) and
    ``model.safetensors``; nothing is unpickled.

    Raises:
        FileNotFoundError: ``model.safetensors`` or ``job.toml`` is missing.
        CheckpointError: ``model.safetensors`` is truncated, empty or not safetensors.
        CheckpointMismatchError: the model ``job.toml`` describes differs from
            ``model.safetensors`` (the message names the first differing tensor and
            both shapes).
    """
    out = Path(out_dir)
    for name in ("model.safetensors", "job.toml"):
        if not (out / name).is_file():
            raise FileNotFoundError(f"{out / name} not found: not a consolidated export")
    weights, job_file = out / "model.safetensors", out / "job.toml"
    shapes = _safetensors_shapes(weights)
    job = load_job_config(job_file)
    dev = torch.device(device)
    model = build_vlm(job, init_device="meta")
    expected = {name: _shape(t.shape) for name, t in model.state_dict().items()}
    for name, shape in expected.items():
        if name not in shapes:
            raise CheckpointMismatchError(
                f"{job_file} does not match {weights}: the model it describes has tensor "
                f"{name!r}, which the file lacks"
            )
        if shapes[name] != shape:
            raise CheckpointMismatchError(
                f"{job_file} does not match {weights}: tensor {name!r} is {shapes[name]} "
                f"in model.safetensors but {shape} in the model job.toml describes"
            )
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise CheckpointMismatchError(
            f"{job_file} does not match {weights}: the file has tensor {unexpected[0]!r}, "
            "which the model it describes lacks"
        )
    try:
        tensors = load_file(str(weights), device=str(dev))
    except Exception as exc:
        raise CheckpointError(
            f"{weights} is not a readable safetensors file ({_reason(exc)})"
        ) from None
    materialize(model, dev)
    model.init_weights()  # computes non-persistent buffers; weights are overwritten below
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return model, job
