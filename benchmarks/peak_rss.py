"""Peak resident-set-size measurement shared by the benchmark scripts.

:class:`PeakRSS` reports the highest RSS (bytes) while its ``with`` block runs: the
kernel's exact high-water mark on Linux, a background thread's samples elsewhere.
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


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (``VmHWM``) to the current RSS (Linux:
    ``echo 5 > /proc/self/clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The kernel's RSS high-water mark (``VmHWM``) of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


class PeakRSS:
    """Context manager measuring the peak resident set size of the ``with`` block.

    Exact where the kernel's high-water mark can be reset (Linux: ``VmHWM`` after
    :func:`reset_peak_rss`); elsewhere sampled by a background thread every
    ``interval`` seconds (a peak shorter than that can be missed).
    """

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.peak = 0
        self.exact = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = rss_bytes()
        self.exact = reset_peak_rss()
        if not self.exact:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.exact:
            self.peak = max(self.peak, peak_rss_bytes())
        else:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())
