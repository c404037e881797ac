"""Process group + device mesh from the ``torchrun`` environment."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from vlm_config import ParallelConfig

__all__ = [
    "DistContext",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "destroy_distributed",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "resolve_mesh_shape",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 without a process group).
        world_size: number of processes (1 without a process group).
        local_rank: rank on this node (selects the CUDA device).
        device: the device this rank computes on (``cuda:<local_rank>`` or ``cpu``).
        mesh: the data-parallel :class:`DeviceMesh` (1-D ``("dp_shard",)``, or 2-D
            ``("dp_replicate", "dp_shard")`` for HSDP); ``None`` with one process.
        is_main: ``rank == 0`` (log, write exports).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None
    is_main: bool

    @property
    def distributed(self) -> bool:
        """Whether a process group is in use (``world_size > 1``)."""
        return self.mesh is not None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def resolve_mesh_shape(parallel: ParallelConfig, world_size: int) -> tuple[int, int]:
    """``(dp_replicate, dp_shard)`` for ``world_size`` processes.

    Raises:
        ValueError: ``parallel.tp > 1`` (tensor parallelism is not implemented), or the
            sizes do not multiply to ``world_size``.
    """
    if parallel.tp != 1:
        raise ValueError(
            f"parallel.tp = {parallel.tp}: tensor parallelism is not implemented by "
            "vlm-parallel (only data parallelism: FSDP2 / HSDP); set parallel.tp = 1"
        )
    replicate = parallel.dp_replicate
    if world_size % replicate:
        raise ValueError(
            f"parallel.dp_replicate = {replicate} does not divide the world size {world_size}"
        )
    shard = world_size // replicate if parallel.dp_shard == -1 else parallel.dp_shard
    if replicate * shard != world_size:
        raise ValueError(
            f"parallel.dp_replicate ({replicate}) x parallel.dp_shard ({shard}) = "
            f"{replicate * shard} != world size {world_size}; use dp_shard = -1 to take "
            "all remaining ranks"
        )
    return replicate, shard


def init_distributed(
    parallel: ParallelConfig,
    *,
    device: str | torch.device | None = None,
    timeout: datetime.timedelta | None = None,
) -> DistContext:
    """Initialise the process group (if any) and the data-parallel mesh.

    Reads the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``).  With ``WORLD_SIZE`` unset or 1 nothing is
    initialised and ``mesh`` is ``None`` (plain single-process training).  Otherwise
    the backend is NCCL on CUDA and gloo on CPU; an already initialised default group
    is reused.

    Args:
        parallel: the job's parallel section (``dp_shard``, ``dp_replicate``, ``tp``).
        device: force a device (e.g. ``"cpu"`` on a GPU machine); default
            ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``.
        timeout: process-group timeout.

    Raises:
        ValueError: an impossible mesh (see :func:`resolve_mesh_shape`) or a malformed
            environment.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank = _env_int("RANK", 0)
        world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    replicate, shard = resolve_mesh_shape(parallel, world_size)

    if device is None:
        dev = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)

    if world_size == 1:
        return DistContext(0, 1, local_rank, dev, None, True)

    if not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValueError(
                    f"WORLD_SIZE={world_size} but {name} is not set; launch with torchrun"
                )
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    if replicate > 1:
        mesh = init_device_mesh(
            dev.type, (replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard")
        )
    else:
        mesh = init_device_mesh(dev.type, (shard,), mesh_dim_names=("dp_shard",))
    return DistContext(rank, world_size, local_rank, dev, mesh, rank == 0)


def destroy_distributed() -> None:
    """Destroy the default process group if one is initialised (no-op otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------- collectives
# The one place the toolkit talks to the default process group.  Every helper is a
# no-op (or the identity) without one, so single-process code never branches.


def is_distributed() -> bool:
    """Whether a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64; the identity with one process).

    Every rank must pass a list of the same length.
    """
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: int) -> int:
    """The largest ``value`` over ranks (e.g. a stop flag any rank may raise)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
