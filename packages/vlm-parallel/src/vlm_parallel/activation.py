"""Non-reentrant activation checkpointing per trunk block.

The units come from ``unwrap_transformer(model).trunk.blocks()`` (never from the arch
type).  Checkpointing replaces the module's ``forward`` *on the instance* with one that
runs the original under :func:`torch.utils.checkpoint.checkpoint` (``use_reentrant=False``),
so parameter names stay unchanged (no ``_checkpoint_wrapped_module`` prefixes in state
dicts or exports) and FSDP2 hooks registered later on the same module run outside the
checkpointed region (all-gather before forward / before recomputation in backward).

Modes:

- ``"none"``: nothing.
- ``"full"``: every block's forward is recomputed in backward; only block inputs are kept.
- ``"selective"``: only the *attention-like* submodules of each block are recomputed
  (their projections, rotary and softmax / SDPA intermediates, the memory-heavy part),
  the MLP / experts keep their activations.  A submodule is attention-like when it is a
  :class:`vlm_transformer.Attention`, or its attribute name contains ``"attn"`` or
  ``"attention"`` (excluding norms: names containing ``"norm"``).  Only the outermost
  match is wrapped.  A block without any attention-like submodule is left alone.

Checkpointing is skipped when autograd is off (generation with a KV cache never
recomputes, so cache updates happen once).  Apply before :func:`apply_fsdp` and before
``torch.compile``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlm_strategies import unwrap_transformer
from vlm_transformer import Attention

__all__ = ["ACMode", "apply_activation_checkpointing", "attention_like_submodules"]

ACMode = Literal["none", "full", "selective"]
_MARK = "_vlm_activation_checkpointing"


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _wrap(module: nn.Module, mode: str) -> None:
    original = module.forward
    module.forward = functools.partial(_checkpointed, original)  # type: ignore[method-assign]
    setattr(module, _MARK, mode)


def _is_attention_like(name: str, module: nn.Module) -> bool:
    if isinstance(module, Attention):
        return True
    leaf = name.rsplit(".", 1)[-1].lower()
    if "norm" in leaf:
        return False
    return ("attn" in leaf or "attention" in leaf) and any(True for _ in module.parameters())


def attention_like_submodules(block: nn.Module) -> list[nn.Module]:
    """The outermost attention-like submodules of ``block`` (see the module docstring)."""
    found: list[tuple[str, nn.Module]] = []
    for name, sub in block.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix, _ in found):
            continue
        if _is_attention_like(name, sub):
            found.append((name, sub))
    return [m for _, m in found]


def apply_activation_checkpointing(model: nn.Module, mode: ACMode | str) -> int:
    """Checkpoint every trunk block (``"full"``) or its attention (``"selective"``).

    Args:
        model: a :class:`~vlm_strategies.VLMWrapper` or :class:`~vlm_transformer.Transformer`
            (not yet sharded or compiled).
        mode: ``"none"``, ``"full"`` or ``"selective"``.

    Returns:
        The number of modules whose forward is now checkpointed.

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
    count = 0
    for block in transformer.trunk.blocks():
        targets = [block] if mode == "full" else attention_like_submodules(block)
        for target in targets:
            _wrap(target, mode)
            count += 1
    return count
