"""The step-end to SSE-write hand-off: the server's histogram, and the benchmark's reading of it."""

from __future__ import annotations

import math

import pytest
from fake_engine import ScriptedEngine
from prometheus_client.parser import text_string_to_metric_families
from test_server_app import ThreadServer

from tureen.bench.http_overhead import handoff_summary, histogram_quantile

HANDOFF = "tureen:step_to_sse_write_seconds"


class LateStampEngine(ScriptedEngine):
    """Stamps every output's step end ``lag`` seconds in the past, as if the hand-off had been slow."""

    def __init__(self, lag: float) -> None:
        super().__init__()
        self.lag = lag

    def _output(self, rid, ids, outs, metrics, finished=True):
        out = super()._output(rid, ids, outs, metrics, finished)
        metrics.last_token_time -= self.lag
        return out


def _handoff(client) -> tuple[float, float]:
    """(count, sum) of the hand-off histogram."""
    count = total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == HANDOFF + "_count":
                count += s.value
            elif s.name == HANDOFF + "_sum":
                total += s.value
    return count, total


@pytest.fixture(scope="module")
def late():
    with ThreadServer(LateStampEngine(lag=0.5)) as s:
        s.wait_ready()
        yield s


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "hello", "max_tokens": 4, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}),
])
def test_every_streamed_token_chunk_is_timed_from_its_step_end(late, path, body):
    with late.client() as c:
        count0, sum0 = _handoff(c)
        with c.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            lines = list(r.iter_lines())
        count1, sum1 = _handoff(c)
    assert "data: [DONE]" in lines
    assert count1 - count0 == 4  # one per token chunk; the chat role chunk carries no token
    assert sum1 - sum0 >= 4 * 0.5  # measured from the engine's (here back-dated) step end


def test_non_streamed_requests_are_not_counted(late):
    with late.client() as c:
        count0, _ = _handoff(c)
        assert c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3}).status_code == 200
        count1, _ = _handoff(c)
    assert count1 == count0


def test_histogram_quantile_interpolates_within_buckets():
    edges = [0.001, 0.01, math.inf]
    cumulative = {0.001: 50.0, 0.01: 100.0, math.inf: 100.0}
    assert histogram_quantile(0.5, edges, cumulative) == pytest.approx(0.001)
    assert histogram_quantile(0.25, edges, cumulative) == pytest.approx(0.0005)
    assert histogram_quantile(0.75, edges, cumulative) == pytest.approx(0.0055)
    beyond = {0.001: 10.0, 0.01: 20.0, math.inf: 100.0}
    assert histogram_quantile(0.99, edges, beyond) == pytest.approx(0.01)  # only the last finite edge is known


def test_handoff_summary_is_of_one_run():
    before = {0.001: 10.0, 0.01: 10.0, math.inf: 10.0, -1.0: 0.005}
    after = {0.001: 10.0, 0.01: 30.0, math.inf: 30.0, -1.0: 0.105}
    summary = handoff_summary(before, after)
    assert summary["count"] == 20
    assert summary["mean"] == pytest.approx(0.1 / 20 * 1000)
    assert 1.0 < summary["p50"] < 10.0
    assert handoff_summary({}, {}) == {}


def test_bench_http_overhead_runs_both_sides_every_round(llama_dir, tmp_path):
    """The whole benchmark on the tiny checkpoint, two rounds (the second runs HTTP first): every
    list has one entry per round, the ratios are HTTP over offline, and no server is left behind."""
    import json

    from tureen.bench.http_overhead import Level
    from tureen.cli import main

    out = tmp_path / "overhead.json"
    code = main(["bench", "http-overhead", str(llama_dir), "--num-prompts", "4", "--input-len", "8",
                 "--output-len", "6", "--concurrency", "2", "--single-stream", "2", "--repeat", "2",
                 "--max-model-len", "64", "--kv-cache-memory", "16MiB", "--save-result", str(out)])
    assert code in (0, None)
    doc = json.loads(out.read_text())
    assert doc["repeat"] == 2 and [lv["concurrency"] for lv in doc["levels"]] == [1, 2]
    for lv in doc["levels"]:
        assert len(lv["offline_tok_s"]) == len(lv["http_tok_s"]) == len(lv["cpu_us_per_token"]) == 2
        assert lv["ratios"] == pytest.approx([h / o for h, o in zip(lv["http_tok_s"], lv["offline_tok_s"])])
        assert all(c["offline"] > 0 and c["engine"] > 0 for c in lv["cpu_us_per_token"])
    assert set(Level.__dataclass_fields__) <= set(doc["levels"][0])
    import psutil

    left = [p for p in psutil.Process().children(recursive=True) if "tureen" in " ".join(p.cmdline())]
    assert not left, [p.cmdline() for p in left]
