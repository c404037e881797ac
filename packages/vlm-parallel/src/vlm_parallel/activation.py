"""Non-reentrant activation checkpointing per trunk block, full or selective (op level).

The units are ``unwrap_transformer(model).trunk.blocks()`` (never the arch type), in
both modes.  Checkpointing replaces each block's ``forward`` *on the instance* with one
that runs the original under :func:`torch.utils.checkpoint.checkpoint`
(``use_reentrant=False``), so parameter names stay unchanged (no
``_checkpoint_wrapped_module`` prefixes in state dicts or exports) and FSDP2 hooks
registered later on the same module run outside the checkpointed region (all-gather
before forward / before recomputation in backward).

Modes:

- ``"none"``: nothing.
- ``"full"``: every block's forward is recomputed in backward; only the block inputs
  are kept.
- ``"selective"``: every block is checkpointed with an *operator-level* policy
  (PyTorch's selective activation checkpointing,
  :func:`torch.utils.checkpoint.create_selective_checkpoint_contexts`).  During the
  forward, the outputs of the matrix multiplications that contract over more than one
  attention head's channels (``aten.mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` with
  contraction size ``> model.head_dim``: the Q/K/V/O projections of every attention,
  image K/V projections, FFN and expert matmuls) are kept; everything else is
  recomputed in backward: the attention kernel itself (``scaled_dot_product_attention``
  and its softmax / score intermediates), norms, rotary, activation functions, gates,
  residual adds and routing (top-k, gathers, scatters).  Matmuls that contract over at
  most ``head_dim`` channels are attention scores (``q @ k^T``: SDPA's math fallback,
  or an attention written by hand in a plugin) and are recomputed too, so no
  ``(B, H, S, S)`` score matrix is ever kept.

  The policy looks at operators only, never at module names or types, so it applies
  to every arch (the four built-in ones, and any plugin trunk) without the trunk's
  cooperation: whatever a block computes with these operators (including per-modality
  projections called directly, as in MoT) is covered.  For a Llama-style block the
  kept memory is the block input plus the matmul outputs, roughly half of what no
  checkpointing keeps, and the recomputation costs the elementwise work and the
  attention kernel but no projection or FFN matmul.

Checkpointing is skipped when autograd is off (generation with a KV cache never
recomputes, so cache updates happen once).  Apply before :func:`apply_fsdp` and before
``torch.compile`` (the policy is honoured by the compiled graph's partitioner too).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    SelectiveCheckpointContext,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from vlm_strategies import unwrap_transformer

__all__ = ["ACMode", "apply_activation_checkpointing"]

ACMode = Literal["none", "full", "selective"]
_MARK = "_vlm_activation_checkpointing"

_aten = torch.ops.aten
# matmul operator -> position of its first (left) operand, whose last dim is contracted
_MATMULS: dict[Any, int] = {
    _aten.mm.default: 0,
    _aten.bmm.default: 0,
    _aten.addmm.default: 1,
    _aten.baddbmm.default: 1,
}


def _selective_policy(
    ctx: SelectiveCheckpointContext,
    op: Any,
    *args: Any,
    max_attention_contraction: int,
    **kwargs: Any,
) -> CheckpointPolicy:
    """Keep matmul outputs contracted over ``> max_attention_contraction`` channels;
    recompute every other operator (see the module docstring)."""
    operand = _MATMULS.get(op)
    if operand is not None:
        left = args[operand]
        if isinstance(left, torch.Tensor) and left.shape[-1] > max_attention_contraction:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context_fn(head_dim: int) -> Callable[[], Any]:
    # A plain (nested) functools.partial of module-level functions: torch.compile's
    # checkpoint support accepts it as a constant.
    policy = functools.partial(_selective_policy, max_attention_contraction=head_dim)
    return functools.partial(create_selective_checkpoint_contexts, policy)


def _checkpointed(
    forward: Callable[..., Any],
    context_fn: Callable[[], Any] | None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    if context_fn is None:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def _wrap(module: nn.Module, mode: str, context_fn: Callable[[], Any] | None) -> None:
    original = module.forward
    module.forward = functools.partial(_checkpointed, original, context_fn)  # type: ignore[method-assign]
    setattr(module, _MARK, mode)


def apply_activation_checkpointing(model: nn.Module, mode: ACMode | str) -> int:
    """Checkpoint every trunk block, recomputing all of it (``"full"``) or all but its
    matmul outputs (``"selective"``, see the module docstring).

    Args:
        model: a :class:`~vlm_strategies.VLMWrapper` or :class:`~vlm_transformer.Transformer`
            (not yet sharded or compiled).
        mode: ``"none"``, ``"full"`` or ``"selective"``.

    Returns:
        The number of blocks whose forward is now checkpointed (``len(trunk.blocks())``,
        0 for ``"none"``).

    Raises:
        ValueError: unknown ``mode``.
        RuntimeError: checkpointing was already applied to this model.
        TypeError: no :class:`~vlm_transformer.Transformer` inside ``model``.
    """
    if mode not in ("none", "full", "selective"):
        raise ValueError(
            f"activation checkpointing mode must be 'none', 'full' or 'selective', got {mode!r}"
        )
    transformer = unwrap_transformer(model)
    if any(getattr(m, _MARK, None) for m in transformer.modules()):
        raise RuntimeError("activation checkpointing was already applied to this model")
    if mode == "none":
        return 0
    context_fn = _selective_context_fn(transformer.config.head_dim) if mode == "selective" else None
    blocks = transformer.trunk.blocks()
    for block in blocks:
        _wrap(block, mode, context_fn)
    return len(blocks)
