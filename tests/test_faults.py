"""The fault-injection suite (``pytest -m faults``): real processes, one fault each, and a table.

Each test injects one fault into real ``tureen serve`` / ``tureen gateway`` / ``redis-server``
processes, asserts what the clients must see (an answer, a documented error or an error event,
never a hang or a 500 that is not the documented engine error) and measures the recovery time,
which is reported, never asserted. At the end the table is printed, and written as Markdown to
``$TUREEN_FAULTS_TABLE`` when that is set:

    TUREEN_FAULTS_TABLE=faults.md pytest -m faults tests/test_faults.py
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from gateway_procs import FakeProc, GatewayProc, deployment, metric
from redis_server import RedisServer
from serve_process import ServerProcess

pytestmark = pytest.mark.faults

KEY = "sk-faults"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROWS: list[tuple[str, str, str]] = []
RAISE_TOKEN = 77


@pytest.fixture(scope="module", autouse=True)
def fault_table():
    yield
    if not ROWS:
        return
    lines = ["| fault | what the clients saw | recovery |", "| --- | --- | --- |"]
    lines += [f"| {fault} | {seen} | {recovery} |" for fault, seen, recovery in ROWS]
    print("\n" + "\n".join(lines))
    if os.environ.get("TUREEN_FAULTS_TABLE"):
        Path(os.environ["TUREEN_FAULTS_TABLE"]).write_text("\n".join(lines) + "\n")


def until(predicate, limit: float = 60.0, interval: float = 0.1) -> float:
    """Seconds until ``predicate()`` held (a measurement); fails past ``limit``."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < limit, "did not recover"
        time.sleep(interval)
    return time.monotonic() - start


def ok(url: str, path: str = "/v1/completions", headers: dict | None = None, **body) -> bool:
    try:
        r = httpx.post(url + path, json={"prompt": "hi", "max_tokens": 2, **body}, headers=headers or AUTH,
                       timeout=10)
    except httpx.HTTPError:
        return False
    return r.status_code == 200


def stream(url: str, body: dict, headers: dict, out: list, started: threading.Event | None = None) -> None:
    """Read one stream to its end; record how it ended: a finish reason, an error event, or a status."""
    try:
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, headers=headers,
                          timeout=60) as r:
            if r.status_code != 200:
                r.read()
                out.append(f"status {r.status_code}")
                return
            reason = None
            for line in r.iter_lines():
                if started is not None:
                    started.set()
                if line.startswith("data: {"):
                    doc = json.loads(line[6:])
                    if "error" in doc:
                        reason = "error event"
                    elif doc["choices"] and doc["choices"][0].get("finish_reason"):
                        reason = doc["choices"][0]["finish_reason"]
            out.append(reason or "ended without a finish reason")
    except httpx.TimeoutException:
        out.append("HANG")
    except httpx.HTTPError as exc:
        out.append(f"connection error ({type(exc).__name__})")


def summary(ends: list[str]) -> str:
    return ", ".join(f"{ends.count(e)} {e}" for e in sorted(set(ends)))


def test_killing_a_replica_under_the_gateway_mid_stream(llama_dir, tmp_path):
    replicas = [ServerProcess(llama_dir, tmp_path / f"r{i}.log", name="tiny", key=KEY) for i in range(2)]
    for r in replicas:
        r.wait_healthy()
    entries = [{"model_name": "tiny", "litellm_params": {"model": "hosted_vllm/tiny", "api_base": r.url + "/v1",
                                                          "api_key": "os.environ/FAULT_KEY"},
                "model_info": {"id": f"r{i}"}} for i, r in enumerate(replicas)]
    gw = GatewayProc(tmp_path, {"model_list": entries, "router_settings": {"routing_strategy": "round-robin"}},
                     env={"FAULT_KEY": KEY})
    try:
        ends: list[str] = []
        events = [threading.Event() for _ in range(6)]
        body = {"model": "tiny", "prompt": "count", "max_tokens": 300, "ignore_eos": True, "temperature": 0}
        threads = [threading.Thread(target=stream, args=(gw.url, body, {}, ends, e)) for e in events]
        for t in threads:
            t.start()
        for e in events:
            assert e.wait(60)
        os.kill(replicas[0].proc.pid, signal.SIGKILL)
        recovery = until(lambda: all(ok(gw.url, headers={}, model="tiny") for _ in range(4)))  # while streams run
        for t in threads:
            t.join(90)
        assert len(ends) == 6 and "HANG" not in ends, ends
        assert set(ends) <= {"length", "error event"}, ends  # finished on the survivor, or told it failed
        ROWS.append(("engine replica killed (SIGKILL) under the gateway mid-stream",
                     summary(ends) + "; no hang", f"{recovery:.1f} s until 4 new requests in a row succeed"))
    finally:
        gw.stop()
        for r in replicas:
            r.stop()


