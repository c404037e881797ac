"""Peak resident-set-size sampling shared by the benchmark scripts.

RSS is read from ``/proc/self/statm`` in a background thread every ``interval``
seconds while the ``with`` block runs; ``peak`` is the highest value seen (bytes).
Freed memory must go back to the OS for RSS to track the live tensors: either the
script re-execs itself with ``MALLOC_MMAP_THRESHOLD_`` lowered, or it calls
:func:`mmap_large_allocations` once its timing is done (glibc then serves every
large block with ``mmap`` and unmaps it on ``free``; page-faulting fresh pages on every
allocation slows a training step down by tens of percent, so never time under it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time

_PAGE = os.sysconf("SC_PAGE_SIZE")


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def mmap_large_allocations(threshold: int = 65536) -> bool:
    """From now on, glibc serves blocks >= ``threshold`` bytes with ``mmap`` and trims
    the heap top on every ``free`` (``mallopt``); returns False where that is not glibc."""
    try:
        libc = _libc()
        ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, 0) == 1 and ok
        libc.malloc_trim(0)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def malloc_trim() -> None:
    """Return free heap memory to the OS (glibc ``malloc_trim(0)``; no-op elsewhere)."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    """The current resident set size of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """Context manager sampling the resident set size in a background thread."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
