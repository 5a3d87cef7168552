"""RequestTracker's inter-token latency: timed by the engine's token stamps, however outputs arrive."""

from __future__ import annotations

import pytest

from tureen.engine.protocol import EngineStats
from tureen.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tureen.server.metrics import ServerMetrics
from tureen.server.tracking import RequestTracker


def output(tokens: int, first: float, last: float, finished: bool = False) -> RequestOutput:
    completion = CompletionOutput(index=0, text="x" * tokens, token_ids=[7] * tokens, cumulative_logprob=None,
                                  logprobs=None, finish_reason="length" if finished else None)
    timing = RequestMetrics(arrival_time=first - 1.0, first_token_time=first, last_token_time=last)
    return RequestOutput("r", None, [1, 2], [completion], finished, metrics=timing)


def itl_samples(metrics: ServerMetrics) -> tuple[float, float]:
    count = metrics.registry.get_sample_value("vllm:inter_token_latency_seconds_count", {"model_name": "m", "engine": "0"}) or 0.0
    total = metrics.registry.get_sample_value("vllm:inter_token_latency_seconds_sum", {"model_name": "m", "engine": "0"}) or 0.0
    return count, total


@pytest.fixture
def metrics() -> ServerMetrics:
    return ServerMetrics("m", 256, lambda: EngineStats(), {})


def test_all_tokens_merged_into_one_output_still_count_every_gap(metrics):
    # a reader that lagged gets 8 tokens at once: 7 gaps, spread over the engine's 0.7 s
    tracker = RequestTracker("r", 2, 1, 8, metrics)
    tracker.observe(output(8, first=100.0, last=100.7, finished=True))
    count, total = itl_samples(metrics)
    assert count == 7 and total == pytest.approx(0.7)


def test_token_by_token_and_merged_outputs_give_the_same_sum(metrics):
    tracker = RequestTracker("r", 2, 1, 8, metrics)
    tracker.observe(output(1, first=100.0, last=100.0))
    tracker.observe(output(1, first=100.0, last=100.25))
    tracker.observe(output(3, first=100.0, last=100.55))  # three steps merged
    count, total = itl_samples(metrics)
    assert count == 4 and total == pytest.approx(0.55)


def test_outputs_without_tokens_observe_nothing(metrics):
    tracker = RequestTracker("r", 2, 1, 8, metrics)
    tracker.observe(RequestOutput("r", None, [1, 2], [CompletionOutput(0, "", [], None, None)], False,
                                  metrics=RequestMetrics(arrival_time=1.0)))
    assert itl_samples(metrics)[0] == 0
