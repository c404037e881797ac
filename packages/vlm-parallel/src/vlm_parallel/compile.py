"""``torch.compile`` per trunk block (``parallel.compile = true``).

The units are ``unwrap_transformer(model).trunk.blocks()``, the same ones activation
checkpointing and FSDP2 wrap, so this works for every arch without naming one.  Each
block's ``forward`` is replaced *on the instance* by its compiled version:

- parameter and buffer names do not change (no ``_orig_mod.`` prefixes in state
  dicts, checkpoints or exports);
- FSDP2's pre/post-forward hooks stay outside the compiled region (they run in
  ``Module.__call__``), so sharding may be applied before or after;
- blocks of one trunk share their code, so Dynamo compiles one graph and reuses it for
  every block whose guards match (the first step pays the compile time once, a few
  seconds for a small model on a CPU);
- the elementwise work around the matmuls (RMSNorm, rotary, SwiGLU, residual adds and
  their backward) is fused by Inductor, which is where eager mode loses time.

Compile after :func:`~vlm_parallel.apply_activation_checkpointing` (the checkpointed
forward is then traced as one region and recomputed in backward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlm_strategies import unwrap_transformer

__all__ = ["apply_compile", "is_compiled"]

_MARK = "_vlm_compiled"


def is_compiled(module: nn.Module) -> bool:
    """Whether :func:`apply_compile` compiled ``module`` (a trunk block)."""
    return bool(getattr(module, _MARK, False))


def apply_compile(model: nn.Module, enabled: bool = True, **compile_kwargs: Any) -> int:
    """Compile every trunk block's ``forward`` with ``torch.compile`` (in place).

    Args:
        model: a :class:`~vlm_strategies.VLMWrapper` or :class:`~vlm_transformer.Transformer`.
        enabled: ``False`` does nothing (``job.parallel.compile``).
        compile_kwargs: passed to ``torch.compile`` (e.g. ``backend="aot_eager"``,
            ``mode="max-autotune"``).

    Returns:
        The number of blocks compiled (0 when disabled).

    Raises:
        RuntimeError: the blocks of this model were already compiled.
        TypeError: no :class:`~vlm_transformer.Transformer` inside ``model``.
    """
    if not enabled:
        return 0
    blocks = unwrap_transformer(model).trunk.blocks()
    if any(is_compiled(b) for b in blocks):
        raise RuntimeError("the trunk blocks of this model were already compiled")
    for block in blocks:
        block.forward = torch.compile(block.forward, **compile_kwargs)  # type: ignore[method-assign]
        setattr(block, _MARK, True)
    return len(blocks)
