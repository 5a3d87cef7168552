"""A cache tier's failure behaviour: skip it for a while, count it, log it at most once a minute."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tureen.gateway.accounting import EveryLog

T = TypeVar("T")


class TierUnavailable(Exception):
    """The tier's store cannot be used right now; the request goes on without it."""


class Degrader:
    """Runs a tier's store calls; after a failure the tier is skipped for ``probe_interval_s``."""

    def __init__(self, tier: str, probe_interval_s: float, on_error: Callable[[str, str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.tier, self.probe_interval_s = tier, probe_interval_s
        self._on_error, self._clock = on_error, clock
        self._down_until = 0.0
        self._log = EveryLog(60.0)

    @property
    def up(self) -> bool:
        return self._clock() >= self._down_until

    async def run(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        if not self.up:
            self._on_error(self.tier, operation)
            raise TierUnavailable(self.tier)
        try:
            return await call()
        except Exception as exc:  # any store failure: the cache is skipped, never the request failed
            self._down_until = self._clock() + self.probe_interval_s
            self._on_error(self.tier, operation)
            self._log.warning("the %s cache is unavailable (%s in %s); requests go to the upstream",
                              self.tier, type(exc).__name__, operation)
            raise TierUnavailable(self.tier) from None
