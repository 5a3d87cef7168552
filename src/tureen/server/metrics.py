"""Prometheus metrics under vLLM's names, labels and meanings.

Engine-state metrics (gauges and cumulative counters kept by the engine) are read from the engine's
stats snapshot at scrape time by a custom collector, so they are never stale or double counted.
Per-request metrics (latency and size histograms, finished requests by reason) are observed by the
HTTP layer from each request's ``RequestMetrics`` timestamps. Every series carries ``model_name``
(and ``engine="0"``, as vLLM does), so Grafana dashboards, KEDA triggers and the Gateway API
Inference Extension read them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

FINISH_REASONS = ("stop", "length", "abort")
SHED_REASONS = ("queue_full", "kv_cache_full", "draining", "starting")
ABORT_REASONS = ("client_disconnect", "timeout", "shutdown")

# vLLM's bucket choices (vllm/v1/metrics/loggers.py), so dashboards' bucket-based quantiles carry over.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
# vLLM's per-token buckets, with three finer ones in front for CPU-sized models.
TOKEN_LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                         1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
N_BUCKETS = [1, 2, 5, 10, 20]
# From a step's end to the SSE write of its token: sub-millisecond when the hand-off is lean.
HANDOFF_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


def build_1_2_5_buckets(max_value: int) -> list[float]:
    """1, 2, 5, 10, 20, 50 ... up to ``max_value`` (vLLM's token-count buckets)."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return out
            out.append(float(m * scale))
        scale *= 10


class EngineStateCollector(Collector):
    """Reads the engine's stats snapshot at every scrape."""

    def __init__(self, labels: dict[str, str], snapshot: Callable[[], Any], cache_info: dict[str, str]) -> None:
        self.labels = labels
        self.snapshot = snapshot
        self.cache_info = cache_info

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=list(self.labels))
        g.add_metric(list(self.labels.values()), value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=list(self.labels))
        c.add_metric(list(self.labels.values()), value)
        return c

    def collect(self) -> Iterable[Metric]:
        s = self.snapshot()
        if s is None:  # the model is still loading
            return
        yield self._gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                          s.num_running)
        yield self._gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.num_waiting)
        yield self._gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage)
        yield self._gauge("vllm:gpu_cache_usage_perc",
                          "KV-cache usage. 1 means 100 percent usage. DEPRECATED: use vllm:kv_cache_usage_perc.",
                          s.kv_cache_usage)
        yield self._counter("vllm:prefix_cache_queries", "Prefix cache queries, in queried tokens.",
                            s.prefix_cache_queries)
        yield self._counter("vllm:prefix_cache_hits", "Prefix cache hits, in cached tokens.", s.prefix_cache_hits)
        yield self._counter("vllm:num_preemptions", "Cumulative number of preemptions from the engine.",
                            s.num_preemptions)
        yield self._counter("vllm:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens)
        yield self._counter("vllm:generation_tokens", "Number of generation tokens processed.", s.generation_tokens)
        yield self._counter("tureen:engine_restarts", "Times the watchdog restarted the engine process after it "
                            "crashed or stalled.", getattr(s, "engine_restarts", 0))
        yield from self._spec_decoding(getattr(s, "spec_decoding", None))
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the engine's cache config.",
                                 labels=list(self.cache_info))
        info.add_metric(list(self.cache_info.values()), 1.0)
        yield info


    def _spec_decoding(self, spec) -> Iterable[Metric]:
        """vLLM's speculative-decoding counters; absent when speculation is off, as in vLLM."""
        if spec is None:
            return
        yield self._counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.", spec.num_drafts)
        yield self._counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.", spec.num_draft_tokens)
        yield self._counter("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.",
                            spec.num_accepted_tokens)
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                      "Accepted tokens per draft position.", labels=[*self.labels, "position"])
        for pos, count in enumerate(spec.accepted_per_pos):
            per_pos.add_metric([*self.labels.values(), str(pos)], count)
        yield per_pos


class ServerMetrics:
    """All of the server's metrics, in their own registry (one per app, so tests can build several)."""

    def __init__(self, model_name: str, max_model_len: int, snapshot: Callable[[], Any],
                 cache_info: dict[str, str]) -> None:
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self.labels = {"model_name": model_name, "engine": "0"}
        self.registry.register(EngineStateCollector(self.labels, snapshot, cache_info))
        names = list(self.labels)
        self._make_histograms(names, max_model_len)
        success = Counter("vllm:request_success", "Count of finished requests, by finish reason.",
                          names + ["finished_reason"], registry=self.registry)
        self.request_success = {r: success.labels(**self.labels, finished_reason=r) for r in FINISH_REASONS}
        shed = Counter("tureen:requests_shed", "Requests refused with 503 before reaching the engine, by reason.",
                       names + ["reason"], registry=self.registry)
        self.shed = {r: shed.labels(**self.labels, reason=r) for r in SHED_REASONS}
        aborted = Counter("tureen:requests_aborted", "Requests the server aborted while in the engine, by reason.",
                          names + ["reason"], registry=self.registry)
        self.aborted = {r: aborted.labels(**self.labels, reason=r) for r in ABORT_REASONS}

    def _histogram(self, name: str, doc: str, names: list[str], buckets: list[float]):
        return Histogram(name, doc, names, buckets=buckets, registry=self.registry).labels(**self.labels)

    def _make_histograms(self, names: list[str], max_model_len: int) -> None:
        tokens = build_1_2_5_buckets(max_model_len)
        h = self._histogram
        self.ttft = h("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                      names, TTFT_BUCKETS)
        self.itl = h("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                     names, TOKEN_LATENCY_BUCKETS)
        self.tpot = h("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.",
                      names, TOKEN_LATENCY_BUCKETS)
        self.e2e = h("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                     names, REQUEST_LATENCY_BUCKETS)
        self.queue = h("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
                       names, REQUEST_LATENCY_BUCKETS)
        self.inference = h("vllm:request_inference_time_seconds",
                           "Histogram of time spent in RUNNING phase for request.", names, REQUEST_LATENCY_BUCKETS)
        self.prefill = h("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
                         names, REQUEST_LATENCY_BUCKETS)
        self.decode = h("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
                        names, REQUEST_LATENCY_BUCKETS)
        self.prompt_tokens = h("vllm:request_prompt_tokens", "Number of prefill tokens processed.", names, tokens)
        self.generation_tokens = h("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                   names, tokens)
        self.params_n = h("vllm:request_params_n", "Histogram of the n request parameter.", names, N_BUCKETS)
        self.params_max_tokens = h("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.",
                                   names, tokens)
        self.handoff = h("tureen:step_to_sse_write_seconds",
                         "Time from the end of the engine step that produced a streamed token to the write of "
                         "its SSE chunk to the client's socket.", names, HANDOFF_BUCKETS)

    def render(self) -> bytes:
        return generate_latest(self.registry)
