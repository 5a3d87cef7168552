"""Failure handling: retries, Retry-After, a killed upstream, mid-stream failure, breaker, fallbacks, drain."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from gateway_procs import FakeProc, GatewayProc, deployment, metric, wait_until

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


def _post(gw: GatewayProc, body: dict = CHAT, **kwargs) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=60, **kwargs)


def _start(procs: list, p):
    procs.append(p)
    return p


def test_retries_on_503_and_429_go_to_another_deployment(tmp_path, procs):
    bad = _start(procs, FakeProc(tmp_path, fail_status=503, retry_after=1))
    good = _start(procs, FakeProc(tmp_path))
    gw = _start(procs, GatewayProc(tmp_path, {"model_list": [deployment("m", bad), deployment("m", good)],
                                              "tureen_settings": {"circuit_breaker": {"consecutive_failures": 50}}}))
    results = [_post(gw) for _ in range(6)]
    assert all(r.status_code == 200 for r in results)
    assert good.stats()["completed"] == 6
    assert bad.stats()["requests"] >= 1
    assert metric(gw.metrics(), "tureen_gateway_retries_total", reason="status_503") == bad.stats()["requests"]
    bad.control(fail_status=429)
    assert _post(gw, {**CHAT, "stream": True}).status_code == 200


def test_retry_after_is_honoured_when_no_other_deployment_exists(tmp_path, procs):
    only = _start(procs, FakeProc(tmp_path, fail_status=429, retry_after=1, fail_count=1))
    gw = _start(procs, GatewayProc(tmp_path, {"model_list": [deployment("m", only)]}))
    started = time.perf_counter()
    r = _post(gw)
    assert r.status_code == 200 and only.stats()["requests"] == 2
    assert time.perf_counter() - started >= 1.0  # waited the upstream's Retry-After before the retry
    # retries are capped: an upstream that always says 429 gives the client its 429 and Retry-After
    only.control(fail_status=429, fail_count=None, retry_after=0)
    r = _post(gw)
    assert r.status_code == 429 and only.stats()["requests"] == 2 + 1 + 2  # first try + num_retries (2)


def test_killing_an_upstream_mid_run_loses_no_request_that_had_not_started(tmp_path, procs):
    a = _start(procs, FakeProc(tmp_path, ttft_s=0.8, tokens=3))
    b = _start(procs, FakeProc(tmp_path, ttft_s=0.8, tokens=3))
    gw = _start(procs, GatewayProc(tmp_path, {"model_list": [deployment("m", a), deployment("m", b)]}))
    bodies = [CHAT, {**CHAT, "stream": True}] * 6
    results: list = [None] * len(bodies)

    def one(i: int) -> None:
        results[i] = _post(gw, bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    wait_until(lambda: a.stats()["inflight"] >= 3)
    a.kill()  # every request on it is waiting for its first byte
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * len(bodies)
    for body, r in zip(bodies, results):
        if body.get("stream"):
            assert r.text.rstrip().endswith("data: [DONE]") and "error" not in r.text
        else:
            assert r.json()["choices"][0]["message"]["content"] == " t0 t1 t2"
    assert b.stats()["completed"] == len(bodies)
    assert metric(gw.metrics(), "tureen_gateway_retries_total") >= 3


def test_a_stream_that_fails_after_its_first_byte_ends_with_an_error_event_and_done(tmp_path, procs):
    dying = _start(procs, FakeProc(tmp_path, tokens=6, die_after_chunks=2))
    other = _start(procs, FakeProc(tmp_path, tokens=6))
    gw = _start(procs, GatewayProc(tmp_path, {"model_list": [deployment("m", dying, weight=1),
                                                            deployment("m", other, weight=1e-9)],
                                              "router_settings": {"routing_strategy": "weighted"}}))
    r = _post(gw, {**CHAT, "stream": True})
    assert r.status_code == 200
    data = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert [json.loads(d)["choices"][0]["delta"]["content"] for d in data[:2]] == [" t0", " t1"]
    assert json.loads(data[2])["error"]["code"] == "upstream_stream_error" and data[3] == "[DONE]"
    assert len(data) == 4
    assert other.stats()["requests"] == 0  # never silently retried
    assert metric(gw.metrics(), "tureen_gateway_midstream_errors_total") == 1


def test_breaker_opens_half_opens_with_one_trial_and_closes(tmp_path, procs):
    fake = _start(procs, FakeProc(tmp_path, fail_status=500))
    gw = _start(procs, GatewayProc(tmp_path, {
        "model_list": [deployment("m", fake)], "router_settings": {"num_retries": 0},
        "tureen_settings": {"circuit_breaker": {"consecutive_failures": 3, "cooldown_s": 3.0}}}))
    dep = f"m@127.0.0.1:{fake.port}"

    def half_open() -> bool:  # deep health reads the breaker, which turns open -> half-open after the cooldown
        httpx.get(gw.url + "/health?deep=1", timeout=10)
        return metric(gw.metrics(), "tureen_gateway_circuit_breaker_state", deployment=dep) == 2

    assert [_post(gw).status_code for _ in range(3)] == [500] * 3  # the upstream's error JSON, passed through
    assert metric(gw.metrics(), "tureen_gateway_circuit_breaker_state", deployment=dep) == 1  # open
    r = _post(gw)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_deployment"
    assert fake.stats()["requests"] == 3  # an open breaker sends nothing
    wait_until(half_open, timeout=30, interval=0.2)
    assert _post(gw).status_code == 500  # the one trial fails: open again
    assert fake.stats()["requests"] == 4
    assert _post(gw).status_code == 503
    fake.control(fail_status=None)
    wait_until(half_open, timeout=30, interval=0.2)
    assert _post(gw).status_code == 200  # the trial succeeds: closed
    assert metric(gw.metrics(), "tureen_gateway_circuit_breaker_state", deployment=dep) == 0
    assert [_post(gw).status_code for _ in range(3)] == [200] * 3


def test_a_client_error_does_not_trip_the_breaker(tmp_path, procs):
    fake = _start(procs, FakeProc(tmp_path, fail_status=400))
    gw = _start(procs, GatewayProc(tmp_path, {
        "model_list": [deployment("m", fake)],
        "tureen_settings": {"circuit_breaker": {"consecutive_failures": 2}}}))
    assert [_post(gw).status_code for _ in range(4)] == [400] * 4
    assert fake.stats()["requests"] == 4


def test_fallbacks_and_context_window_fallbacks(tmp_path, procs):
    broken = _start(procs, FakeProc(tmp_path, fail_status=500))
    small = _start(procs, FakeProc(tmp_path, max_prompt_chars=20))
    backup = _start(procs, FakeProc(tmp_path))
    big = _start(procs, FakeProc(tmp_path))
    gw = _start(procs, GatewayProc(tmp_path, {
        "model_list": [deployment("broken", broken), deployment("small", small), deployment("backup", backup),
                       deployment("big", big)],
        "router_settings": {"num_retries": 0, "fallbacks": [{"broken": ["backup"]}],
                            "context_window_fallbacks": [{"small": ["big"]}]}}))
    r = _post(gw, {**CHAT, "model": "broken"})
    assert r.status_code == 200 and backup.stats()["completed"] == 1
    long = {"model": "small", "messages": [{"role": "user", "content": "x" * 100}]}
    r = _post(gw, long)
    assert r.status_code == 200 and big.stats()["completed"] == 1 and small.stats()["failed"] == 1
    assert _post(gw, {**CHAT, "model": "small"}).status_code == 200 and small.stats()["completed"] == 1
    text = gw.metrics()
    assert metric(text, "tureen_gateway_fallbacks_total", model="broken", fallback="backup", kind="fallbacks") == 1
    assert metric(text, "tureen_gateway_fallbacks_total", model="small", fallback="big",
                  kind="context_window_fallbacks") == 1


def test_sigterm_drains_in_flight_streams_and_refuses_new_requests(tmp_path, procs):
    fake = _start(procs, FakeProc(tmp_path, ttft_s=0.05, itl_s=0.1, tokens=15))
    gw = _start(procs, GatewayProc(tmp_path, {"model_list": [deployment("m", fake)]}))
    result: dict = {}

    def stream() -> None:
        result["response"] = _post(gw, {**CHAT, "stream": True})

    t = threading.Thread(target=stream)
    t.start()
    wait_until(lambda: fake.stats()["inflight"] == 1)
    gw.terminate()
    refused = wait_until(lambda: (r := _post(gw)).status_code == 503 and r)
    assert refused.json()["error"]["code"] == "draining" and "retry-after" in refused.headers
    assert httpx.get(gw.url + "/health").status_code == 503
    t.join()
    text = result["response"].text
    assert text.rstrip().endswith("data: [DONE]") and text.count("data: ") == 16 and "error" not in text
    assert gw.proc.wait(20) == 0


def test_workers_share_the_port_and_drain_on_sigterm(tmp_path, procs):
    import subprocess
    import sys

    import yaml

    from gateway_procs import _wait
    from serve_process import _free_port

    fake = _start(procs, FakeProc(tmp_path, ttft_s=0.05, itl_s=0.1, tokens=15))
    config = tmp_path / "workers.yaml"
    config.write_text(yaml.safe_dump({"model_list": [deployment("m", fake)]}))
    port = _free_port()
    log = tmp_path / "workers.log"
    proc = subprocess.Popen([sys.executable, "-m", "tureen.cli", "gateway", "--config", str(config), "--host",
                             "127.0.0.1", "--port", str(port), "--workers", "2"], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(url + "/health", proc, log)
        wait_until(lambda: log.read_text().count("Application startup complete") == 2)
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(r=httpx.post(url + "/v1/chat/completions", timeout=60,
                                                                       json={**CHAT, "stream": True})))
        t.start()
        wait_until(lambda: fake.stats()["inflight"] == 1)
        proc.send_signal(signal.SIGTERM)
        t.join()
        assert result["r"].text.rstrip().endswith("data: [DONE]") and "error" not in result["r"].text
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_timeouts_fail_over_and_count_against_the_breaker(tmp_path, procs):
    stuck = _start(procs, FakeProc(tmp_path, delay_s=30))
    good = _start(procs, FakeProc(tmp_path))
    gw = _start(procs, GatewayProc(tmp_path, {
        "model_list": [deployment("m", stuck, timeout=0.5, weight=1), deployment("m", good, weight=1e-9),
                       deployment("lonely", stuck, timeout=0.5)],
        "router_settings": {"routing_strategy": "weighted"},
        "tureen_settings": {"circuit_breaker": {"consecutive_failures": 2, "cooldown_s": 60}}}))
    r = _post(gw)  # the stuck deployment times out before its first byte; the retry goes to the other one
    assert r.status_code == 200 and good.stats()["completed"] == 1
    assert metric(gw.metrics(), "tureen_gateway_retries_total", reason="timeout") == 1
    r = _post(gw, {**CHAT, "model": "lonely", "stream": True})
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    r = _post(gw, {**CHAT, "model": "lonely"})
    assert r.status_code == 503  # two timeouts in a row opened its breaker


def test_an_upstream_refusing_the_gateways_credentials_fails_over_and_is_not_the_clients_401(tmp_path, procs):
    rotated = _start(procs, FakeProc(tmp_path, fail_status=401))
    good = _start(procs, FakeProc(tmp_path))
    gw = _start(procs, GatewayProc(tmp_path, {
        "model_list": [deployment("m", rotated, weight=1), deployment("m", good, weight=1e-9),
                       deployment("only", rotated)],
        "router_settings": {"routing_strategy": "weighted"}}))
    assert _post(gw).status_code == 200 and good.stats()["completed"] == 1
    r = _post(gw, {**CHAT, "model": "only"})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_auth_error"


def test_fallbacks_stay_within_the_keys_models(tmp_path, procs):
    broken = _start(procs, FakeProc(tmp_path, fail_status=500))
    backup = _start(procs, FakeProc(tmp_path))
    gw = _start(procs, GatewayProc(tmp_path, {
        "model_list": [deployment("small", broken), deployment("big", backup)],
        "general_settings": {"master_key": "os.environ/GW_MASTER"},
        "router_settings": {"num_retries": 0, "fallbacks": [{"small": ["big"]}]}}, env={"GW_MASTER": "sk-m-fb"}))
    admin = {"Authorization": "Bearer sk-m-fb"}
    narrow = httpx.post(gw.url + "/key/generate", json={"models": ["small"]}, headers=admin).json()["key"]
    wide = httpx.post(gw.url + "/key/generate", json={"models": ["small", "big"]}, headers=admin).json()["key"]
    body = {**CHAT, "model": "small"}
    assert _post(gw, body, headers={"Authorization": f"Bearer {narrow}"}).status_code == 500
    assert backup.stats()["requests"] == 0
    assert _post(gw, body, headers={"Authorization": f"Bearer {wide}"}).status_code == 200
    assert backup.stats()["completed"] == 1
