"""Process group + device mesh from the ``torchrun`` environment."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import NamedTuple

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
        is_main: ``rank == 0`` (log, write exports): the *global* rank 0, one process
            in the whole job, not one per node.
        local_world_size: number of processes on this node (``LOCAL_WORLD_SIZE``;
            ``world_size`` when the launcher does not set it).
        node_rank: this node's index (``GROUP_RANK``; ``rank // local_world_size``
            when the launcher does not set it).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None
    is_main: bool
    local_world_size: int = 1
    node_rank: int = 0

    @property
    def distributed(self) -> bool:
        """Whether a process group is in use (``world_size > 1``)."""
        return self.mesh is not None


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


class _LauncherEnv(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int


def _launcher_env(initialized: tuple[int, int] | None = None) -> _LauncherEnv:
    """Rank, world and node layout from the launcher's environment (``torchrun``).

    ``initialized``: ``(rank, world_size)`` of an already initialised default group,
    which take precedence over ``RANK`` / ``WORLD_SIZE``.  Missing node variables fall
    back to a single-node layout (``LOCAL_RANK = RANK``, ``LOCAL_WORLD_SIZE =
    WORLD_SIZE``).

    Raises:
        ValueError: a variable is not an integer, or the variables contradict each other.
    """
    bad = "malformed launcher environment"
    env_rank, env_world = _env_int("RANK", None), _env_int("WORLD_SIZE", None)
    if initialized is not None:
        rank, world_size = initialized
    else:
        if env_rank is not None and env_world is None:
            raise ValueError(
                f"{bad}: RANK={env_rank} is set but WORLD_SIZE is not; set both "
                "(torchrun does) or neither for a single process"
            )
        world_size = 1 if env_world is None else env_world
        if env_rank is None and world_size > 1:
            raise ValueError(
                f"{bad}: WORLD_SIZE={world_size} is set but RANK is not; every process "
                "needs its own global RANK (launch with torchrun)"
            )
        rank = 0 if env_rank is None else env_rank
    if world_size < 1:
        raise ValueError(f"{bad}: WORLD_SIZE={world_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"{bad}: RANK={rank} is not in [0, WORLD_SIZE={world_size})")

    env_local_rank = _env_int("LOCAL_RANK", None)
    env_local_world = _env_int("LOCAL_WORLD_SIZE", None)
    if env_local_world is not None and env_local_rank is None:
        raise ValueError(f"{bad}: LOCAL_WORLD_SIZE={env_local_world} is set but LOCAL_RANK is not")
    local_rank = rank if env_local_rank is None else env_local_rank
    local_world_size = world_size if env_local_world is None else env_local_world
    if not 1 <= local_world_size <= world_size:
        raise ValueError(
            f"{bad}: LOCAL_WORLD_SIZE={local_world_size} is not in [1, WORLD_SIZE={world_size}]"
        )
    if not 0 <= local_rank < local_world_size:
        which = "LOCAL_WORLD_SIZE" if env_local_world is not None else "WORLD_SIZE"
        raise ValueError(
            f"{bad}: LOCAL_RANK={local_rank} is not in [0, {which}={local_world_size}); "
            "LOCAL_RANK counts the processes on one node"
        )

    node_rank = _env_int("GROUP_RANK", None)
    num_nodes = _env_int("GROUP_WORLD_SIZE", None)
    if node_rank is None:
        node_rank = rank // local_world_size
    if num_nodes is not None and num_nodes < 1:
        raise ValueError(f"{bad}: GROUP_WORLD_SIZE={num_nodes} must be >= 1")
    if node_rank < 0 or (num_nodes is not None and node_rank >= num_nodes):
        limit = "" if num_nodes is None else f", GROUP_WORLD_SIZE={num_nodes}"
        raise ValueError(f"{bad}: GROUP_RANK={node_rank} is not in [0{limit})")
    return _LauncherEnv(rank, world_size, local_rank, local_world_size, node_rank)


def _check_master_env() -> None:
    """Check ``MASTER_ADDR`` / ``MASTER_PORT`` before ``env://`` initialisation."""
    world = os.environ.get("WORLD_SIZE")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name, "").strip():
            raise ValueError(
                f"WORLD_SIZE={world} but {name} is not set; launch with torchrun (it sets "
                "MASTER_ADDR / MASTER_PORT to rank 0's host and port)"
            )
    port = _env_int("MASTER_PORT", None)
    if port is None or not 1 <= port <= 65535:
        raise ValueError(f"MASTER_PORT={port} is not a TCP port (1..65535)")


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
    ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and nothing
    else: the same code runs on one node or many.  ``RANK`` / ``WORLD_SIZE`` are global
    (they pick the data share and the writing rank); ``LOCAL_RANK`` is per node (it picks
    the CUDA device).  With ``WORLD_SIZE`` unset or 1 nothing is initialised and
    ``mesh`` is ``None`` (plain single-process training).  Otherwise the backend is NCCL
    on CUDA and gloo on CPU; an already initialised default group is reused (its rank
    and size win over ``RANK`` / ``WORLD_SIZE``).

    Args:
        parallel: the job's parallel section (``dp_shard``, ``dp_replicate``, ``tp``).
        device: force a device (e.g. ``"cpu"`` on a GPU machine); default
            ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``.
        timeout: process-group timeout.

    Raises:
        ValueError: an impossible mesh (see :func:`resolve_mesh_shape`) or a malformed
            environment: a variable that is not an integer, ``RANK`` without
            ``WORLD_SIZE`` (or the reverse with ``WORLD_SIZE > 1``), ``RANK`` outside
            ``[0, WORLD_SIZE)``, ``LOCAL_RANK`` outside ``[0, LOCAL_WORLD_SIZE)``,
            ``GROUP_RANK`` outside ``[0, GROUP_WORLD_SIZE)``, a ``LOCAL_RANK`` with no
            CUDA device of that index, or ``MASTER_ADDR`` / ``MASTER_PORT`` missing.
    """
    initialized = dist.is_available() and dist.is_initialized()
    env = _launcher_env((dist.get_rank(), dist.get_world_size()) if initialized else None)
    rank, world_size, local_rank = env.rank, env.world_size, env.local_rank
    replicate, shard = resolve_mesh_shape(parallel, world_size)

    if device is None:
        dev = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda":
        visible = torch.cuda.device_count()
        if dev.index is not None and dev.index >= visible:
            raise ValueError(
                f"{dev} (LOCAL_RANK={local_rank}) but this node sees {visible} CUDA "
                "device(s); start at most one process per GPU per node "
                "(torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(dev)

    layout = {"local_world_size": env.local_world_size, "node_rank": env.node_rank}
    if world_size == 1:
        return DistContext(0, 1, local_rank, dev, None, True, **layout)

    if not initialized:
        _check_master_env()
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    if replicate > 1:
        mesh = init_device_mesh(
            dev.type, (replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard")
        )
    else:
        mesh = init_device_mesh(dev.type, (shard,), mesh_dim_names=("dp_shard",))
    return DistContext(rank, world_size, local_rank, dev, mesh, rank == 0, **layout)


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
