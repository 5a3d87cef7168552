"""Per-request bookkeeping: serving metrics and the one structured log line per finished request."""

from __future__ import annotations

import logging
import time

from tureen.outputs import RequestMetrics, RequestOutput
from tureen.server.metrics import ServerMetrics

logger = logging.getLogger("tureen.server.requests")


def logfmt(fields: dict[str, object]) -> str:
    """``key=value`` pairs; floats to the millisecond, strings with spaces quoted."""
    parts = []
    for key, value in fields.items():
        if isinstance(value, float):
            value = f"{value:.3f}"
        elif isinstance(value, str) and (" " in value or not value):
            value = '"' + value.replace('"', '\\"') + '"'
        parts.append(f"{key}={value}")
    return " ".join(parts)


class RequestTracker:
    """Follows one engine request's outputs; ``finish()`` records its metrics and log line once."""

    def __init__(self, request_id: str, prompt_tokens: int, n: int, max_tokens: int | None,
                 metrics: ServerMetrics | None) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.n, self.max_tokens = n, max_tokens
        self.metrics = metrics
        self.generated = 0
        self.cached = 0
        self.finish_reasons: dict[int, str] = {}
        self.timing: RequestMetrics | None = None
        self.start = time.time()
        self._last_token_time: float | None = None  # the engine's stamp of the last token counted
        self._done = False

    def observe(self, out: RequestOutput) -> int:
        """Count one output's tokens (and their gaps); returns the most tokens any of its completions got."""
        self.timing = out.metrics or self.timing
        self.cached = out.num_cached_tokens
        steps = 0
        for c in out.outputs:  # one pass: this runs for every token of every stream
            tokens = len(c.token_ids)
            self.generated += tokens
            steps = tokens if tokens > steps else steps
            if c.finish_reason is not None:
                self.finish_reasons[c.index] = c.finish_reason
        if steps:
            self._observe_token_gaps(steps, out.metrics)
        return steps

    def _observe_token_gaps(self, tokens: int, timing: RequestMetrics | None) -> None:
        """One ITL observation per token after the first, timed by the engine's own token stamps.

        An output can carry several steps' tokens (a lagging reader's merged deltas, a speculative
        step), so the time since the last counted token is spread evenly over them. Timing by when
        outputs reach this process instead would count no gap at all for a reader that got every
        token at once.
        """
        if timing is None or timing.last_token_time is None:
            return
        if self._last_token_time is None:
            start, gaps = timing.first_token_time, tokens - 1
        else:
            start, gaps = self._last_token_time, tokens
        self._last_token_time = timing.last_token_time
        if self.metrics is None or start is None or gaps <= 0:
            return
        gap = max(timing.last_token_time - start, 0.0) / gaps
        for _ in range(gaps):
            self.metrics.itl.observe(gap)

    @property
    def finish_reason(self) -> str:
        """The request's reason: abort beats length beats stop across its ``n`` completions."""
        reasons = set(self.finish_reasons.values())
        if len(self.finish_reasons) < self.n or "abort" in reasons:
            return "abort"
        return "length" if "length" in reasons else "stop"

    def finish(self) -> None:
        if self._done:
            return
        self._done = True
        times = self._times()
        if self.metrics is not None:
            self._record(times)
        logger.info("request finished %s", logfmt({
            "id": self.request_id, "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated,
            "cached_tokens": self.cached, **{k: v for k, v in times.items() if v is not None},
            "finish_reason": self.finish_reason}))

    def _times(self) -> dict[str, float | None]:
        m = self.timing
        arrival = m.arrival_time if m else self.start
        finished = (m.finished_time if m and m.finished_time else None) or time.time()
        out: dict[str, float | None] = {"queue_time_s": None, "ttft_s": None, "prefill_s": None,
                                        "decode_s": None, "e2e_s": finished - arrival}
        if m and m.first_scheduled_time:
            out["queue_time_s"] = m.first_scheduled_time - arrival
        if m and m.first_token_time:
            out["ttft_s"] = m.first_token_time - arrival
            if m.first_scheduled_time:
                out["prefill_s"] = m.first_token_time - m.first_scheduled_time
            out["decode_s"] = (m.last_token_time or m.first_token_time) - m.first_token_time
        return out

    def _record(self, t: dict[str, float | None]) -> None:
        mx = self.metrics
        assert mx is not None
        mx.request_success[self.finish_reason].inc()
        mx.e2e.observe(t["e2e_s"])
        mx.prompt_tokens.observe(self.prompt_tokens)
        mx.generation_tokens.observe(self.generated)
        mx.params_n.observe(self.n)
        if self.max_tokens is not None:
            mx.params_max_tokens.observe(self.max_tokens)
        for value, hist in ((t["queue_time_s"], mx.queue), (t["ttft_s"], mx.ttft), (t["prefill_s"], mx.prefill),
                            (t["decode_s"], mx.decode)):
            if value is not None:
                hist.observe(max(value, 0.0))
        if t["prefill_s"] is not None and t["decode_s"] is not None:
            mx.inference.observe(max(t["prefill_s"] + t["decode_s"], 0.0))
        per_sequence = self.generated / max(self.n, 1)
        if t["decode_s"] is not None and per_sequence > 1:
            mx.tpot.observe(max(t["decode_s"], 0.0) / (per_sequence - 1))
