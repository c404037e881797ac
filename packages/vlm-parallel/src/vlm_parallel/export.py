"""Consolidated exports: ``model.safetensors`` + ``job.toml`` for single-process inference.

:func:`export_consolidated` gathers the full (unsharded) parameters and persistent
buffers and writes them with safetensors (no pickle); :func:`load_consolidated` checks
the safetensors header against the model ``job.toml`` describes before reading any
data, then rebuilds that model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from vlm_config import JobConfig, load_job_config, write_toml
from vlm_parallel.build import materialize
from vlm_parallel.dist import barrier, get_rank
from vlm_parallel.errors import CheckpointError, CheckpointMismatchError, _reason, _shape
from vlm_strategies import VLMWrapper, build_vlm

__all__ = ["export_consolidated", "load_consolidated"]


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


def _unreadable(file: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"{file} is not a readable safetensors file ({_reason(exc)})")


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
        raise _unreadable(file, exc) from None


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
        raise _unreadable(weights, exc) from None
    materialize(model, dev)
    model.init_weights()  # computes non-persistent buffers; weights are overwritten below
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return model, job
