"""The server's life: starting, ready, draining, stopped; admission control and graceful drain.

Admission runs before a request reaches the engine. It refuses (503 + Retry-After) while the model
loads, while draining for shutdown, when ``--max-queue-len`` requests already wait, and when the
KV cache has no headroom (usage at ``--kv-cache-shed-threshold`` with requests already waiting):
a fast 503 lets a load balancer retry elsewhere instead of queueing behind a full replica.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import TYPE_CHECKING, Any

from tureen.errors import EngineDeadError, EngineOverloadedError
from tureen.server.config import ServerConfig
from tureen.server.logprobs import TokenStrings
from tureen.server.metrics import ServerMetrics
from tureen.server.tracking import RequestTracker

if TYPE_CHECKING:
    from tureen.engine.protocol import EngineClient

logger = logging.getLogger("tureen.server")

OVERLOAD_RETRY_AFTER_S = 1.0
STARTING_RETRY_AFTER_S = 5.0


class Phase(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


class ServerState:
    """Shared by every route: the engine (once loaded), metrics, and the requests in flight."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.phase = Phase.STARTING
        self.engine: EngineClient | None = None
        self.metrics: ServerMetrics | None = None
        self.token_strings: TokenStrings | None = None
        self.max_prompt_chars = 0
        self.inflight: dict[str, RequestTracker] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain_deadline: float | None = None

    # ---- startup ---------------------------------------------------------------------------
    def set_ready(self, engine: EngineClient, metrics: ServerMetrics) -> None:
        self.engine, self.metrics = engine, metrics
        self.token_strings = TokenStrings(engine.tokenizer)
        # No text longer than this can fit in max_model_len tokens: rejected before tokenizing it.
        self.max_prompt_chars = engine.max_model_len * engine.tokenizer.max_token_chars
        if self.phase is Phase.STARTING:
            self.phase = Phase.READY

    def stats(self) -> Any:
        return None if self.engine is None else self.engine.stats()

    # ---- health ----------------------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        """(healthy, reason). Reads only the engine's published snapshot: no lock, no tokenizer."""
        if self.phase is Phase.STARTING:
            return False, "starting"
        if self.phase is not Phase.READY:
            return False, "draining"
        assert self.engine is not None
        s = self.engine.stats()
        if not s.is_alive:  # down: being restarted by the watchdog, or gone for good
            return False, "engine_restarting" if self.engine.is_alive else "engine_dead"
        if time.monotonic() - s.heartbeat > self.config.watchdog_timeout:
            return False, "engine_stalled"
        return True, "ok"

    # ---- admission -------------------------------------------------------------------------
    def admit(self, num_requests: int) -> None:
        """Raise EngineOverloadedError (counted by reason) unless ``num_requests`` more may enter."""
        try:
            self._check_admission(num_requests)
        except EngineOverloadedError as exc:
            if self.metrics is not None:
                self.metrics.shed[exc.reason].inc()
            logger.warning("shed request: %s", exc)
            raise

    def _check_admission(self, num_requests: int) -> None:
        if self.phase is Phase.STARTING:
            raise EngineOverloadedError("The model is still loading; retry shortly.", "starting",
                                        STARTING_RETRY_AFTER_S)
        if self.phase is not Phase.READY:
            raise EngineOverloadedError("The server is shutting down and accepts no new requests.", "draining",
                                        self._drain_time_left() + 1.0)
        assert self.engine is not None
        s = self.engine.stats()
        if not s.is_alive:
            raise EngineDeadError("The engine is restarting after a failure; retry shortly." if self.engine.is_alive
                                  else "The engine has stopped; this server cannot serve requests.")
        # The engine's count lags by up to one iteration; requests admitted here beyond what one
        # step can run (max_num_seqs) are certainly waiting, seen by the engine yet or not.
        waiting = max(s.num_waiting, len(self.inflight) - self.engine.config.scheduler.max_num_seqs)
        if waiting + num_requests > self.config.max_queue_len:
            raise EngineOverloadedError(
                f"The server is overloaded: {waiting} requests are already waiting (--max-queue-len "
                f"{self.config.max_queue_len}).", "queue_full", OVERLOAD_RETRY_AFTER_S)
        if waiting > 0 and s.kv_cache_usage >= self.config.kv_cache_shed_threshold:
            raise EngineOverloadedError(
                f"The server is overloaded: the KV cache is {s.kv_cache_usage:.0%} full and {waiting} requests "
                "are waiting for it.", "kv_cache_full", OVERLOAD_RETRY_AFTER_S)

    def _drain_time_left(self) -> float:
        if self._drain_deadline is None:
            return 0.0
        return max(0.0, self._drain_deadline - time.monotonic())

    # ---- in-flight registry ----------------------------------------------------------------
    def register(self, tracker: RequestTracker) -> None:
        self.inflight[tracker.request_id] = tracker
        self._idle.clear()

    def unregister(self, request_id: str) -> None:
        self.inflight.pop(request_id, None)
        if not self.inflight:
            self._idle.set()

    # ---- shutdown --------------------------------------------------------------------------
    def begin_drain(self) -> None:
        if self.phase in (Phase.DRAINING, Phase.STOPPED):
            return
        self.phase = Phase.DRAINING
        self._drain_deadline = time.monotonic() + self.config.shutdown_timeout
        logger.info("shutting down: refusing new requests, letting %d in flight finish (up to %.0f s)",
                    len(self.inflight), self.config.shutdown_timeout)

    async def drain(self) -> None:
        """Stop admitting, wait for in-flight requests up to --shutdown-timeout, abort the rest."""
        self.begin_drain()
        try:
            await asyncio.wait_for(self._idle.wait(), self._drain_time_left())
        except TimeoutError:
            await self._abort_inflight()
        self.phase = Phase.STOPPED
        logger.info("drained: no requests in flight")

    async def _abort_inflight(self) -> None:
        ids = list(self.inflight)
        logger.warning("shutdown timeout reached: aborting %d requests still in flight", len(ids))
        for request_id in ids:
            if self.metrics is not None:
                self.metrics.aborted["shutdown"].inc()
            if self.engine is not None:
                await self.engine.abort(request_id)
        try:  # aborted streams end with finish_reason "abort" on the engine's next iteration
            await asyncio.wait_for(self._idle.wait(), 5.0)
        except TimeoutError:
            logger.error("%d requests did not finish after abort", len(self.inflight))
