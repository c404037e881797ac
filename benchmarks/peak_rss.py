"""Peak resident-set-size sampling shared by the benchmark scripts.

RSS is read from ``/proc/self/statm`` in a background thread every ``interval``
seconds while the ``with`` block runs; ``peak`` is the highest value seen (bytes).
Scripts re-exec themselves with ``MALLOC_MMAP_THRESHOLD_`` lowered so freed tensors
return to the OS and RSS tracks the live tensors.
"""

from __future__ import annotations

import os
import threading
import time

_PAGE = os.sysconf("SC_PAGE_SIZE")


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
