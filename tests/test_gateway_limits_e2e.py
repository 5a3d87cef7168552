"""Limits across real ``tureen gateway`` processes sharing one real redis-server, in front of a fake upstream."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from gateway_procs import FakeProc, GatewayProc, deployment, metric
from redis_server import redis_server  # noqa: F401  (fixture)

MASTER = "sk-e2e-master-key-0123456789"
CONTENT = "0123456789abcdef"  # 16 characters: 4 prompt tokens by the gateway's estimate and by the fake's count


@pytest.fixture
def fake(tmp_path):
    proc = FakeProc(tmp_path, ttft_s=0.002, itl_s=0.001, tokens=4)
    yield proc
    proc.stop()


def gateway_config(fake: FakeProc, redis_url: str, **settings) -> dict:
    return {"model_list": [deployment("tiny", fake)],
            "router_settings": {"redis_url": redis_url},
            "general_settings": {"master_key": "os.environ/E2E_MASTER_KEY"},
            "tureen_settings": settings}


def chat(url: str, key: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                      json={"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": CONTENT}]})


def test_rpm_and_tpm_hold_across_two_gateway_processes_under_concurrent_load(tmp_path, fake,
                                                                            redis_server):  # noqa: F811
    config = gateway_config(fake, redis_server.url)
    env = {"E2E_MASTER_KEY": MASTER}
    gateways = [GatewayProc(tmp_path, config, env), GatewayProc(tmp_path, config, env)]
    try:
        def new_key(**limits) -> str:
            r = httpx.post(gateways[0].url + "/key/generate", json=limits,
                           headers={"Authorization": f"Bearer {MASTER}"}, timeout=10)
            assert r.status_code == 200, r.text
            return r.json()["key"]

        rpm_key = new_key(rpm_limit=20)
        tpm_key = new_key(tpm_limit=120)  # 8 tokens a request (4 prompt + max_tokens 4; real usage the same): 15
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            rpm = list(pool.map(lambda i: chat(gateways[i % 2].url, rpm_key), range(60)))
            tpm = list(pool.map(lambda i: chat(gateways[i % 2].url, tpm_key), range(60)))
        for answers, expected in ((rpm, 20), (tpm, 15)):
            codes = [a.status_code for a in answers]
            assert set(codes) <= {200, 429}
            assert codes.count(200) == expected
            served_by = {i % 2 for i, a in enumerate(answers) if a.status_code == 200}
            assert served_by == {0, 1}  # both processes admitted some: one shared limit, not two
        refused = next(a for a in tpm if a.status_code == 429)
        assert refused.json()["error"]["code"] == "rate_limit_exceeded" and "retry-after" in refused.headers
        ok = next(a for a in rpm if a.status_code == 200)
        assert ok.headers["x-ratelimit-limit-requests"] == "20"
        texts = [g.metrics() for g in gateways]
        assert sum(metric(t, "tureen_gateway_rate_limited_requests_total", limit_type="rpm") for t in texts) == 40
        assert sum(metric(t, "tureen_gateway_rate_limited_requests_total", limit_type="tpm") for t in texts) == 45
        for g in gateways:
            assert rpm_key not in g.log_text() and tpm_key not in g.log_text() and MASTER not in g.log_text()
    finally:
        for g in gateways:
            g.stop()


@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
def test_redis_outage_through_the_real_gateway_then_recovery(tmp_path, fake, redis_server, mode):  # noqa: F811
    gateway = GatewayProc(tmp_path, gateway_config(fake, redis_server.url, redis_failure_mode=mode),
                          {"E2E_MASTER_KEY": MASTER})
    try:
        r = httpx.post(gateway.url + "/key/generate", json={"rpm_limit": 2},
                       headers={"Authorization": f"Bearer {MASTER}"}, timeout=10)
        key = r.json()["key"]
        assert chat(gateway.url, key).status_code == 200
        redis_server.stop()
        during = [chat(gateway.url, key) for _ in range(4)]
        models = httpx.get(gateway.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        deep = httpx.get(gateway.url + "/health", params={"deep": 1}, timeout=10)
        redis_server.start()
        time.sleep(1.2)  # the store's probe interval (1 s): then it tries Redis again
        after = [chat(gateway.url, key).status_code for _ in range(2)]
        text = gateway.metrics()
        log = gateway.log_text()
    finally:
        gateway.stop()
    if mode == "fail_open":
        assert [r.status_code for r in during] == [200] * 4  # over rpm_limit, served without limits
        assert metric(text, "tureen_gateway_redis_fail_open_requests_total") == 4
        assert log.count("serving WITHOUT rate limits") == 1  # logged once per minute, not per request
    else:
        assert [r.status_code for r in during] == [503] * 4
        assert all(r.headers.get("retry-after") and r.json()["error"]["code"] == "policy_store_unavailable"
                   for r in during)
        assert metric(text, "tureen_gateway_redis_fail_closed_requests_total") == 4
        assert log.count("refusing requests with 503") == 1
    assert models.status_code == 200 and deep.status_code != 500  # the key is still known from the cache
    assert after == [200, 429]  # recovered by itself; the window kept the first request
    assert metric(text, "tureen_gateway_redis_errors_total") >= 1
    assert gateway.proc.returncode == 0


def test_a_client_that_disconnects_mid_stream_frees_its_parallel_slot(tmp_path, redis_server):  # noqa: F811
    fake = FakeProc(tmp_path, ttft_s=0.01, itl_s=0.1, tokens=200)  # a 20-second stream
    gateway = GatewayProc(tmp_path, gateway_config(fake, redis_server.url), {"E2E_MASTER_KEY": MASTER})
    try:
        r = httpx.post(gateway.url + "/key/generate", json={"max_parallel_requests": 1, "rpm_limit": 100},
                       headers={"Authorization": f"Bearer {MASTER}"}, timeout=10)
        key = r.json()["key"]
        body = {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": CONTENT}]}
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {key}"}) as stream:
                lines = stream.iter_lines()  # keep the iterator: dropping it closes the response
                assert next(lines).startswith("data:")
                assert stream.headers["x-ratelimit-limit-requests"] == "100"  # headers on streams too
                assert stream.headers["x-ratelimit-remaining-requests"] == "99"
                busy = chat(gateway.url, key)  # the one slot is taken
            # the stream is closed here, 19 s before its end
        fake.control(itl_s=0.001, tokens=4)
        deadline = time.monotonic() + 15  # the slot's lease is 60 s: only the release frees it this soon
        while (again := chat(gateway.url, key)).status_code == 429:
            assert time.monotonic() < deadline, "the aborted stream's slot was not released"
            time.sleep(0.05)
    finally:
        gateway.stop()
        fake.stop()
    assert busy.status_code == 429 and "max_parallel_requests" in busy.json()["error"]["message"]
    assert again.status_code == 200


def test_a_budget_is_exhausted_by_real_usage_through_the_gateway(tmp_path, fake, redis_server):  # noqa: F811
    config = gateway_config(fake, redis_server.url)
    config["model_list"] = [deployment("tiny", fake, input_cost_per_token=0.001, output_cost_per_token=0.002)]
    gateway = GatewayProc(tmp_path, config, {"E2E_MASTER_KEY": MASTER})
    admin = {"Authorization": f"Bearer {MASTER}"}
    results = {}
    try:
        for stream in (False, True):  # usage from the JSON body, and from the stream's last chunk
            key = httpx.post(gateway.url + "/key/generate", headers=admin, timeout=10,
                             json={"max_budget": 0.05, "budget_duration": "1d", "team_id": "billing"}).json()["key"]
            body = {"model": "tiny", "stream": stream, "messages": [{"role": "user", "content": CONTENT}]}
            codes = []
            for _ in range(7):  # 4 prompt + 4 completion tokens: 0.004 + 0.008 = 0.012 a request
                r = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30,
                               headers={"Authorization": f"Bearer {key}"})
                codes.append(r.status_code)
                if stream and r.status_code == 200:
                    assert '"usage"' not in r.text  # the gateway asked for usage itself, and kept it from the client
            info = httpx.get(gateway.url + "/key/info", params={"key": key}, headers=admin, timeout=10).json()
            refused = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30,
                                 headers={"Authorization": f"Bearer {key}"})
            results[stream] = codes, info["info"], refused
        text = gateway.metrics()
    finally:
        gateway.stop()
    for codes, info, refused in results.values():
        assert codes == [200] * 5 + [429] * 2  # spend before the 6th request: 0.06 >= 0.05
        assert info["spend"] == pytest.approx(0.06) and info["total_spend"] == pytest.approx(0.06)
        assert refused.json()["error"]["code"] == "insufficient_quota"
    assert metric(text, "tureen_gateway_spend_total") == pytest.approx(0.12)
    assert metric(text, "tureen_gateway_tokens_total", kind="completion") == 40


def test_a_stream_sent_ahead_and_refused_by_redis_is_a_429_and_frees_the_deployment(tmp_path, fake,
                                                                                  redis_server):  # noqa: F811
    """Through real gateway processes: replica a still believes the key far from its limit (a long
    max_age_s), b has used the window up, so a sends the stream on before Redis answers. Redis
    refuses it: the client gets the 429 and no byte of the stream, and the deployment is free again."""
    config = gateway_config(fake, redis_server.url, admit_ahead={"max_age_s": 600})
    env = {"E2E_MASTER_KEY": MASTER}
    a, b = GatewayProc(tmp_path, config, env), GatewayProc(tmp_path, config, env)
    try:
        r = httpx.post(a.url + "/key/generate", json={"rpm_limit": 10},
                       headers={"Authorization": f"Bearer {MASTER}"}, timeout=10)
        key = r.json()["key"]
        assert chat(a.url, key).status_code == 200  # a learns: 1 of 10
        assert [chat(b.url, key).status_code for _ in range(9)] == [200] * 9  # Redis: 10 of 10
        refused = httpx.post(a.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                             json={"model": "tiny", "max_tokens": 4, "stream": True,
                                   "messages": [{"role": "user", "content": CONTENT}]})
        assert refused.status_code == 429 and refused.headers["content-type"].startswith("application/json")
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        text = a.metrics()
        assert metric(text, "tureen_gateway_admitted_ahead_total", outcome="refused") == 1
        assert metric(text, "tureen_gateway_inflight_requests") == 0
    finally:
        a.stop()
        b.stop()
