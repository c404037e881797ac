"""Torch-free token-count arithmetic shared by the configs and the modules.

Pooling adapters see ``N`` tokens as a square ``g x g`` patch grid in row-major
order (token ``t`` is the patch at row ``t // g``, column ``t % g``).  Both the
config's :meth:`predicted_num_tokens` and the module's ``output_num_tokens``
call these functions, so the two can never disagree; the tests also check them
against the real forward output.
"""

from __future__ import annotations

import math

PROJECTION_HINT = "a projection adapter ('mlp_2layer', 'linear') accepts any token count"


def check_num_tokens(num_tokens: int, adapter: str) -> int:
    """Validate a token count ``N >= 1`` and return it."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
        raise ValueError(f"{adapter}: the token count must be an int, got {num_tokens!r}")
    if num_tokens < 1:
        raise ValueError(f"{adapter}: needs at least one input token, got N={num_tokens}")
    return num_tokens


def check_window(window: int, adapter: str, name: str = "window") -> int:
    """Validate a window / factor ``>= 1`` and return it."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{adapter}: {name} must be an int >= 1, got {window!r}")
    return window


def square_grid_side(num_tokens: int, adapter: str = "adapter") -> int:
    """Side ``g`` of the square patch grid holding ``N = g * g`` tokens.

    Raises:
        ValueError: when ``N`` is not a perfect square, saying how to fix it
            (e.g. strip a CLS token).
    """
    n = check_num_tokens(num_tokens, adapter)
    g = math.isqrt(n)
    if g * g == n:
        return g
    lo = g * g
    hint = f"use a vision encoder that returns only a square patch grid, or {PROJECTION_HINT}"
    if n - 1 == lo:
        hint = (
            f"N - 1 = {lo} = {g}x{g}: this looks like a {g}x{g} patch grid plus a CLS token; "
            f"strip the CLS token (e.g. features[:, 1:]) or {hint}"
        )
    raise ValueError(
        f"{adapter} pools a square patch grid, so it needs N = g*g input tokens, got N={n} "
        f"(nearest squares {lo} and {(g + 1) ** 2}); {hint}"
    )


def avgpool_num_tokens(num_tokens: int, window: int, adapter: str = "avgpool") -> int:
    """``ceil(g / window) ** 2``: ragged edge windows are kept (and averaged over real patches)."""
    g = square_grid_side(num_tokens, adapter)
    w = check_window(window, adapter)
    side = -(-g // w)
    return side * side


def divisible_pool_num_tokens(
    num_tokens: int, window: int, adapter: str, name: str = "window"
) -> int:
    """``(g / window) ** 2`` for adapters that need ``window`` to divide the grid side ``g``."""
    g = square_grid_side(num_tokens, adapter)
    w = check_window(window, adapter, name)
    if g % w:
        divisors = [d for d in range(1, g + 1) if g % d == 0]
        raise ValueError(
            f"{adapter} needs {name}={w} to divide the patch grid side g={g} (N={num_tokens} "
            f"tokens); {name}s that divide {g}: {divisors} (or choose an encoder image/patch "
            f"size giving a grid divisible by {w}; 'avgpool' accepts ragged grids)"
        )
    side = g // w
    return side * side
