"""A passive circuit breaker per deployment.

closed --(N consecutive failures, or a failure rate over a window)--> open
open --(cooldown elapsed)--> half-open: exactly one trial request is let through
half-open --(trial succeeds)--> closed; --(trial fails)--> open again, with a fresh cooldown.

Failures are what the deployment caused: timeouts, connection errors, 5xx. A 4xx caused by the
request is not reported here at all. A trial that ends without a verdict (the client went away)
frees the half-open slot with ``release``.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


class BreakerState(enum.IntEnum):  # values are the metric gauge's
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass(frozen=True)
class BreakerPolicy:
    consecutive_failures: int = 5
    failure_rate: float = 0.5
    window_s: float = 30.0
    min_requests: int = 10
    cooldown_s: float = 30.0


class CircuitBreaker:
    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[BreakerState], None] | None = None) -> None:
        self.policy = policy
        self._clock = clock
        self._on_change = on_change or (lambda state: None)
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._window: deque[tuple[float, bool]] = deque()  # (time, failed)
        self._opened_at = 0.0
        self._trial_in_flight = False

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.policy.cooldown_s:
            self._set(BreakerState.HALF_OPEN)
        return self._state

    def available(self) -> bool:
        """May a request be sent now? (Does not take the half-open trial slot.)"""
        state = self.state
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self._trial_in_flight)

    def acquire(self) -> bool:
        """Take permission for one request; in half-open this is the single trial."""
        if not self.available():
            return False
        if self._state is BreakerState.HALF_OPEN:
            self._trial_in_flight = True
        return True

    def release(self) -> None:
        """The request ended with no verdict on the deployment (cancelled, or a 4xx)."""
        self._trial_in_flight = False

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a trial through (0 when not open)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.policy.cooldown_s - (self._clock() - self._opened_at))

    def record_success(self) -> None:
        self._trial_in_flight = False
        self._consecutive = 0
        self._push(failed=False)
        if self._state is not BreakerState.CLOSED:
            self._window.clear()
            self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        self._trial_in_flight = False
        self._consecutive += 1
        self._push(failed=True)
        if self.state is BreakerState.HALF_OPEN or self._tripped():
            self._open()

    def _tripped(self) -> bool:
        if self._state is not BreakerState.CLOSED:
            return False
        if self._consecutive >= self.policy.consecutive_failures:
            return True
        failed = sum(1 for _, f in self._window if f)
        return len(self._window) >= self.policy.min_requests and failed / len(self._window) >= self.policy.failure_rate

    def _push(self, failed: bool) -> None:
        now = self._clock()
        self._window.append((now, failed))
        while self._window and now - self._window[0][0] > self.policy.window_s:
            self._window.popleft()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._consecutive = 0
        self._window.clear()
        self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        if state is not self._state:
            self._state = state
            self._on_change(state)
