"""Rate-limit repeated log lines, so a storm of one error cannot fill the disk.

A line repeated more than ``burst`` times within ``window`` seconds (same logger, level and message
template, e.g. asyncio's ``socket.accept() out of system resource`` while descriptors run out) is
dropped; the next one let through after the window says how many were dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_KEYS = 1024  # distinct line templates tracked at once


@dataclass
class _Seen:
    window_start: float
    count: int = 0
    dropped: int = 0


class RepeatedLineFilter(logging.Filter):
    def __init__(self, burst: int = 5, window: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.window, self.clock = burst, window, clock
        self._seen: dict[tuple[str, int, str], _Seen] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        seen = self._seen.get(key)
        if seen is None or now - seen.window_start >= self.window:
            dropped = seen.dropped if seen is not None else 0
            if len(self._seen) >= MAX_KEYS:
                self._seen.clear()
            seen = self._seen[key] = _Seen(now)
            if dropped:
                record.msg = f"{record.msg} [{dropped} similar lines suppressed in the last {self.window:g} s]"
        seen.count += 1
        if seen.count > self.burst:
            seen.dropped += 1
            return False
        return True


def install(burst: int = 5, window: float = 10.0) -> RepeatedLineFilter:
    """Add one filter to every handler of the root logger (where all tureen/uvicorn/asyncio lines end)."""
    line_filter = RepeatedLineFilter(burst, window)
    for handler in logging.getLogger().handlers:
        handler.addFilter(line_filter)
    return line_filter
