"""Checkpoint errors and how failures are described in their one-line messages.

:class:`CheckpointError` / :class:`CheckpointMismatchError` (public, also importable from
``vlm_parallel.checkpoint``), :func:`_reason` (one line for any exception, the first
rank's failure of a DCP ``CheckpointException``, the offending global of a refused
unpickle) and :func:`_shape` (a shape as a tuple of ints, for comparisons and messages).
"""

from __future__ import annotations

import re
from typing import Any

from torch.distributed.checkpoint.api import CheckpointException

__all__ = ["CheckpointError", "CheckpointMismatchError"]


class CheckpointError(ValueError):
    """A checkpoint or export that cannot be loaded: missing or truncated files, bytes
    that are not what they claim, a file that would need arbitrary unpickling (possibly
    running code), or a checkpoint written by an older format.  The message is one line
    naming the file or folder and what is wrong."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint or export that does not fit what it is loaded into (a
    parameter missing, extra, or of another shape; optimizer or scheduler state asked
    for but not saved).  Falling back to an older checkpoint does not help here."""


def _first_failure(exc: BaseException) -> BaseException:
    """The first rank's exception inside a DCP ``CheckpointException``, else ``exc``."""
    if isinstance(exc, CheckpointException) and exc.failures:
        first: Any = next(iter(exc.failures.values()))
        return _first_failure(first[0] if isinstance(first, tuple) else first)
    return exc


def _reason(exc: BaseException) -> str:
    """A short one-line description of ``exc`` (the first failure of a DCP
    ``CheckpointException``; the offending global of a refused unpickle)."""
    if isinstance(exc, CheckpointException) and exc.failures:
        return _reason(_first_failure(exc))
    text = str(exc)
    unsafe = re.search(r"unsupported (global|operand)[: ]*(?:global )?([\w.]+)", text, re.I)
    if unsafe:
        return f"unsupported {unsafe.group(1).lower()} {unsafe.group(2)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    name = type(exc).__name__
    if not lines:
        return name
    first = lines[0] if len(lines[0]) <= 200 else lines[0][:197] + "..."
    return f"{name}: {first}"


def _shape(size: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in size)
