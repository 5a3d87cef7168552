"""Periodic engine stats in the log: running, waiting, KV usage, throughput, prefix-cache hit rate."""

from __future__ import annotations

import asyncio
import logging
import time

from tureen.server.lifecycle import Phase, ServerState
from tureen.server.tracking import logfmt

logger = logging.getLogger("tureen.server.stats")


async def log_stats_forever(state: ServerState) -> None:
    if state.config.disable_log_stats:
        return
    last = None
    last_time = time.monotonic()
    while state.phase is not Phase.STOPPED:
        await asyncio.sleep(state.config.log_stats_interval)
        s = state.stats()
        if s is None:
            continue
        now = time.monotonic()
        if last is not None:
            log_stats_line(s, last, now - last_time)
        last, last_time = s, now


def log_stats_line(s, last, elapsed: float) -> None:
    """One line per interval; at DEBUG when the engine was idle throughout, to keep idle logs quiet."""
    prompt_tps = (s.prompt_tokens - last.prompt_tokens) / elapsed
    gen_tps = (s.generation_tokens - last.generation_tokens) / elapsed
    queries = s.prefix_cache_queries - last.prefix_cache_queries
    hits = s.prefix_cache_hits - last.prefix_cache_hits
    idle = not (prompt_tps or gen_tps or s.num_running or s.num_waiting)
    level = logging.DEBUG if idle else logging.INFO
    fields = {
        "running": s.num_running, "waiting": s.num_waiting, "kv_cache_usage_pct": 100.0 * s.kv_cache_usage,
        "prompt_tokens_per_s": prompt_tps, "generation_tokens_per_s": gen_tps,
        "prefix_cache_hit_rate_pct": 100.0 * hits / queries if queries else 0.0,
        "preemptions": s.num_preemptions - last.num_preemptions}
    spec = getattr(s, "spec_decoding", None)
    if spec is not None:  # over the interval, as vLLM's SpecDecoding metrics line does
        interval = spec.delta(getattr(last, "spec_decoding", None))
        fields.update({"spec_acceptance_rate_pct": 100.0 * interval.acceptance_rate,
                       "spec_mean_acceptance_length": interval.mean_acceptance_length,
                       "spec_drafts": interval.num_drafts})
    logger.log(level, "engine stats %s", logfmt(fields))
