"""FSDP2 (``fully_shard``) of a VLM: per trunk block, per component, then the root."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

from vlm_config import ParallelConfig
from vlm_parallel.dist import DistContext
from vlm_strategies import VLMWrapper
from vlm_transformer import Transformer

__all__ = ["apply_fsdp", "is_sharded", "torch_dtype"]

_MARK = "_vlm_fsdp_applied"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (the names of :class:`ParallelConfig`)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None


def _register_decode_step(transformer: Transformer) -> None:
    """Generation's lean one-token step bypasses ``forward``; registering it makes FSDP2
    all-gather the transformer's own parameters (embedding, head, final norm) around it."""
    register_fsdp_forward_method(transformer, "decode_logits")


def _has_params(module: nn.Module | None) -> bool:
    return module is not None and any(True for _ in module.parameters())


def is_sharded(model: nn.Module) -> bool:
    """Whether :func:`apply_fsdp` ran on ``model`` (also true for the no-op single-process
    case) or ``model`` is otherwise an FSDP2 module."""
    return bool(getattr(model, _MARK, False)) or isinstance(model, FSDPModule)


def apply_fsdp(
    model: nn.Module,
    parallel: ParallelConfig,
    dist: DistContext,
    *,
    shard_encoder: bool | None = None,
) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over ``dist.mesh``; returns it.

    Order: every trunk block (``unwrap_transformer(model).trunk.blocks()``), the
    transformer root (embedding, LM head, final norm), then for a
    :class:`~vlm_strategies.VLMWrapper` the adapter, ``frame_positions`` (if any), the
    vision encoder only when ``shard_encoder`` (default: ``not model.encoder_frozen``),
    and the wrapper root.  A frozen encoder's parameters stay plain replicated tensors
    (``ignored_params`` of the root), get no gradients and no collectives.

    Mixed precision: ``MixedPrecisionPolicy(param_dtype, reduce_dtype)`` from
    ``parallel`` (``param_dtype="float32"`` means no casting).  The wrapper root does not
    cast its inputs, so an unsharded frozen encoder sees pixels in its own dtype.

    With one process (``dist.mesh is None``) nothing is sharded, the model is only
    marked, so user code needs no branch on the world size.

    Apply after :func:`apply_activation_checkpointing` and before ``torch.compile``; on a
    meta-device model, materialise with ``to_empty`` afterwards (see
    :func:`build_parallel_vlm`).

    Raises:
        RuntimeError: ``model`` was already sharded.
        TypeError: ``model`` is neither a ``VLMWrapper`` nor a ``Transformer`` (e.g. an
            already compiled module).
    """
    if is_sharded(model):
        raise RuntimeError(f"apply_fsdp was already applied to this {type(model).__name__}")
    if not isinstance(model, (VLMWrapper, Transformer)):
        raise TypeError(
            f"apply_fsdp expects a VLMWrapper or a Transformer, got {type(model).__name__}"
            + (" (apply FSDP before torch.compile)" if hasattr(model, "_orig_mod") else "")
        )
    if isinstance(model, VLMWrapper) and shard_encoder is None:
        shard_encoder = not model.encoder_frozen
    if dist.mesh is None:
        setattr(model, _MARK, True)
        return model

    param_dtype = torch_dtype(parallel.param_dtype)
    policy = MixedPrecisionPolicy(
        param_dtype=None if param_dtype == torch.float32 else param_dtype,
        reduce_dtype=torch_dtype(parallel.reduce_dtype),
    )
    root_policy = MixedPrecisionPolicy(
        param_dtype=policy.param_dtype,
        reduce_dtype=policy.reduce_dtype,
        cast_forward_inputs=False,
    )
    common: dict[str, Any] = {
        "mesh": dist.mesh,
        "reshard_after_forward": parallel.reshard_after_forward,
    }

    transformer = model if isinstance(model, Transformer) else model.transformer
    for block in transformer.trunk.blocks():
        if _has_params(block):
            fully_shard(block, mp_policy=policy, **common)
    if isinstance(model, Transformer):
        fully_shard(model, mp_policy=root_policy, **common)
        _register_decode_step(model)
        setattr(model, _MARK, True)
        return model

    fully_shard(transformer, mp_policy=policy, **common)
    _register_decode_step(transformer)
    if _has_params(model.adapter):
        fully_shard(model.adapter, mp_policy=policy, **common)
    if _has_params(model.frame_positions):
        assert model.frame_positions is not None
        fully_shard(model.frame_positions, mp_policy=policy, **common)
    ignored: set[nn.Parameter] = set()
    if _has_params(model.vision_encoder):
        if shard_encoder:
            fully_shard(model.vision_encoder, mp_policy=policy, **common)
        else:
            model.vision_encoder.to(dist.device)
            ignored = set(model.vision_encoder.parameters())
    fully_shard(model, mp_policy=root_policy, ignored_params=ignored or None, **common)
    # the fused LM-head + cross-entropy entry point is a forward too (root lazy init,
    # all-gather of the root's parameters)
    register_fsdp_forward_method(model, "loss")
    setattr(model, _MARK, True)
    return model
