"""What the memory benchmarks read of their own process: Linux's /proc/self/status fields, and
the peak of its anonymous resident memory (RssAnon: what the process really needs and the kernel
cannot reclaim; peak RSS also counts clean file pages of memory maps)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path


def process_status(fields: Sequence[str]) -> dict[str, int]:
    """The named fields of /proc/self/status (VmRSS, RssAnon, RssFile, VmHWM, ...) in bytes;
    fields the system does not report are absent."""
    out = {}
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in fields:
                out[key] = int(value.split()[0]) * 1024  # kB
    return out


class AnonymousPeak(threading.Thread):
    """Samples this process's RssAnon every ``interval`` seconds once started; :meth:`stop`
    returns the largest value, in bytes."""

    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        self.interval, self.peak = interval, 0
        self._stop_event = threading.Event()

    def _sample(self) -> None:
        self.peak = max(self.peak, process_status(["RssAnon"]).get("RssAnon", 0))

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        """Stop sampling; the peak in bytes."""
        self._stop_event.set()
        self.join()
        self._sample()
        return self.peak
