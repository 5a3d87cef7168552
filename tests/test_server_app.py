"""The HTTP layer against a scripted engine, over real HTTP (uvicorn in a thread).

The shared scripted engine (tests/fake_engine.py) implements ``EngineClient`` with predictable
tokens and adjustable speed, so these tests pin down the server's own behaviour (shapes, errors,
admission, timeouts, disconnects, metrics) in seconds. tests/test_server_e2e.py drives the real engine.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from fake_engine import BOS, MODEL, ScriptedEngine, letter
from serve_process import REQUIRED_METRICS
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from tureen.server.app import build_app
from tureen.server.config import ServerConfig
from tureen.server.lifecycle import Phase, ServerState

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


class ThreadServer:
    """The real app under uvicorn in a background thread, on a free port."""

    def __init__(self, engine: ScriptedEngine, gate: threading.Event | None = None, **config) -> None:
        self.engine = engine
        self.state = ServerState(ServerConfig(**{"api_key": KEY, "disable_log_stats": True, **config}))

        def factory():
            if gate is not None:
                gate.wait(30)
            return engine
        app = build_app(self.state, factory)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def wait_ready(self) -> None:
        deadline = time.time() + 10
        while self.state.phase is Phase.STARTING:
            assert time.time() < deadline
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH, **{"timeout": 10, **kw})


def sse_events(lines) -> list:
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.fixture(scope="module")
def srv():
    with ThreadServer(ScriptedEngine()) as s:
        s.wait_ready()
        yield s


# ------------------------------------------------------------------------------------ shapes


def test_completion_shape_usage_and_choice_indices(srv):
    with srv.client() as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": [[BOS, 97, 98], [97, 98]], "max_tokens": 3,
                                             "n": 2, "future_openai_field": {"x": 1}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL and body["id"].startswith("cmpl-")
    assert isinstance(body["created"], int)
    assert [ch["index"] for ch in body["choices"]] == [0, 1, 2, 3]
    ab_text = [chr(letter([BOS, 97, 98], i, k)) for i in range(2) for k in range(3)]
    assert body["choices"][0]["text"] == "".join(ab_text[:3])
    assert body["choices"][1]["text"] == "".join(ab_text[3:])
    assert body["choices"][2]["text"] == "".join(chr(letter([97, 98], 0, k)) for k in range(3))
    assert all(ch["finish_reason"] == "length" and ch["logprobs"] is None for ch in body["choices"])
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17,
                             "prompt_tokens_details": {"cached_tokens": 2}}


def test_completion_logprobs_legacy_format(srv):
    with srv.client() as c:
        body = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "logprobs": 1}).json()
    lp = body["choices"][0]["logprobs"]
    text = body["choices"][0]["text"]
    assert lp["tokens"] == list(text)
    assert lp["token_logprobs"] == [-0.25] * 3
    assert lp["text_offset"] == [0, 1, 2]
    assert lp["top_logprobs"][0] == {text[0]: -0.25, chr(ord(text[0]) + 1): -1.5}


def test_completion_stop_string(srv):
    full = "".join(chr(letter([BOS, 120], 0, k)) for k in range(8))
    stop = full[3:5]
    with srv.client() as c:
        body = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 8, "stop": [stop]}).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert choice["text"] == full[:4]  # the scripted engine drops the token that completes the stop string


def test_chat_stream_role_first_one_final_chunk_per_choice_then_usage_then_done(srv):
    req = {"model": MODEL, "messages": [{"role": "system", "content": "s"},
                                        {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
           "max_tokens": 4, "n": 2, "stream": True, "stream_options": {"include_usage": True},
           "logprobs": True, "top_logprobs": 1}
    with srv.client() as c, c.stream("POST", "/v1/chat/completions", json=req) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert len({ch["id"] for ch in chunks}) == 1
    assert [ch["choices"][0]["delta"] for ch in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    body = chunks[2:-1]
    for index in (0, 1):
        mine = [ch["choices"][0] for ch in body if ch["choices"][0]["index"] == index]
        assert [m["finish_reason"] for m in mine].count("length") == 1 and mine[-1]["finish_reason"] == "length"
        assert all("role" not in m["delta"] for m in mine)
        assert len("".join(m["delta"].get("content", "") for m in mine)) == 4
        entry = mine[0]["logprobs"]["content"][0]
        assert entry["logprob"] == -0.25 and entry["bytes"] == list(entry["token"].encode())
        assert [t["logprob"] for t in entry["top_logprobs"]] == [-0.25]
    assert all("usage" not in ch for ch in chunks[:-1])


def test_chat_non_stream_shape(srv):
    with srv.client() as c:
        body = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hey"}],
                                                    "max_completion_tokens": 2}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and len(choice["message"]["content"]) == 2
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert body["usage"]["completion_tokens"] == 2


def test_models_tokenize_detokenize_version(srv):
    with srv.client() as c:
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"] == MODEL
        assert models["data"][0]["max_model_len"] == 128
        tok = c.post("/tokenize", json={"prompt": "ab", "return_token_strs": True}).json()
        assert tok == {"count": 3, "max_model_len": 128, "tokens": [BOS, 97, 98], "token_strs": ["<256>", "a", "b"]}
        chat = c.post("/tokenize", json={"messages": [{"role": "user", "content": "x"}]}).json()
        assert chat["tokens"] == list(b"<user>x\n<assistant>")
        assert c.post("/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}
        assert c.get("/version").json()["version"]


# ------------------------------------------------------------------------------------ errors


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_error_cases(srv):
    with srv.client() as c:
        err = _error(c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
                     400)
        assert err["code"] == "invalid_json"
        assert _error(c.post("/v1/completions", json={"prompt": "x", "temperature": -1}), 400)["param"] == \
            "temperature"
        assert _error(c.post("/v1/completions", json={"prompt": "x", "n": "many"}), 400)["param"] == "n"
        assert _error(c.post("/v1/completions", json={"max_tokens": 3}), 400)["param"] == "prompt"
        assert _error(c.post("/v1/completions", json={"prompt": [1, 999]}), 400)["param"] == "prompt"
        assert _error(c.post("/v1/completions", json={"prompt": []}), 400)["param"] == "prompt"
        assert _error(c.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}),
                      400)["param"] == "messages.0.role"
        assert _error(c.post("/v1/chat/completions", json={"messages": []}), 400)["param"] == "messages"
        long = _error(c.post("/v1/completions", json={"prompt": "x" * 100, "max_tokens": 50}), 400)
        assert long["code"] == "context_length_exceeded"
        assert "128" in long["message"] and "101" in long["message"] and "50" in long["message"]
        assert _error(c.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404)["code"] == \
            "model_not_found"
        assert _error(c.post("/detokenize", json={"tokens": [-1]}), 400)["param"] == "tokens"
        assert _error(c.get("/v1/nothing-here"), 404)
    with httpx.Client(base_url=srv.url) as anon:
        assert _error(anon.post("/v1/completions", json={"prompt": "x"}), 401)["code"] == "invalid_api_key"
        assert _error(anon.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert anon.get("/health").status_code == 200 and anon.get("/metrics").status_code == 200


def test_body_over_limit_is_413():
    with ThreadServer(ScriptedEngine(), max_request_body_bytes=1000) as s, s.client() as c:
        s.wait_ready()
        err = _error(c.post("/v1/completions", json={"prompt": "x" * 2000}), 413)
        assert err["code"] == "request_too_large"
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_starting_and_draining_are_503_with_retry_after():
    gate = threading.Event()
    with ThreadServer(ScriptedEngine(), gate=gate) as s, s.client() as c:
        r = c.post("/v1/completions", json={"prompt": "x"})
        assert _error(r, 503)["code"] == "starting" and int(r.headers["retry-after"]) >= 1
        assert c.get("/health").status_code == 503 and c.get("/v1/models").status_code == 503
        gate.set()
        s.wait_ready()
        assert c.get("/health").status_code == 200
        s.state.begin_drain()
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert _error(r, 503)["code"] == "draining" and int(r.headers["retry-after"]) >= 1
        assert c.get("/health").json() == {"status": "unhealthy", "reason": "draining"}


def test_queue_full_and_kv_full_are_shed_and_counted(srv):
    engine = srv.engine
    try:
        engine.extra_waiting = srv.state.config.max_queue_len
        with srv.client() as c:
            r = c.post("/v1/completions", json={"prompt": "x"})
            assert _error(r, 503)["code"] == "queue_full" and r.headers["retry-after"] == "1"
            engine.extra_waiting, engine.kv_usage = 1, 0.99
            assert _error(c.post("/v1/completions", json={"prompt": "x"}), 503)["code"] == "kv_cache_full"
            engine.extra_waiting = 0  # a full cache with nobody waiting still admits
            assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
            shed = _samples(c.get("/metrics").text, "tureen:requests_shed")
        assert shed[("tureen:requests_shed_total", "queue_full")] >= 1
        assert shed[("tureen:requests_shed_total", "kv_cache_full")] >= 1
    finally:
        engine.extra_waiting, engine.kv_usage = 0, 0.0


def _samples(text: str, family: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == family:
            for s in fam.samples:
                out[(s.name, s.labels.get("reason") or s.labels.get("finished_reason"))] = s.value
    return out


# ------------------------------------------------------------------- disconnects and timeouts


def test_stream_disconnect_aborts_the_request_at_once():
    engine = ScriptedEngine(step_delay=0.05)
    with ThreadServer(engine) as s, s.client() as c:
        s.wait_ready()
        with c.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 120, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break
        deadline = time.time() + 3
        while not engine.aborted and time.time() < deadline:
            time.sleep(0.01)
        assert len(engine.aborted) == 1 and not engine.running and not s.state.inflight
        aborted = _samples(c.get("/metrics").text, "tureen:requests_aborted")
        assert aborted[("tureen:requests_aborted_total", "client_disconnect")] == 1
        success = _samples(c.get("/metrics").text, "vllm:request_success")
        assert success[("vllm:request_success_total", "abort")] == 1


def test_non_stream_disconnect_while_waiting_aborts():
    engine = ScriptedEngine(step_delay=0.05)
    with ThreadServer(engine) as s:
        s.wait_ready()
        with pytest.raises(httpx.ReadTimeout), s.client(timeout=0.3) as c:
            c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 100})
        deadline = time.time() + 3
        while not engine.aborted and time.time() < deadline:
            time.sleep(0.01)
        assert len(engine.aborted) == 1 and not s.state.inflight


def test_request_timeout_stream_and_non_stream():
    engine = ScriptedEngine(step_delay=0.05)
    with ThreadServer(engine, request_timeout=0.3) as s, s.client() as c:
        s.wait_ready()
        err = _error(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 100}), 504)
        assert err["code"] == "request_timeout" and "0.3" in err["message"]
        with c.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                             "max_tokens": 100, "stream": True}) as r:
            events = sse_events(r.iter_lines())
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "request_timeout"
        assert len(events) > 3  # some tokens streamed before the limit
        assert len(engine.aborted) == 2 and not s.state.inflight


def test_mid_stream_engine_error_is_an_sse_error_event_then_done():
    engine = ScriptedEngine()
    engine.fail_after = 2
    with ThreadServer(engine) as s, s.client() as c:
        s.wait_ready()
        with c.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 10, "stream": True}) as r:
            events = sse_events(r.iter_lines())
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["type"] == "internal_server_error"
        assert [e["choices"][0]["text"] for e in events[:-2]] == [chr(letter([BOS, 120], 0, k)) for k in range(2)]
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 10})
        assert _error(r, 500)["type"] == "internal_server_error"
        engine.fail_after = None
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


# ------------------------------------------------------------------------ health and metrics


def test_health_watchdog_and_deep_check(srv):
    with srv.client() as c:
        assert c.get("/health").json() == {"status": "ok", "reason": "ok"}
        deep = c.get("/health", params={"deep": 1}).json()
        assert deep["status"] == "ok" and deep["generated_tokens"] == 2
        srv.engine.frozen_heartbeat = time.monotonic() - srv.state.config.watchdog_timeout - 1
        try:
            r = c.get("/health")
            assert r.status_code == 503 and r.json()["reason"] == "engine_stalled"
            assert c.get("/health", params={"deep": 1}).status_code == 503
        finally:
            srv.engine.frozen_heartbeat = None


def test_health_answers_while_streams_run():
    """/health never waits behind generation: it answers while eight streams are parked mid-flight.

    (How fast it answers under load is a measurement, not a test: ``tureen bench soak`` reports it.)
    """
    engine = ScriptedEngine(step_delay=0.5)  # 100 tokens: each stream lasts far longer than the checks
    with ThreadServer(engine) as s:
        s.wait_ready()
        stop = threading.Event()

        def stream():
            with s.client(timeout=60) as c, c.stream("POST", "/v1/completions",
                                                      json={"prompt": "x", "max_tokens": 100, "stream": True}) as r:
                for _ in r.iter_lines():
                    if stop.is_set():
                        return  # leaving closes the connection: the server aborts the stream
        workers = [threading.Thread(target=stream) for _ in range(8)]
        for w in workers:
            w.start()
        try:
            deadline = time.time() + 30
            while len(engine.running) < 8:
                assert time.time() < deadline, "the streams did not start"
                time.sleep(0.01)
            with s.client() as c:
                for _ in range(20):
                    assert c.get("/health").status_code == 200
                    assert len(engine.running) == 8  # answered while every stream was still running
        finally:
            stop.set()
            for w in workers:
                w.join(30)
    assert len(engine.aborted) == 8


def test_metrics_exist_and_move(srv):
    with srv.client() as c:
        before = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
        c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4})
        after = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    for name in REQUIRED_METRICS:
        assert name in after, name
        assert all(s.labels.get("model_name") == MODEL for s in after[name].samples if s.name != name + "_created")

    def value(fams, family, sample, **labels):
        return sum(s.value for s in fams[family].samples
                   if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))
    assert value(after, "vllm:request_success", "vllm:request_success_total", finished_reason="length") == \
        value(before, "vllm:request_success", "vllm:request_success_total", finished_reason="length") + 1
    assert value(after, "vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count") == \
        value(before, "vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count") + 3
    assert value(after, "vllm:request_prompt_tokens", "vllm:request_prompt_tokens_sum") == \
        value(before, "vllm:request_prompt_tokens", "vllm:request_prompt_tokens_sum") + 6
    assert value(after, "vllm:generation_tokens", "vllm:generation_tokens_total") == \
        value(before, "vllm:generation_tokens", "vllm:generation_tokens_total") + 4
    info = after["vllm:cache_config_info"].samples[0].labels
    assert info["block_size"] == "16" and info["num_gpu_blocks"] == "64"


def test_request_log_line_has_no_prompt_text(srv, caplog):
    with caplog.at_level("INFO", logger="tureen.server.requests"), srv.client() as c:
        c.post("/v1/completions", json={"prompt": "secret words", "max_tokens": 2})
    lines = [r.getMessage() for r in caplog.records if r.name == "tureen.server.requests"]
    assert len(lines) == 1 and "secret" not in lines[0]
    for key in ("id=cmpl-", "prompt_tokens=13", "generated_tokens=2", "cached_tokens=6", "queue_time_s=",
                "ttft_s=", "e2e_s=", "finish_reason=length"):
        assert key in lines[0], (key, lines[0])
