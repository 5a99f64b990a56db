"""Peak resident memory during a piece of work, sampled from /proc (Linux) in a background thread."""

from __future__ import annotations

import os
import resource
import threading


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """`with PeakMemory() as peak: ...` then `peak.bytes` is the highest RSS seen inside the block."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.bytes = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.bytes = max(self.bytes, current_rss_bytes())

    def __enter__(self) -> "PeakMemory":
        self.bytes = current_rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.bytes = max(self.bytes, current_rss_bytes())
