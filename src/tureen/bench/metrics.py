"""Benchmark metrics, with the names and definitions of ``vllm bench serve``'s result JSON.

Latency statistics are in milliseconds (``mean_ttft_ms``, ``p99_tpot_ms`` ...); per-request
arrays (``ttfts``, ``itls``, ``latencies``) are in seconds, as in vLLM.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from tureen.bench.client import RequestRecord

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
# Always reported, whatever --percentiles says: the sweep table and the plot use p99.
ALWAYS_PERCENTILES = (99.0,)


def percentile_key(p: float, metric: str) -> str:
    """``(99, "ttft") -> "p99_ttft_ms"``, ``(99.9, "itl") -> "p99.9_itl_ms"`` (vLLM's spelling)."""
    word = str(int(p)) if int(p) == p else str(p)
    return f"p{word}_{metric}_ms"


def compute_metrics(records: list[RequestRecord], duration: float, percentiles: tuple[float, ...],
                    goodput: dict[str, float]) -> dict[str, Any]:
    """Summary numbers over one run. ``records`` holds every request, failed and unsent ones too."""
    ok = [r for r in records if r.success]
    failed = [r for r in records if r.sent and not r.success]
    dur = max(duration, 1e-9)
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    result: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(failed),
        "not_sent": sum(1 for r in records if not r.sent),
        "failure_reasons": dict(Counter(r.error_reason for r in failed).most_common()),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur,
        "request_goodput": count_good(ok, goodput) / dur if goodput else None,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
    }
    result.update(peak_stats(ok))
    series = latency_series(ok)
    for metric in LATENCY_METRICS:
        result.update(summarize(series[metric], metric, percentiles))
    if any(r.cache for r in ok):
        result["cache"] = cache_stats(ok)
    return result


CACHE_ANSWERS = ("hit", "semantic-hit", "miss")


def cache_stats(ok: list[RequestRecord]) -> dict[str, Any]:
    """Through a gateway with caches: the share each tier answered, median TTFT per answer, and per
    kind of request (repeat, paraphrase, fresh) how it was answered."""
    out: dict[str, Any] = {}
    for answer in CACHE_ANSWERS:
        chosen = [r for r in ok if (r.cache or "miss") == answer]
        out[answer] = {"count": len(chosen), "rate": len(chosen) / max(1, len(ok)),
                       "p50_ttft_ms": float(np.median([r.ttft for r in chosen]) * 1000) if chosen else None}
    kinds = sorted({r.kind for r in ok if r.kind})
    out["by_kind"] = {kind: dict(Counter(r.cache or "miss" for r in ok if r.kind == kind)) for kind in kinds}
    return out


def latency_series(ok: list[RequestRecord]) -> dict[str, list[float]]:
    """Seconds per metric; TPOT only for requests with more than one output token (as vLLM)."""
    return {
        "ttft": [r.ttft for r in ok],
        "tpot": [r.tpot for r in ok if r.output_len > 1],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.e2el for r in ok],
    }


def summarize(values_s: list[float], metric: str, percentiles: tuple[float, ...]) -> dict[str, float]:
    """mean/median/std and percentiles in ms; all 0 when there are no values (vLLM does the same)."""
    arr = np.asarray(values_s or [0.0], dtype=np.float64) * 1000.0
    out = {
        f"mean_{metric}_ms": float(arr.mean()),
        f"median_{metric}_ms": float(np.median(arr)),
        f"std_{metric}_ms": float(arr.std()),
    }
    for p in sorted(set(percentiles) | set(ALWAYS_PERCENTILES)):
        out[percentile_key(p, metric)] = float(np.percentile(arr, p))
    return out


def count_good(ok: list[RequestRecord], goodput: dict[str, float]) -> int:
    """Requests meeting every SLO given (ms). One-token outputs have TPOT 0, as in vLLM."""
    def good(r: RequestRecord) -> bool:
        values = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.e2el}
        return all(values[name] * 1000.0 <= slo for name, slo in goodput.items())
    return sum(1 for r in ok if good(r))


def peak_stats(ok: list[RequestRecord]) -> dict[str, float]:
    """Peak output chunks per one-second bucket and peak requests in flight (vLLM's extras)."""
    if not ok:
        return {"max_output_tokens_per_s": 0.0, "max_concurrent_requests": 0}
    t0 = min(r.start_time for r in ok)
    end = max(r.start_time + r.e2el for r in ok)
    buckets = np.zeros(int(math.ceil(end - t0)) + 1)
    for r in ok:
        times = r.start_time + r.ttft + np.concatenate([[0.0], np.cumsum(r.itl)]) - t0
        np.add.at(buckets, np.clip(times.astype(int), 0, len(buckets) - 1), 1)
    events = sorted([(r.start_time, 1) for r in ok] + [(r.start_time + r.e2el, -1) for r in ok])
    level = peak = 0
    for _, delta in events:  # departures sort before arrivals at equal times: half-open intervals
        level += delta
        peak = max(peak, level)
    return {"max_output_tokens_per_s": float(buckets.max()), "max_concurrent_requests": peak}


def per_request_arrays(records: list[RequestRecord]) -> dict[str, list[Any]]:
    """vLLM's parallel per-request arrays (seconds), for tools that read its result files."""
    return {
        "input_lens": [r.prompt_len for r in records],
        "output_lens": [r.output_len if r.success else 0 for r in records],
        "ttfts": [r.ttft for r in records],
        "itls": [r.itl for r in records],
        "latencies": [r.e2el for r in records],
        "start_times": [r.start_time for r in records],
        "errors": [r.error for r in records],
    }


def offline_tpot_ms(out) -> list[float]:
    """An offline ``RequestOutput``'s time per output token after the first, in ms, as ``tureen
    bench serve`` computes TPOT over HTTP; empty when it has no timings or fewer than two tokens."""
    m, n = out.metrics, len(out.outputs[0].token_ids) if out.outputs else 0
    if m is None or m.first_token_time is None or m.finished_time is None or n < 2:
        return []
    return [(m.finished_time - m.first_token_time) / (n - 1) * 1000]
