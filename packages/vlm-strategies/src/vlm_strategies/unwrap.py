"""Find the inner :class:`Transformer` of a wrapper, a bare decoder or a compiled module."""

from __future__ import annotations

from torch import nn

from vlm_transformer import Transformer

__all__ = ["unwrap_transformer"]


def unwrap_transformer(module: nn.Module) -> Transformer:
    """The :class:`Transformer` inside ``module``.

    Accepts a :class:`VLMWrapper`, a ``Transformer``, or either wrapped by
    ``torch.compile`` (``_orig_mod``).

    Raises:
        TypeError: no transformer found.
    """
    inner = getattr(module, "_orig_mod", module)
    if isinstance(inner, Transformer):
        return inner
    candidate = getattr(inner, "transformer", None)
    candidate = getattr(candidate, "_orig_mod", candidate)
    if isinstance(candidate, Transformer):
        return candidate
    raise TypeError(f"no vlm_transformer.Transformer inside {type(module).__name__}")
