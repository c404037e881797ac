"""Capture and restore a process's RNG states as plain values.

:func:`capture_rng_state` returns the torch CPU, CUDA, ``random`` and NumPy states as
tensors and plain Python values only (no pickled NumPy / ``random`` objects), so a
checkpoint can store them with ``torch.save`` and read them back with
``torch.load(weights_only=True)``; :func:`restore_rng_state` is its inverse.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from vlm_parallel.errors import _reason

try:  # numpy is optional
    import numpy as _np
except ImportError:  # pragma: no cover - numpy ships with most torch installs
    _np = None  # type: ignore[assignment]

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states: torch CPU, CUDA (all devices), ``random``, numpy.

    Every value is a tensor or a plain Python value, so the result saves with
    ``torch.save`` and loads back with ``torch.load(weights_only=True)``: ``"python"``
    is ``[version, [625 ints], gauss_next]``; ``"numpy"`` is ``{"bit_generator": str,
    "keys": int64 tensor (624,), "pos": int, "has_gauss": int, "cached_gaussian":
    float}``.
    """
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if _np is not None:
        name, keys, pos, has_gauss, cached = _np.random.get_state(legacy=True)
        state["numpy"] = {
            "bit_generator": str(name),
            "keys": torch.from_numpy(_np.asarray(keys, dtype=_np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (missing entries are left alone).

    Raises:
        ValueError: an entry is not in the form :func:`capture_rng_state` writes.
    """
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        try:
            version, internal, gauss_next = state["python"]
            random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed Python RNG state ({_reason(exc)})") from None
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    if "numpy" in state and _np is not None:
        np_state = state["numpy"]
        try:
            keys = np_state["keys"]
            keys = keys.numpy() if isinstance(keys, torch.Tensor) else _np.asarray(keys)
            _np.random.set_state(
                (
                    str(np_state["bit_generator"]),
                    keys.astype(_np.uint32),
                    int(np_state["pos"]),
                    int(np_state["has_gauss"]),
                    float(np_state["cached_gaussian"]),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed NumPy RNG state ({_reason(exc)})") from None
