"""The gateway process in front of fake upstreams: pass-through, errors, info routes, routing, overflow."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from gateway_procs import FakeProc, GatewayProc, deployment, metric, wait_until

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gw-app")
    fakes = [FakeProc(tmp, tokens=6), FakeProc(tmp, tokens=6)]
    slow = FakeProc(tmp, ttft_s=0.05, itl_s=0.3, tokens=40)
    gw = GatewayProc(tmp, {"model_list": [deployment("m", fakes[0]), deployment("m", fakes[1]),
                                          deployment("slow", slow)],
                           "router_settings": {"num_retries": 0}})
    try:
        yield gw, fakes, slow
    finally:
        gw.stop()
        for f in [*fakes, slow]:
            f.stop()


def _events(text: str) -> list:
    return [line[6:] for line in text.split("\n") if line.startswith("data: ")]


def test_non_streaming_passes_the_upstream_body_through(pair):
    gw, fakes, _ = pair
    with gw.client() as c:
        r = c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    body = r.json()
    assert body["choices"][0]["message"]["content"] == " t0 t1 t2 t3 t4 t5"
    assert body["usage"]["completion_tokens"] == 6
    assert float(r.headers["x-tureen-overhead-duration-ms"]) >= 0
    sent = [f.stats()["last_bodies"] for f in fakes]
    last = [b for bodies in sent for b in bodies][-1]
    assert last["model"] == "fake" and last["messages"] == CHAT["messages"]  # rewritten to the upstream's name


def test_streams_pass_through_unchanged_and_usage_only_when_asked(pair):
    gw, _, _ = pair
    with gw.client() as c:
        response = c.post("/v1/completions", json={"model": "m", "prompt": "hi", "stream": True})
        plain = response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        assert float(response.headers["x-tureen-overhead-duration-ms"]) >= 0
        with_usage = c.post("/v1/completions", json={"model": "m", "prompt": "hi", "stream": True,
                                                     "stream_options": {"include_usage": True}}).text
    events = _events(plain)
    assert events[-1] == "[DONE]" and len(events) == 7
    assert all(json.loads(e)["choices"] for e in events[:-1])  # the usage chunk the gateway asked for is not shown
    usage = json.loads(_events(with_usage)[-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6


def test_stream_chunks_arrive_while_the_upstream_is_still_generating(pair):
    gw, _, slow = pair
    with gw.client() as c, c.stream("POST", "/v1/chat/completions",
                                    json={**CHAT, "model": "slow", "stream": True}) as r:
        lines = r.iter_lines()  # kept: a dropped line iterator closes the response
        first = next(lines)
        assert first.startswith("data: ") and "t0" in first
        assert slow.stats()["inflight"] == 1  # not buffered: the first chunk came before the upstream finished


def test_client_disconnect_cancels_the_upstream_request(pair):
    gw, _, slow = pair
    before = slow.stats()["cancelled"]
    with gw.client() as c, c.stream("POST", "/v1/chat/completions",
                                    json={**CHAT, "model": "slow", "stream": True}) as r:
        next(r.iter_lines())
    wait_until(lambda: slow.stats()["cancelled"] == before + 1)
    assert slow.stats()["inflight"] == 0
    wait_until(lambda: metric(gw.metrics(), "tureen_gateway_client_disconnects_total", model="slow") >= 1)
    # non-streaming too: the upstream is cancelled while the gateway waits for its whole body
    with pytest.raises(httpx.TimeoutException):
        httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "model": "slow"}, timeout=0.5)
    wait_until(lambda: slow.stats()["cancelled"] == before + 2)


def test_errors_are_openai_json_with_the_right_status(pair):
    gw, _, _ = pair
    with gw.client() as c:
        cases = [
            (c.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}), 400,
             "invalid_json"),
            (c.post("/v1/chat/completions", json={"messages": []}), 400, None),
            (c.post("/v1/chat/completions", json={"model": "m", "messages": "hi"}), 400, None),
            (c.post("/v1/completions", json={"model": "ghost", "prompt": "x"}), 404, "model_not_found"),
            (c.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": "yes"}), 400, None),
            (c.get("/v1/nowhere"), 404, "not_found"),
        ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"}
        if code:
            assert error["code"] == code
        if response.request.url.path.startswith("/v1/c"):  # the generation routes: every answer says its overhead
            assert float(response.headers["x-tureen-overhead-duration-ms"]) >= 0


def test_upstream_error_json_passes_through_and_other_errors_are_wrapped(tmp_path):
    openai_shaped = {"error": {"message": "bad top_p", "type": "invalid_request_error", "param": "top_p",
                               "code": None}}
    fake = FakeProc(tmp_path, fail_status=400, fail_body=json.dumps(openai_shaped))
    gw = GatewayProc(tmp_path, {"model_list": [deployment("m", fake)]})
    try:
        with gw.client() as c:
            r = c.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 400 and r.json() == openai_shaped
            fake.control(fail_status=500, fail_body="<html>oops</html>")
            r = c.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
            assert "oops" in r.json()["error"]["message"]
        assert fake.stats()["requests"] == 2  # a 400 is the request's fault, a 500 is not retryable
    finally:
        gw.stop()
        fake.stop()


def test_models_health_deep_health_and_metrics(pair, tmp_path):
    gw, _, _ = pair
    with gw.client() as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["m", "slow"]
        assert c.get("/health").json() == {"status": "ok"}
        deep = c.get("/health", params={"deep": 1})
        assert deep.status_code == 200 and len(deep.json()["models"]["m"]["healthy"]) == 2
        text = c.get("/metrics").text
    for name in ("tureen_gateway_requests_total", "tureen_gateway_upstream_latency_seconds",
                 "tureen_gateway_overhead_seconds", "tureen_gateway_retries_total", "tureen_gateway_fallbacks_total",
                 "tureen_gateway_circuit_breaker_state", "tureen_gateway_deployment_healthy"):
        assert name in text
    assert metric(text, "tureen_gateway_requests_total", model="m", status="200") >= 1
    # one model with its only deployment down: deep health says so
    fake = FakeProc(tmp_path)
    other = GatewayProc(tmp_path, {"model_list": [deployment("a", fake), deployment("b", fake)]})
    try:
        fake.control(healthy=False)
        deep = wait_until(lambda: (r := httpx.get(other.url + "/health?deep=1")).status_code == 503 and r)
        assert deep.json()["models"]["a"]["healthy"] == []
        assert httpx.get(other.url + "/health").status_code == 200  # the gateway itself is alive
        r = httpx.post(other.url + "/v1/chat/completions", json={**CHAT, "model": "a"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_deployment"
        assert "retry-after" in r.headers
    finally:
        other.stop()
        fake.stop()


def test_access_log_line_per_request_without_prompt_or_key(pair):
    gw, _, _ = pair
    secret = "a very private prompt 42"
    access = lambda: [ln for ln in gw.log_text().splitlines() if "tureen.gateway.access" in ln]  # noqa: E731
    seen = len(access())
    with gw.client() as c:
        c.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": secret}]},
               headers={"Authorization": "Bearer sk-never-log-me"})
    line = wait_until(lambda: len(access()) > seen and access()[seen])
    record = json.loads(line.split("tureen.gateway.access: ", 1)[1])
    assert record["model"] == "m" and record["status"] == 200 and record["deployment"].startswith("m@")
    assert {"prompt_tokens", "completion_tokens", "cost", "upstream_ms", "overhead_ms", "retries"} <= set(record)
    log = gw.log_text()
    assert secret not in log and "sk-never-log-me" not in log


def test_least_busy_spreads_concurrent_streams(tmp_path):
    fakes = [FakeProc(tmp_path, ttft_s=1.0, itl_s=0.01, tokens=3) for _ in range(2)]
    gw = GatewayProc(tmp_path, {"model_list": [deployment("m", f) for f in fakes]})
    try:
        _concurrent(gw.url, [{**CHAT, "stream": True}] * 10)
        counts = [f.stats()["requests"] for f in fakes]
        assert counts == [5, 5], counts
        assert max(f.stats()["max_inflight"] for f in fakes) == 5
    finally:
        gw.stop()
        for f in fakes:
            f.stop()


def test_overflow_gets_traffic_only_when_primaries_are_full(tmp_path):
    primary = FakeProc(tmp_path, ttft_s=1.0, tokens=2)
    spare = FakeProc(tmp_path, ttft_s=0.01, tokens=2)
    gw = GatewayProc(tmp_path, {"model_list": [deployment("m", primary, max_parallel_requests=3),
                                               deployment("m", spare, tier="overflow")]})
    try:
        assert all(r.status_code == 200 for r in _concurrent(gw.url, [CHAT] * 3))
        assert (primary.stats()["requests"], spare.stats()["requests"]) == (3, 0)
        assert all(r.status_code == 200 for r in _concurrent(gw.url, [CHAT] * 5))
        assert (primary.stats()["requests"], spare.stats()["requests"]) == (6, 2)
        assert primary.stats()["max_inflight"] == 3
        # a primary shedding with 503 + Retry-After sends the retry to the overflow, and keeps it there
        primary.control(fail_status=503, retry_after=30, fail_count=1)
        assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200
        assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200
        assert (primary.stats()["requests"], spare.stats()["requests"]) == (7, 4)
    finally:
        gw.stop()
        primary.stop()
        spare.stop()


def _concurrent(url: str, bodies: list[dict]) -> list[httpx.Response]:
    results: list = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def one(i: int) -> None:
        barrier.wait()
        results[i] = httpx.post(url + "/v1/chat/completions", json=bodies[i], timeout=60)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_no_config_is_an_open_default_that_forwards_any_model(tmp_path):
    import subprocess
    import sys

    from gateway_procs import _wait
    from serve_process import _free_port

    fake = FakeProc(tmp_path, model="whatever-it-serves")
    port = _free_port()
    log = tmp_path / "open.log"
    proc = subprocess.Popen([sys.executable, "-m", "tureen.cli", "gateway", "--host", "127.0.0.1", "--port",
                             str(port), "--upstream", fake.url], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(url + "/health", proc, log)
        r = httpx.post(url + "/v1/chat/completions", json={**CHAT, "model": "any-name"}, timeout=30)
        assert r.status_code == 200 and fake.stats()["last_bodies"][-1]["model"] == "any-name"
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["whatever-it-serves"]
        assert "gateway is OPEN" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(20)
        fake.stop()


def test_tenant_label_only_when_configured(tmp_path):
    fake = FakeProc(tmp_path)
    gw = GatewayProc(tmp_path, {"model_list": [deployment("m", fake)],
                                "general_settings": {"master_key": "os.environ/GW_MASTER"},
                                "tureen_settings": {"metrics_label_by": "key_alias"}},
                     env={"GW_MASTER": "sk-master-for-labels"})
    try:
        made = httpx.post(gw.url + "/key/generate", json={"key_alias": "alpha"},
                          headers={"Authorization": "Bearer sk-master-for-labels"}).json()
        r = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {made['key']}"})
        assert r.status_code == 200
        assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT).status_code == 401
        text = gw.metrics()
        assert metric(text, "tureen_gateway_requests_total", model="m", status="200", tenant="alpha") == 1
        assert made["key"] not in text
    finally:
        gw.stop()
        fake.stop()


@pytest.mark.parametrize("strategy", ["prefix-aware", "least-busy"])
def test_odd_bodies_never_get_a_500(tmp_path, strategy):
    fake = FakeProc(tmp_path)
    gw = GatewayProc(tmp_path, {"model_list": [deployment("m", fake)],
                                "router_settings": {"routing_strategy": strategy}})
    odd = [
        {"model": "m", "messages": ["not a dict", 3, None]},
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, "x", 5]}]},
        {"model": "m", "messages": [{"role": "user", "content": {"weird": True}}], "user": 12},
        {"model": "m", "prompt": [[1, 2, 3]], "max_tokens": "many"},
        {"model": "m", "prompt": None, "stream": True, "stream_options": "yes"},
        {"model": ["m"], "messages": []},
        [1, 2, 3],
    ]
    try:
        for i, body in enumerate(odd):
            path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
            r = httpx.post(gw.url + path, json=body, timeout=30)
            assert r.status_code < 500, (i, r.status_code, r.text)
        assert "Traceback" not in gw.log_text()
    finally:
        gw.stop()
        fake.stop()


@pytest.mark.parametrize("strategy", ["prefix-aware", "least-busy"])
def test_lone_surrogates_and_large_bodies_are_forwarded(tmp_path, strategy):
    fake = FakeProc(tmp_path)
    gw = GatewayProc(tmp_path, {"model_list": [deployment("m", fake)],
                                "router_settings": {"routing_strategy": strategy}})
    try:
        raw = b'{"model": "m", "messages": [{"role": "user", "content": "half a pair: \\ud800 and \\u00e9"}]}'
        r = httpx.post(gw.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        assert fake.stats()["last_bodies"][-1]["messages"][0]["content"] == "half a pair: \ud800 and é"
        big = "x" * (3 << 20)  # above the 1 MiB threshold: parsed and re-encoded in a worker thread
        r = httpx.post(gw.url + "/v1/completions", json={"model": "m", "prompt": big}, timeout=60)
        assert r.status_code == 200
        assert len(fake.stats()["last_bodies"][-1]["prompt"]) == len(big)
    finally:
        gw.stop()
        fake.stop()


def test_an_idle_keep_alive_connection_outlives_the_clients_pool_expiry(pair):
    """httpx (and so the openai SDK) reuses an idle connection for up to 5 s: the gateway must not close it
    first, or a request sent on it as the server closes it is reset and lost."""
    gw, _, _ = pair
    request = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as sock:
        for attempt in range(2):
            if attempt:
                time.sleep(6.0)  # longer than httpx's keepalive_expiry (5 s) and uvicorn's default keep-alive
            sock.sendall(request)
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = sock.recv(4096)
                assert chunk, "the gateway closed the idle keep-alive connection"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")


def test_the_openapi_document_describes_the_admin_apis_inputs(pair):
    # Without them a generated test (tureen bench fuzz) had one case per admin route and never reached its checks.
    gw, _, _ = pair
    doc = httpx.get(gw.url + "/openapi.json", timeout=30).json()
    refs = {path: doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            for path in ("/key/generate", "/key/update", "/key/delete")}
    assert refs == {"/key/generate": "#/components/schemas/GenerateKeyRequest",
                    "/key/update": "#/components/schemas/UpdateKeyRequest",
                    "/key/delete": "#/components/schemas/DeleteKeyRequest"}
    generate = doc["components"]["schemas"]["GenerateKeyRequest"]["properties"]
    assert {"models", "max_budget", "rpm_limit", "tpm_limit", "duration", "key_alias", "team_id"} <= set(generate)
    listing = {p["name"]: p for p in doc["paths"]["/key/list"]["get"]["parameters"]}
    assert set(listing) == {"page", "size", "team_id", "key_alias", "return_full_object"}
    assert [p["name"] for p in doc["paths"]["/key/info"]["get"]["parameters"]] == ["key"]
