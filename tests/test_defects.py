"""Guards for the defects that fuzzing `tureen serve` found (issue 18, section 4).

The real app and uvicorn with the server's own protocol guards (``runner.uvicorn_config``) in a
thread, against the scripted engine: each test pins one defect so it cannot come back.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fake_engine import MODEL, ScriptedEngine

from tureen.server.app import build_app
from tureen.server.config import ServerConfig
from tureen.server.lifecycle import Phase, ServerState
from tureen.server.log_filter import RepeatedLineFilter
from tureen.server.runner import uvicorn_config

WAIT_S = 30  # generous upper bound for something to happen; never a latency assert


class GuardedServer:
    def __init__(self, engine: ScriptedEngine | None = None, **config) -> None:
        self.engine = engine or ScriptedEngine()
        server_config = ServerConfig(**{"disable_log_stats": True, "port": 0, "log_level": "warning", **config})
        self.state = ServerState(server_config)
        app = build_app(self.state, lambda: self.engine)
        self.server = uvicorn.Server(uvicorn_config(app, server_config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> GuardedServer:
        self.thread.start()
        wait_until(lambda: self.server.started and self.state.phase is Phase.READY)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=WAIT_S)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=WAIT_S)


def wait_until(predicate, what: str = "condition") -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def post(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def assert_openai_error(body: bytes | dict) -> dict:
    doc = json.loads(body) if isinstance(body, bytes) else body
    assert set(doc) == {"error"} and isinstance(doc["error"]["message"], str) and doc["error"]["type"]
    return doc["error"]


@pytest.fixture(scope="module")
def srv():
    with GuardedServer() as s:
        yield s


# --------------------------------------------------------------------------- tokenize 500 + keep-alive


def test_tokenize_empty_messages_is_400_and_the_connection_lives_on(srv):
    with srv.connect() as sock:
        sock.sendall(post("/tokenize", b'{"messages": []}'))
        status, headers, body = read_response(sock)
        assert status == 400 and assert_openai_error(body)["param"] == "messages"
        sock.sendall(post("/tokenize", b'{"prompt": "ab"}'))  # the same connection, next request
        status, _, body = read_response(sock)
        assert status == 200 and json.loads(body)["count"] > 0


def test_an_idle_keep_alive_connection_outlives_the_clients_pool_expiry(srv):
    # httpx (the openai SDK) reuses an idle connection for up to 5 s, uvicorn's default keep-alive: a
    # server closing it first resets a POST sent on it at that moment, and the request is lost.
    with srv.connect() as sock:
        for attempt in range(2):
            if attempt:
                time.sleep(6.0)
            sock.sendall(post("/tokenize", b'{"prompt": "ab"}'))
            status, _, body = read_response(sock)
            assert status == 200 and json.loads(body)["count"] > 0


def test_a_bug_answers_500_json_and_keeps_the_connection(srv, monkeypatch):
    import tureen.server.app as app_module

    def broken(*args):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(app_module, "_tokenize", broken)
    with srv.connect() as sock:
        sock.sendall(post("/tokenize", b'{"prompt": "ab"}'))
        status, headers, body = read_response(sock)
        assert status == 500 and assert_openai_error(body)["type"] == "internal_server_error"
        assert headers.get("connection") != "close"
        monkeypatch.undo()
        sock.sendall(post("/tokenize", b'{"prompt": "ab"}'))
        assert read_response(sock)[0] == 200


# --------------------------------------------------------------------------- messages


@pytest.mark.parametrize("body, param, words", [
    ({"messages": [None]}, "messages.0", "must be a JSON object, got null"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": True, "stream_options": "x"},
     "stream_options", "must be a JSON object, got a string"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0",
     "needs a string 'text'"),
])
def test_messages_name_the_real_problem(srv, body, param, words):
    with srv.client() as c:
        r = c.post("/v1/chat/completions", json=body)
    error = assert_openai_error(r.json())
    assert r.status_code == 400 and error["param"] == param and words in error["message"], error
    assert "body must be a JSON object" not in error["message"]


def test_non_object_body_still_says_so(srv):
    with srv.client() as c:
        r = c.post("/v1/chat/completions", json=[1, 2])
    assert r.status_code == 400 and assert_openai_error(r.json())["message"] == "The request body must be a JSON object."


# --------------------------------------------------------------------------- models.retrieve, 405


def test_models_retrieve_with_the_official_client(srv):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("other/model")
    assert err.value.body["code"] == "model_not_found"


def test_405_carries_allow_and_the_error_json(srv):
    with srv.client() as c:
        r = c.get("/v1/completions")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert assert_openai_error(r.json())["code"] == "method_not_allowed"
        r = c.delete("/health")
        assert r.status_code == 405 and "GET" in r.headers["allow"].split(", ")


# --------------------------------------------------------------------------- OpenAPI


def test_openapi_documents_bodies_and_real_errors(srv):
    with srv.client() as c:
        doc = c.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, model in [("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest"),
                        ("/tokenize", "TokenizeRequest"), ("/detokenize", "DetokenizeRequest")]:
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + model)
        assert {"400", "401", "413", "503"} <= set(op["responses"])
        assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "prompt" in schemas["CompletionRequest"]["required"]
    n = schemas["CompletionRequest"]["properties"]["n"]  # null means "not set": documented as allowed
    assert {"type": "null"} in n["anyOf"]
    assert "ChatMessage" in schemas and "ErrorResponse" in schemas
    statuses = {s for item in doc["paths"].values() for op in item.values() for s in op["responses"]}
    assert "422" not in statuses and "HTTPValidationError" not in schemas
    assert "/v1/models/{model_id}" in doc["paths"]


def test_query_validation_is_the_documented_400(srv):
    with srv.client() as c:
        r = c.get("/health", params={"deep": "maybe"})
    assert r.status_code == 400 and assert_openai_error(r.json())


# --------------------------------------------------------------------------- slow-loris


def test_stalled_requests_time_out_with_408():
    with GuardedServer(http_read_timeout=0.5) as s:
        with s.connect() as silent, s.connect() as half_headers, s.connect() as half_body:
            half_headers.sendall(b"POST /tokenize HTTP/1.1\r\nhost: x\r\ncontent-")
            half_body.sendall(post("/tokenize", b'{"prompt": "abcdef"}')[:-5])
            for sock, part in [(silent, "headers"), (half_headers, "headers"), (half_body, "body")]:
                status, headers, body = read_response(sock)
                assert status == 408 and headers["connection"] == "close"
                assert part in assert_openai_error(body)["message"]
                assert sock.recv(10) == b""  # closed by the server
        with s.client() as c:  # a request that arrives whole is untouched by the timer
            assert c.post("/tokenize", json={"prompt": "ab"}).status_code == 200


def test_connection_limit_refuses_extra_connections_then_recovers():
    limit = 8
    with GuardedServer(http_read_timeout=1.0, max_connections=limit) as s:
        stalled = [s.connect() for _ in range(limit)]
        wait_until(lambda: len(s.server.server_state.connections) >= limit, "the stalled connections")
        with s.connect() as extra:
            status, headers, body = read_response(extra)
        assert status == 503 and headers["retry-after"] == "1"
        assert assert_openai_error(body)["code"] == "too_many_connections"
        for sock in stalled:  # each stalled client is timed out by the server, not by us
            assert read_response(sock)[0] == 408
            sock.close()
        wait_until(lambda: not s.server.server_state.connections, "the stalled connections to close")
        with s.client() as c:
            assert c.get("/health").status_code == 200


def test_flags_are_documented():
    import argparse

    from tureen.server.cli import add_server_args

    parser = argparse.ArgumentParser()
    add_server_args(parser)
    args = parser.parse_args(["--http-read-timeout", "5", "--max-connections", "100"])
    assert args.http_read_timeout == 5.0 and args.max_connections == 100
    text = parser.format_help()
    assert "--http-read-timeout" in text and "--max-connections" in text and "slow-loris" in text


# --------------------------------------------------------------------------- repeated log lines


def test_repeated_log_lines_are_rate_limited():
    now = [0.0]
    line_filter = RepeatedLineFilter(burst=3, window=10.0, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)
    passed = [line_filter.filter(record("socket.accept() out of system resource")) for _ in range(1000)]
    assert passed.count(True) == 3
    assert line_filter.filter(record("another line"))  # other lines are not affected
    now[0] = 10.5
    after = record("socket.accept() out of system resource")
    assert line_filter.filter(after) and "997 similar lines suppressed" in after.getMessage()


def test_serve_logging_installs_the_filter():
    from tureen.server.cli import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("info")
        assert any(isinstance(f, RepeatedLineFilter) for h in root.handlers for f in h.filters)
    finally:
        root.handlers[:], _ = saved[0], None
        root.setLevel(saved[1])