def test_redis_stopped_and_restarted_under_the_gateway(tmp_path):
    redis = RedisServer(tmp_path).start()
    fake = FakeProc(tmp_path)
    master = "sk-faults-master-0123456789"
    gw = GatewayProc(tmp_path, {"model_list": [deployment("tiny", fake)], "router_settings": {"redis_url": redis.url},
                                "general_settings": {"master_key": "os.environ/FAULT_MASTER"}},
                     env={"FAULT_MASTER": master})
    try:
        key = httpx.post(gw.url + "/key/generate", json={"rpm_limit": 1000}, timeout=10,
                         headers={"Authorization": f"Bearer {master}"}).json()["key"]
        headers = {"Authorization": f"Bearer {key}"}
        chat = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(gw.url + "/v1/chat/completions", json=chat, headers=headers, timeout=10).status_code == 200
        redis.stop()
        during = [httpx.post(gw.url + "/v1/chat/completions", json=chat, headers=headers, timeout=30) for _ in range(5)]
        statuses = [r.status_code for r in during]
        assert set(statuses) <= {200, 503}, statuses  # fail-open or fail-closed as configured, never a 500
        assert all("error" in r.json() for r in during if r.status_code != 200)
        assert httpx.get(gw.url + "/health", timeout=10).status_code == 200  # the gateway itself stays up
        redis.start()
        # Recovered once the gateway uses Redis again (fail-open answered 200 all along, so a 200 alone says nothing)
        recovery = until(lambda: httpx.post(gw.url + "/v1/chat/completions", json=chat, headers=headers,
                                            timeout=10).status_code == 200
                         and metric(gw.metrics(), "tureen_gateway_redis_up") == 1.0)
        ROWS.append(("Redis stopped, then restarted, under the gateway",
                     "during the outage (fail_open, the default): "
                     + ", ".join(f"{statuses.count(s)}x {s}" for s in sorted(set(statuses))),
                     f"{recovery:.1f} s from Redis accepting again to the gateway using it (redis_up 1)"))
    finally:
        gw.stop()
        fake.stop()
        redis.stop()


def test_a_slow_upstream_times_out_and_opens_the_breaker(tmp_path):
    slow = FakeProc(tmp_path, delay_s=30)
    gw = GatewayProc(tmp_path, {"model_list": [deployment("m", slow, timeout=0.5)],
                                "router_settings": {"num_retries": 0},
                                "tureen_settings": {"circuit_breaker": {"consecutive_failures": 2, "cooldown_s": 2.0}}})
    try:
        chat = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        seen = [httpx.post(gw.url + "/v1/chat/completions", json=chat, timeout=30) for _ in range(3)]
        codes = [r.status_code for r in seen]
        assert codes[:2] == [504, 504] and codes[2] == 503, codes  # two timeouts, then the breaker is open
        assert seen[0].json()["error"]["code"] == "upstream_timeout"
        slow.control(delay_s=0.0)
        recovery = until(lambda: httpx.post(gw.url + "/v1/chat/completions", json=chat,
                                            timeout=10).status_code == 200, interval=0.2)
        ROWS.append(("upstream slow (30 s before its first byte, timeout 0.5 s)",
                     "504 upstream_timeout x2, then 503 (breaker open)",
                     f"{recovery:.1f} s from the upstream being fast again to the first 200 (the breaker's 2 s "
                     f"cooldown began at the second timeout)"))
    finally:
        gw.stop()
        slow.stop()


