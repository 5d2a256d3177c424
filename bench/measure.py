"""Wall time and peak resident memory of a block of code (RSS sampled by a background thread).

RSS is read from psutil when it is importable, else from `/proc/self/statm`. The figure is the peak
RSS while the block ran minus the RSS when it started; memory that the allocator kept from an earlier
block is reused without showing up, so a block that runs after a larger one can read low.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process in bytes."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_rss_delta_mb: float = 0.0


class measured:
    """`with measured() as m: ...` → m.seconds, m.peak_rss_delta_mb (sampled every `interval` s)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.result = Measurement()
        self._stop = threading.Event()
        self._peak = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> Measurement:
        self._start_rss = self._peak = rss_bytes()
        self._started = time.perf_counter()
        self._thread.start()
        return self.result

    def __exit__(self, *exc: object) -> None:
        self.result.seconds = time.perf_counter() - self._started
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, rss_bytes())
        self.result.peak_rss_delta_mb = max(0, self._peak - self._start_rss) / 2**20
