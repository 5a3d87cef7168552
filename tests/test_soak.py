"""``tureen bench soak`` in its CI form: 30 s against a real server, and against a gateway with two replicas.

The full run (10 minutes, 64 streams, 30% disconnects) is the README's command; this one keeps
every assertion with a shorter duration and fewer streams (CI has 2 cores).
"""

from __future__ import annotations

import httpx
import pytest
from gateway_procs import GatewayProc
from serve_process import ServerProcess

from tureen.bench.soak import Outcome, SoakConfig, failures, rss_growth, run_soak, settle, windows

KEY = "sk-soak"
AUTH = {"Authorization": f"Bearer {KEY}"}
CI = dict(duration=30.0, concurrency=12, disconnect_share=0.3, bad_share=0.1, window=5.0, settle_s=60.0)


@pytest.fixture(scope="module")
def replicas(llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("soak")
    servers = [ServerProcess(llama_dir, tmp / f"serve{i}.log", name="tiny", key=KEY) for i in range(2)]
    try:
        yield [s.wait_healthy() for s in servers]
    finally:
        for s in servers:
            s.stop()


def assert_invariants(report: dict) -> None:
    assert report["failures"] == [], report["failures"]
    assert report["lost"] == 0 and report["unplanned_5xx"] == 0 and report["greedy_mismatches"] == 0
    assert report["leaked_blocks"] == 0
    assert report["disconnects"] > 0 and report["documented_errors"] > 0 and report["greedy_checked"] > 0
    assert report["reference"] == "offline engine"
    assert report["rss_growth"] is not None and report["metrics_scrapes"] > 0
    assert any(w["ttft_p50"] is not None for w in report["windows"])


def test_soak_the_server(replicas, llama_dir, tmp_path):
    server = replicas[0]
    config = SoakConfig(server.url, api_key=KEY, model=str(llama_dir), pids=(server.proc.pid,),
                        max_rss_growth=0.25, **CI)  # 30 s includes warm-up allocations; 10 min: 5%
    report = run_soak(config, quiet=True)
    assert_invariants(report)
    log = server.log_text()
    assert KEY not in log  # security: no key in the server's log at the default level
    assert not any(prompt in log for prompt in ("The capital of France", "Once upon a time", "fibonacci"))


def test_soak_a_gateway_with_two_replicas(replicas, llama_dir, tmp_path):
    entries = [{"model_name": "tiny", "litellm_params": {"model": "hosted_vllm/tiny", "api_base": s.url + "/v1",
                                                          "api_key": "os.environ/SOAK_KEY"},
                "tureen_params": {"tokenizer": str(llama_dir)}, "model_info": {"id": f"replica{i}"}}
               for i, s in enumerate(replicas)]
    gw = GatewayProc(tmp_path, {"model_list": entries}, env={"SOAK_KEY": KEY})
    try:
        # The gateway has no KV metrics of its own: the soak checks each replica's (--metrics-url per replica).
        config = SoakConfig(gw.url, model=str(llama_dir), pids=(gw.proc.pid, *(s.proc.pid for s in replicas)),
                            max_rss_growth=0.25, metrics_urls=tuple(s.url for s in replicas), **CI)
        report = run_soak(config, quiet=True)
        assert report["failures"] == [], report["failures"]
        assert [e["url"] for e in report["engines"]] == [s.url for s in replicas]
        assert all(e["leaked_blocks"] == 0 and e["num_blocks"] for e in report["engines"])
        assert report["leaked_blocks"] == 0 and len(report["rss_by_pid"]) == 3
        assert all(r["growth"] is not None for r in report["rss_by_pid"].values())
        assert report["lost"] == 0 and report["unplanned_5xx"] == 0 and report["greedy_mismatches"] == 0
        assert report["disconnects"] > 0 and report["greedy_checked"] > 0
        assert set(report["metrics_scraped_urls"]) == {gw.url, *(s.url for s in replicas)}
        served = [metric_total(s.url, "vllm:request_success_total") for s in replicas]
        assert all(n > 0 for n in served), served  # both replicas served
        assert KEY not in gw.log_text()
    finally:
        gw.stop()


def metric_total(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_the_invariants_catch_what_they_guard():
    outcomes = [Outcome("greedy", 0.5, 200, "complete", ttft=0.1, itls=[0.01, 0.02]),
                Outcome("greedy", 6.0, 200, "mismatch", ttft=0.3, detail="x"),
                Outcome("bad", 7.0, 500, "unplanned_5xx")]
    rows = windows(outcomes, 5.0)
    assert rows[0]["requests"] == 1 and rows[0]["ttft_p50"] == pytest.approx(0.1)
    assert rows[1]["requests"] == 2 and rows[1]["itl_p50"] is None
    assert rss_growth([(0.0, 100), (1.0, 100), (9.0, 120), (10.0, 120)], 10.0) == pytest.approx(0.2)
    engines = [{"url": "http://a", "leaked_blocks": 3, "metrics": {"vllm:num_requests_running": 2.0}},
               {"url": "http://b", "leaked_blocks": 0, "metrics": {}},
               {"url": "http://gw", "leaked_blocks": None, "metrics": {}}]
    report = {"lost": 1, "unplanned_5xx": 1, "greedy_mismatches": 1, "metrics_scrape_errors": 0,
              "engines": engines, "rss_by_pid": {1: {"growth": 0.2}, 2: {"growth": 0.01}}, "greedy_checked": 2}
    found = failures(report, SoakConfig("http://x", max_rss_growth=0.05))
    assert len(found) == 7, found
    assert any("leaked KV blocks on http://a: 3" in f for f in found) and any("pid 1 grew" in f for f in found)
    assert any("no KV figures on http://gw" in f for f in found) and not any("pid 2" in f for f in found)
