"""Weight initialisation scheme and the hooks archs use to customise it.

Scheme applied by :func:`init_module_tree` (what ``Transformer.init_weights`` and the
default ``Trunk.init_weights`` run):

1. ``nn.Linear`` weights ~ ``normal(0, std)``; linears marked with
   :func:`mark_output_projection` (attention ``o_proj``, MLP ``down_proj``) use
   ``output_std`` instead (``std / sqrt(2 * n_layers)`` when output scaling is on);
   biases are zero.
2. ``nn.Embedding`` weights ~ ``normal(0, std)``.
3. Any other module with its own ``reset_parameters()`` (norms -> ones/zeros, rotary ->
   recomputed float32 tables) calls it.
4. A module defining ``init_parameters(std, output_std)`` gets it called afterwards (for
   raw ``nn.Parameter`` s, e.g. stacked MoE expert weights).
5. Finally every module marked with :func:`mark_zero_init` has the named parameters (or
   all its parameters) set to zero, e.g. the output projection of a freshly inserted
   cross-attention block so that the block starts as the identity.

The marks are plain module attributes, so they survive ``to_empty`` (parameter
attributes do not).
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

__all__ = ["init_module_tree", "mark_output_projection", "mark_zero_init"]

M = TypeVar("M", bound=nn.Module)


def mark_output_projection(module: M) -> M:
    """Mark a linear whose output is added to the residual stream (scaled init)."""
    module.is_output_projection = True  # type: ignore[assignment]
    return module


def mark_zero_init(module: M, *param_names: str) -> M:
    """Zero ``param_names`` of ``module`` (all its parameters, recursively, if none are
    named) at the end of every :func:`init_module_tree` pass that covers it."""
    module.zero_init = tuple(param_names) if param_names else True  # type: ignore[assignment]
    return module


@torch.no_grad()
def init_module_tree(root: nn.Module, std: float, output_std: float | None = None) -> None:
    """Initialise every parameter under ``root`` in place (see the module docstring).

    Raises:
        ValueError: a name in a ``zero_init`` mark is not a direct parameter.
    """
    out_std = std if output_std is None else output_std
    for module in root.modules():
        if isinstance(module, nn.Linear):
            s = out_std if getattr(module, "is_output_projection", False) else std
            nn.init.normal_(module.weight, mean=0.0, std=s)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        else:
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
        custom = getattr(module, "init_parameters", None)
        if callable(custom):
            custom(std, out_std)
    for module in root.modules():
        mark = getattr(module, "zero_init", False)
        if mark is True:
            for param in module.parameters():
                param.zero_()
        elif mark:
            for name in mark:
                p = module._parameters.get(name)
                if p is None:
                    raise ValueError(
                        f"zero_init names {name!r}, which is not a direct parameter of "
                        f"{type(module).__name__} (has {sorted(module._parameters)})"
                    )
                p.zero_()
