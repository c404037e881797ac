"""FSDP2 sharding, activation checkpointing, meta-device init and DCP checkpoints.

Everything works the same with one process (no process group) and with N processes
launched by ``torchrun``; user code never branches on the world size.
"""

from vlm_parallel.__about__ import __version__
from vlm_parallel.activation import ACMode, apply_activation_checkpointing
from vlm_parallel.build import build_parallel_vlm, encoder_ever_trainable, materialize
from vlm_parallel.checkpoint import COMPLETE_MARKER, CheckpointManager
from vlm_parallel.compile import apply_compile, is_compiled
from vlm_parallel.dist import (
    DistContext,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    destroy_distributed,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    resolve_mesh_shape,
)
from vlm_parallel.errors import CheckpointError, CheckpointMismatchError
from vlm_parallel.export import export_consolidated, load_consolidated
from vlm_parallel.fsdp import apply_fsdp, is_sharded, torch_dtype
from vlm_parallel.rng_state import capture_rng_state, restore_rng_state

__all__ = [
    "ACMode",
    "COMPLETE_MARKER",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "DistContext",
    "__version__",
    "all_reduce_max",
    "all_reduce_sum",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_fsdp",
    "barrier",
    "build_parallel_vlm",
    "capture_rng_state",
    "destroy_distributed",
    "encoder_ever_trainable",
    "export_consolidated",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_compiled",
    "is_distributed",
    "is_sharded",
    "load_consolidated",
    "materialize",
    "resolve_mesh_shape",
    "restore_rng_state",
    "torch_dtype",
]
