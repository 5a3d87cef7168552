"""The hand-written cases of ``tureen bench fuzz``: inputs a schema-driven generator cannot produce.

Each case sends its input to a running server (``tureen serve`` or ``tureen gateway``) and returns
a ``CaseResult``: how many requests it sent, what statuses came back, and each problem found (an
unexpected 5xx, a 4xx without the OpenAI error JSON, a hang, a connection the server never closed).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

DOCUMENTED_5XX = (503, 504)


@dataclass
class CaseResult:
    name: str
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    note: str = ""

    def record(self, response: httpx.Response, what: str) -> None:
        self.sent += 1
        self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
        self.problems.extend(f"{what}: {p}" for p in response_problems(response))


def response_problems(response: httpx.Response) -> list[str]:
    """The two rules every answer obeys: no unplanned 5xx, and 4xx/5xx carry the OpenAI error JSON."""
    status = response.status_code
    problems = []
    if status >= 500 and status not in DOCUMENTED_5XX:
        problems.append(f"unexpected {status}: {response.text[:200]!r}")
    if status >= 400 and not is_openai_error(response):
        problems.append(f"{status} without the OpenAI error JSON: {response.text[:200]!r}")
    return problems


def is_openai_error(response: httpx.Response) -> bool:
    try:
        doc = response.json()
    except ValueError:
        return False
    error = doc.get("error") if isinstance(doc, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str)


@dataclass
class Target:
    base_url: str
    headers: dict[str, str]
    model: str | None
    timeout: float = 60.0

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=self.timeout)

    def body(self, **fields) -> dict:
        return {"model": self.model, **fields} if self.model else dict(fields)


def _post_raw(target: Target, result: CaseResult, path: str, content: bytes, what: str,
              headers: dict[str, str] | None = None) -> None:
    with target.client() as c:
        try:
            r = c.post(path, content=content, headers={"content-type": "application/json", **(headers or {})})
        except httpx.HTTPError as exc:
            result.problems.append(f"{what}: no answer ({type(exc).__name__}: {exc})")
            return
    result.record(r, what)


def invalid_utf8(target: Target) -> CaseResult:
    result = CaseResult("invalid UTF-8")
    for path in ("/v1/completions", "/v1/chat/completions"):
        for raw in (b'{"prompt": "\xff\xfe\xfd", "max_tokens": 1}',
                    b'{"messages": [{"role": "user", "content": "\xc3\x28"}], "max_tokens": 1}',
                    b'\xef\xbb\xbf{"prompt": "bom"}', b"\x00\x01\x02", b""):
            _post_raw(target, result, path, raw, f"{path} {raw[:12]!r}")
    return result


def huge_bodies(target: Target, size: int = 17 << 20) -> CaseResult:
    result = CaseResult("huge bodies", note=f"{size >> 20} MiB declared and chunked")
    prompt = b'{"prompt": "' + b"a" * size + b'", "max_tokens": 1}'
    _post_raw(target, result, "/v1/completions", prompt, "declared length")

    def chunks():
        yield b'{"prompt": "'
        for _ in range(size // (1 << 20)):
            yield b"b" * (1 << 20)
        yield b'"}'
    with target.client() as c:
        try:
            r = c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
            result.record(r, "chunked")
        except httpx.WriteError:  # the server answered 413 and closed while the upload ran: refused, as it should
            result.sent += 1
            result.note += "; chunked upload cut off by the server"
        except httpx.HTTPError as exc:
            result.problems.append(f"chunked: no answer ({type(exc).__name__}: {exc})")
    return result


def deep_nesting(target: Target, depth: int = 100_000) -> CaseResult:
    result = CaseResult("deeply nested JSON", note=f"depth {depth}")
    nested = b"[" * depth + b"]" * depth
    _post_raw(target, result, "/v1/completions", b'{"prompt": ' + nested + b"}", "prompt arrays")
    obj = b'{"a":' * depth + b"1" + b"}" * depth
    _post_raw(target, result, "/v1/chat/completions",
              b'{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", '
              b'"json_schema": {"name": "x", "schema": ' + obj + b"}}}", "schema objects")
    return result


def many_stop_strings(target: Target, count: int = 5000) -> CaseResult:
    result = CaseResult("thousands of stop strings", note=f"{count} stops")
    stops = [f"stop-{i}-{'x' * (i % 17)}" for i in range(count)]
    with target.client() as c:
        for path, extra in (("/v1/completions", {"prompt": "hello"}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            for stream in (False, True):
                try:
                    r = c.post(path, json=target.body(**extra, max_tokens=4, stop=stops, stream=stream))
                    result.record(r, f"{path} stream={stream}")
                except httpx.HTTPError as exc:
                    result.problems.append(f"{path}: no answer ({type(exc).__name__})")
    return result


def token_ids_out_of_range(target: Target) -> CaseResult:
    result = CaseResult("token ids out of range")
    with target.client() as c:
        for prompt in ([10 ** 9], [-1], [2 ** 63], [[0, 1], [2 ** 40]], [1.5], [True]):
            r = c.post("/v1/completions", json=target.body(prompt=prompt, max_tokens=1))
            result.record(r, f"prompt={prompt}")
            if r.status_code != 400:
                result.problems.append(f"prompt={prompt}: expected 400, got {r.status_code}")
        for tokens in ([10 ** 9], [-5]):
            r = c.post("/detokenize", json=target.body(tokens=tokens))
            result.record(r, f"detokenize {tokens}")
    return result


def odd_requests(target: Target) -> CaseResult:
    result = CaseResult("odd requests")
    with target.client() as c:
        cases: list[tuple[str, str, dict | None]] = [
            ("POST", "/v1/completions", {"prompt": "x", "n": 10 ** 6}),
            ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 10 ** 12}),
            ("POST", "/v1/completions", {"prompt": "x", "temperature": "hot"}),
            ("POST", "/v1/chat/completions", {"messages": [None]}),
            ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
            ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream_options": "x"}),
            ("POST", "/tokenize", {"messages": []}),
            ("GET", "/v1/completions", None),
            ("DELETE", "/v1/models", None),
            ("GET", "/v1/models/does-not-exist", None),
        ]
        for method, path, body in cases:
            r = c.request(method, path, json=target.body(**body) if body is not None else None)
            result.record(r, f"{method} {path} {json.dumps(body)[:60] if body else ''}")
            if r.status_code == 405 and "allow" not in r.headers:
                result.problems.append(f"{method} {path}: 405 without an Allow header")
    return result


def slow_loris(target: Target, connections: int = 200, wait_s: float = 120.0) -> CaseResult:
    """Stalled half-sent requests: /health must keep answering and the server must close them itself."""
    result = CaseResult("slow-loris", note=f"{connections} stalled connections")
    url = urlsplit(target.base_url)
    socks = []
    for i in range(connections):
        try:
            s = socket.create_connection((url.hostname, url.port or 80), timeout=wait_s)
        except OSError as exc:
            result.note += f"; connect {i} failed: {exc}"
            break
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n" if i % 2 else
                  b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"pro")
        socks.append(s)
    with target.client() as c:
        r = c.get("/health")
        result.record(r, "/health while stalled")
    start = time.monotonic()
    unclosed = 0
    for s in socks:
        try:
            s.settimeout(max(0.1, wait_s - (time.monotonic() - start)))
            while s.recv(65536):
                pass
        except OSError:
            unclosed += 1
        finally:
            s.close()
    result.sent += len(socks)
    if unclosed:
        result.problems.append(f"{unclosed} stalled connections still open after {wait_s:g} s")
    result.note += f"; all closed by the server after {time.monotonic() - start:.1f} s"
    return result


def concurrent_tiny(target: Target, count: int = 500, concurrency: int = 200) -> CaseResult:
    result = CaseResult("many concurrent tiny requests", note=f"{count} requests, {concurrency} at once")

    async def run() -> list[httpx.Response | BaseException]:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=target.base_url, headers=target.headers, timeout=target.timeout,
                                     limits=limits) as c:
            async def one(i: int):
                return await c.post("/v1/completions", json=target.body(prompt=f"p{i}", max_tokens=1))
            return await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    for i, r in enumerate(asyncio.run(run())):
        if isinstance(r, BaseException):
            result.problems.append(f"request {i}: no answer ({type(r).__name__}: {r})")
        else:
            result.record(r, f"request {i}")
    return result


CASES: dict[str, Callable[[Target], CaseResult]] = {
    "invalid_utf8": invalid_utf8, "huge_bodies": huge_bodies, "deep_nesting": deep_nesting,
    "many_stop_strings": many_stop_strings, "token_ids_out_of_range": token_ids_out_of_range,
    "odd_requests": odd_requests, "slow_loris": slow_loris, "concurrent_tiny": concurrent_tiny,
}
