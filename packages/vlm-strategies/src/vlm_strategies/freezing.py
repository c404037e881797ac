"""Freezing: aliases or fnmatch patterns -> ``requires_grad``, and the step schedule."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from vlm_config import ArchConfig, FreezeSpec, matches_any

__all__ = ["apply_freeze", "freeze_specs_at", "trainable_parameter_names"]


def freeze_specs_at(config: ArchConfig, step: int) -> list[FreezeSpec]:
    """The specs in force at ``step``: ``config.freeze``, replaced by the last
    ``freeze_schedule`` stage whose ``step`` is ``<= step``."""
    specs = list(config.freeze)
    for stage in config.freeze_schedule:
        if stage.step <= step:
            specs = list(stage.freeze)
    return specs


def _named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    inner = getattr(model, "_orig_mod", model)
    return list(inner.named_parameters())


def apply_freeze(
    model: nn.Module, config: ArchConfig, step: int = 0, specs: Sequence[FreezeSpec] | None = None
) -> bool:
    """Set ``requires_grad`` of every parameter from the specs in force at ``step``.

    Every parameter starts trainable; specs apply in order, later ones winning.  An
    alias (``vision_encoder``, ``adapter``, ``transformer``, ``frame_positions`` and the
    arch's own) that matches nothing is fine (e.g. a weight-free encoder); a raw pattern
    that matches nothing is an error.

    Returns:
        Whether any parameter's ``requires_grad`` changed.

    Raises:
        ValueError: a raw fnmatch pattern matches no parameter (the message lists a few
            parameter names).
    """
    params = _named_parameters(model)
    trainable = dict.fromkeys((n for n, _ in params), True)
    aliases = config.all_module_aliases()
    for spec in specs if specs is not None else freeze_specs_at(config, step):
        patterns = config.resolve_freeze_patterns(spec.module)
        hits = [n for n in trainable if matches_any(n, patterns)]
        if not hits and spec.module not in aliases:
            sample = ", ".join(n for n, _ in params[:5])
            raise ValueError(
                f"freeze pattern {spec.module!r} matches no parameter; names look like: {sample}"
            )
        for name in hits:
            trainable[name] = not spec.frozen
    changed = False
    for name, param in params:
        if param.requires_grad != trainable[name]:
            param.requires_grad_(trainable[name])
            changed = True
    refresh = getattr(getattr(model, "_orig_mod", model), "refresh_frozen_state", None)
    if callable(refresh):
        refresh()
    return changed


def trainable_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters with ``requires_grad``."""
    return {n for n, p in _named_parameters(model) if p.requires_grad}