def test_a_model_step_that_raises(llama_dir, tmp_path):
    server = ServerProcess(llama_dir, tmp_path / "serve.log", name="tiny", key=KEY,
                           env={"TUREEN_FAULT_INJECTION": f"raise@{RAISE_TOKEN}"}).wait_healthy()
    try:
        ends: list[str] = []
        r = httpx.post(server.url + "/v1/completions", json={"prompt": [1, RAISE_TOKEN, 3], "max_tokens": 4},
                       headers=AUTH, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"  # the documented engine error
        stream(server.url, {"prompt": [2, RAISE_TOKEN], "max_tokens": 4}, AUTH, ends)
        assert ends in (["error event"], ["status 500"]), ends
        recovery = until(lambda: ok(server.url))
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        ROWS.append(("a model step raises (TUREEN_FAULT_INJECTION=raise@TOKEN)",
                     f"500 engine_error (non-stream); {ends[0]} (stream); other requests unaffected",
                     f"{recovery:.2f} s from the failed stream to the next success"))
    finally:
        server.stop()


def test_sigterm_under_load(llama_dir, tmp_path):
    server = ServerProcess(llama_dir, tmp_path / "serve.log", "--shutdown-timeout", "3", name="tiny",
                           key=KEY).wait_healthy()
    ends: list[str] = []
    events = [threading.Event() for _ in range(8)]
    bodies = [{"prompt": f"p{i}", "max_tokens": 8 if i % 2 else 480, "ignore_eos": True} for i in range(8)]
    threads = [threading.Thread(target=stream, args=(server.url, b, AUTH, ends, e)) for b, e in zip(bodies, events)]
    for t in threads:
        t.start()
    for e in events:
        assert e.wait(60)
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    code = server.proc.wait(60)
    exited = time.monotonic() - sent
    server.log.close()
    assert code == 0 and len(ends) == 8 and set(ends) <= {"length", "abort"}, (code, ends)
    ROWS.append(("SIGTERM with 8 streams in flight (--shutdown-timeout 3)", summary(ends) + "; exit code 0",
                 f"process exited {exited:.1f} s after the signal"))


def test_filling_the_kv_cache(llama_dir, tmp_path):
    server = ServerProcess(llama_dir, tmp_path / "serve.log", "--num-gpu-blocks-override", "40", "--max-num-seqs",
                           "16", name="tiny", key=KEY).wait_healthy()
    try:
        results: list[httpx.Response | str] = []

        def one(i: int) -> None:
            try:
                results.append(httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=400,
                                          json={"prompt": [5 + i] * 100, "max_tokens": 100, "ignore_eos": True}))
            except httpx.HTTPError as exc:
                results.append(type(exc).__name__)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(420)
        done = time.monotonic()
        codes = [r.status_code if isinstance(r, httpx.Response) else r for r in results]
        assert len(codes) == 16 and set(codes) <= {200, 503}, codes  # served (maybe preempted) or shed; no 500
        assert all("error" in r.json() for r in results if isinstance(r, httpx.Response) and r.status_code == 503)
        text = httpx.get(server.url + "/metrics", timeout=10).text
        preempted = _sample(text, "vllm:num_preemptions_total")
        shed = _sample(text, "tureen:requests_shed_total")
        assert preempted + shed > 0  # the cache really was over-full
        recovery = until(lambda: _sample(httpx.get(server.url + "/metrics", timeout=10).text,
                                         "vllm:kv_cache_usage_perc") == 0.0)
        ROWS.append(("KV cache over-full (40 blocks, 16 x 200-token requests)",
                     f"{codes.count(200)}x 200, {codes.count(503)}x 503 shed; {preempted:g} preemptions; no 500",
                     f"KV usage back to 0 {time.monotonic() - done:.1f} s after the last answer"))
    finally:
        server.stop()


def _sample(text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)
