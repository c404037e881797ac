"""Sharded, re-shardable, atomic training checkpoints (DCP) and consolidated exports.

Layout of ``directory``::

    step_000006/                 a complete checkpoint (has COMPLETE)
        .metadata, __*_*.distcp  DCP: model + optimizer state (sharded, any world size)
        trainer_state.pt         rank 0: step, scheduler state, extra, world size
        rank_00000.pt ...        per rank: RNG states (torch, CUDA, random, numpy), extra
        COMPLETE                 JSON marker, written last
    step_000009.tmp/             a save in progress or interrupted: never loaded

A save writes into ``step_XXXXXX.tmp``; after every rank finished (barrier) rank 0 writes
``COMPLETE`` and renames the folder to ``step_XXXXXX``, then deletes the oldest complete
checkpoints beyond ``keep_last``.  :meth:`CheckpointManager.latest` only considers
complete ones, so an interrupted save leaves the previous checkpoint as the resume point.

The ``.pt`` files are read with ``torch.load(weights_only=False)`` (scheduler states
may hold arbitrary Python objects): load only checkpoints you trust.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from vlm_config import JobConfig, load_job_config, write_toml
from vlm_parallel.build import materialize
from vlm_strategies import VLMWrapper, build_vlm

try:  # numpy is optional
    import numpy as _np
except ImportError:  # pragma: no cover - numpy ships with most torch installs
    _np = None  # type: ignore[assignment]

__all__ = [
    "COMPLETE_MARKER",
    "CheckpointManager",
    "capture_rng_state",
    "export_consolidated",
    "load_consolidated",
    "restore_rng_state",
]

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_FORMAT_VERSION = 1


def _dist_on() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def _rank() -> int:
    return tdist.get_rank() if _dist_on() else 0


def _world() -> int:
    return tdist.get_world_size() if _dist_on() else 1


def _barrier() -> None:
    if _dist_on():
        tdist.barrier()


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every single-process save/load; that case is intended here."""
    with warnings.catch_warnings():
        if not _dist_on():
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


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states: torch CPU, CUDA (all devices), ``random``, numpy."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if _np is not None:
        state["numpy"] = _np.random.get_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (missing entries are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    if "numpy" in state and _np is not None:
        _np.random.set_state(state["numpy"])


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


class CheckpointManager:
    """Save / find / load training checkpoints under ``directory``.

    Every method is collective: call it on every rank (also with one process, where no
    process group is needed).  Checkpoints re-shard: a checkpoint saved with N processes
    loads with M (DCP redistributes the shards).

    Args:
        directory: where the ``step_XXXXXX`` folders live (created on first save).
        keep_last: complete checkpoints kept after a save (older ones are deleted).
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
        ignored)."""
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

        Returns:
            The complete checkpoint folder ``directory/step_XXXXXX``.

        Raises:
            ValueError: ``step`` is negative.
            OSError: a writer failed; the partial ``.tmp`` folder is then never used.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rank = _rank()
        final = self.directory / self.step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        _barrier()

        with _single_process_quiet():
            dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(tmp), no_dist=not _dist_on())
        torch.save(
            {"rng": capture_rng_state(), "extra": extra, "rank": rank},
            tmp / f"rank_{rank:05d}.pt",
        )
        if rank == 0:
            torch.save(
                {
                    "format_version": _FORMAT_VERSION,
                    "step": step,
                    "world_size": _world(),
                    "scheduler": None if scheduler is None else scheduler.state_dict(),
                    "extra": extra,
                    "has_optimizer": optimizer is not None,
                },
                tmp / "trainer_state.pt",
            )
        _barrier()

        if rank == 0:
            marker = {"step": step, "world_size": _world(), "format_version": _FORMAT_VERSION}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker), encoding="utf-8")
            _fsync_dir(tmp)
            if final.exists():
                stale = final.with_name(final.name + ".old")
                if stale.exists():
                    shutil.rmtree(stale)
                final.rename(stale)
                shutil.rmtree(stale)
            tmp.rename(final)
            _fsync_dir(self.directory)
            self._prune(step)
        _barrier()
        return final

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
        :func:`build_parallel_vlm`), at any world size.  A rank that has no RNG file of
        its own (the checkpoint was saved with fewer processes) takes rank 0's.

        Returns:
            ``{"step", "extra", "world_size"}``: the saved step, this rank's ``extra``
            (rank 0's when this rank had none) and the world size at save time.

        Raises:
            FileNotFoundError: ``path`` is not a complete checkpoint.
        """
        path = Path(path)
        if not (path / COMPLETE_MARKER).is_file():
            raise FileNotFoundError(
                f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)"
            )
        trainer = torch.load(path / "trainer_state.pt", weights_only=False)
        if optimizer is not None and not trainer.get("has_optimizer", True):
            raise ValueError(f"{path} holds no optimizer state; pass optimizer=None")
        state = _state_dicts(model, optimizer)
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path), no_dist=not _dist_on())
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
            if trainer["scheduler"] is None:
                raise ValueError(f"{path} holds no scheduler state")
            scheduler.load_state_dict(trainer["scheduler"])
        rank = _rank()
        own = path / f"rank_{rank:05d}.pt"
        rank_file = own if own.is_file() else path / "rank_00000.pt"
        per_rank = torch.load(rank_file, weights_only=False)
        restore_rng_state(per_rank["rng"])
        extra = per_rank.get("extra") if own.is_file() else trainer.get("extra")
        _barrier()
        return {"step": trainer["step"], "extra": extra, "world_size": trainer["world_size"]}


# ------------------------------------------------------------------ consolidated
def export_consolidated(model: nn.Module, job: JobConfig, out_dir: str | Path) -> Path:
    """Write ``out_dir/model.safetensors`` (full, unsharded parameters and persistent
    buffers) and ``out_dir/job.toml`` for single-process inference.

    Collective: call on every rank; rank 0 writes.  Returns ``out_dir``.
    """
    out = Path(out_dir)
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            name: t.detach().cpu().contiguous().clone()
            for name, t in full.items()
            if isinstance(t, torch.Tensor)
        }
        tmp = out / ".model.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "vlm-parallel"})
        tmp.replace(out / "model.safetensors")
        write_toml(job, out / "job.toml")
    _barrier()
    return out


def load_consolidated(
    out_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[VLMWrapper, JobConfig]:
    """Rebuild the model of :func:`export_consolidated` (single process, no sharding,
    eval mode, step-0 freeze state of the job).

    Raises:
        FileNotFoundError: ``model.safetensors`` or ``job.toml`` is missing.
    """
    out = Path(out_dir)
    for name in ("model.safetensors", "job.toml"):
        if not (out / name).is_file():
            raise FileNotFoundError(f"{out / name} not found: not a consolidated export")
    job = load_job_config(out / "job.toml")
    dev = torch.device(device)
    model = build_vlm(job, init_device="meta")
    materialize(model, dev)
    model.init_weights()  # computes non-persistent buffers; weights are overwritten below
    model.load_state_dict(load_file(str(out / "model.safetensors"), device=str(dev)), strict=True)
    model.eval()
    return model, job
