"""One streamed request against an OpenAI-compatible server, timed the way vLLM's benchmark does.

TTFT is send -> first chunk with content; ITL is the gap between consecutive content chunks;
E2EL is send -> the last chunk that carries choices (the trailing usage-only chunk and
``[DONE]`` do not count). Output tokens come from the final ``usage`` when the server sends it.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator

import aiohttp
import httpx
import orjson

from tureen.bench.datasets import SampleRequest
from tureen.bench.serve_config import TargetConfig
from tureen.bench.token_codec import ServerUnavailableError

_ERROR_BODY_BYTES = 4096


@dataclass
class RequestRecord:
    """What one request did. Times are seconds; ``start_time`` is relative to the run's start."""

    index: int
    prompt_len: int
    expected_output_len: int
    success: bool = False
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2el: float = 0.0
    output_len: int = 0
    output_len_source: str = ""  # "usage", "tokenizer" or "chunks"
    start_time: float = 0.0
    queue_time: float = 0.0  # waiting on the client's --max-concurrency semaphore
    status_code: int | None = None
    error_reason: str = ""  # "http_<code>", "timeout", "connection_error", "stream_error", ...
    error: str = ""
    retry_after: str | None = None
    finish_reason: str | None = None
    generated_text: str = ""
    sent: bool = False
    kind: str = ""  # the sample's kind (cache dataset: fresh, repeat, paraphrase)
    cache: str | None = None  # the gateway's x-tureen-cache header: hit, semantic-hit or miss

    def fail(self, reason: str, message: str) -> None:
        self.success = False
        self.error_reason = reason
        self.error = message

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["tpot"] = self.tpot
        return out

    @property
    def tpot(self) -> float:
        """(E2EL - TTFT) / (output tokens - 1); 0 for one-token outputs (as in vLLM's goodput)."""
        if not self.success or self.output_len <= 1:
            return 0.0
        return (self.e2el - self.ttft) / (self.output_len - 1)


class StreamError(Exception):
    """The server reported an error inside a 200 stream, or the stream was malformed."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def make_http_client(target: TargetConfig, max_connections: int | None) -> aiohttp.ClientSession:
    """One pooled session per run (call it inside the run's event loop). ``trust_env=False``: no
    proxy ever sits between us and the target.

    The streams go through aiohttp, not httpx: its HTTP parser is native code, and a streamed
    chunk costs the client about half the CPU (measured 43 against 92-106 us per chunk, 32 streams
    on uvloop), CPU that a server under test on the same machine keeps.
    """
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    return aiohttp.ClientSession(
        headers=headers, trust_env=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=target.timeout, sock_read=target.timeout),
        connector=aiohttp.TCPConnector(limit=max_connections or 0),  # 0: no limit
    )


def sync_http_client(target: TargetConfig) -> httpx.Client:
    """For the set-up calls (/v1/models, /tokenize, /detokenize)."""
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    return httpx.Client(base_url=target.base_url, headers=headers, trust_env=False,
                        timeout=httpx.Timeout(min(target.timeout, 60.0)))


def first_model_id(client: httpx.Client, wait_s: float = 0.0) -> str:
    """The first id from ``GET /v1/models`` (the default ``--model``).

    A server that answers 503 (still loading the model) is asked again, once a second, for up
    to ``wait_s`` seconds.
    """
    deadline = time.monotonic() + wait_s
    for _ in range(int(wait_s) + 1):  # bounded by count as well as by time
        try:
            resp = client.get("/v1/models")
        except httpx.TransportError as exc:
            raise ServerUnavailableError(f"cannot reach {client.base_url}: {exc}") from exc
        if resp.status_code != 503 or time.monotonic() + 1.0 > deadline:
            break
        time.sleep(1.0)
    if resp.status_code != 200:
        raise ServerUnavailableError(f"GET /v1/models answered HTTP {resp.status_code}: "
                                     f"{_error_message(resp.content)}; pass --model if it has no such endpoint")
    try:
        return str(resp.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ServerUnavailableError("GET /v1/models listed no model; pass --model") from exc


def build_payload(target: TargetConfig, model: str, sample: SampleRequest) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": sample.expected_output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.endpoint == "completions":
        payload["prompt"] = sample.prompt
    else:
        payload["messages"] = [{"role": "user", "content": sample.prompt}]
    if target.ignore_eos:
        payload["ignore_eos"] = True
    payload.update(target.sampling())
    payload.update(sample.sampling)
    return payload


async def send_request(http: aiohttp.ClientSession, target: TargetConfig, payload: dict[str, Any],
                       record: RequestRecord, clock_zero: float) -> None:
    """Send one request and fill ``record``; every failure is recorded with its reason, never raised.

    ``asyncio.CancelledError`` (Ctrl-C, the overall deadline) does propagate.
    """
    start = time.perf_counter()
    record.start_time = start - clock_zero
    record.sent = True
    try:
        async with asyncio.timeout(target.timeout):
            async with http.post(target.base_url.rstrip("/") + target.api_path, json=payload) as resp:
                record.status_code = resp.status
                record.cache = resp.headers.get("x-tureen-cache")
                if resp.status != 200:
                    await _record_http_error(resp, record)
                    return
                await _consume_stream(resp, record, start, _max_events(payload))
    except TimeoutError as exc:  # the overall bound, or aiohttp's socket timeouts (a subclass)
        message = f"{type(exc).__name__}: {exc}" if isinstance(exc, aiohttp.ClientError) else \
            f"no complete response within {target.timeout:g} s"
        record.fail("timeout", message)
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:  # refused, reset, cut short
        record.fail("connection_error", f"{type(exc).__name__}: {exc}")
    except aiohttp.ClientError as exc:
        record.fail("http_error", f"{type(exc).__name__}: {exc}")
    except StreamError as exc:
        record.fail(exc.reason, str(exc))


def _max_events(payload: dict[str, Any]) -> int:
    # Generous: a well-behaved server sends about one chunk per token plus a few extra.
    return 64 + 16 * int(payload.get("max_tokens") or 1)


async def _record_http_error(resp: aiohttp.ClientResponse, record: RequestRecord) -> None:
    body = b""
    while len(body) < _ERROR_BODY_BYTES and (chunk := await resp.content.read(_ERROR_BODY_BYTES - len(body))):
        body += chunk
    record.retry_after = resp.headers.get("retry-after")
    message = _error_message(body) or resp.reason or ""
    if record.retry_after is not None:
        message += f" (Retry-After: {record.retry_after})"
    record.fail(f"http_{resp.status}", message)


def _error_message(body: bytes) -> str:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body.decode("utf-8", "replace")[:300]
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("detail", obj))
        if isinstance(err, dict):
            return str(err.get("message", err))[:300]
        return str(err)[:300]
    return str(obj)[:300]


async def _consume_stream(resp: aiohttp.ClientResponse, record: RequestRecord, start: float,
                          max_events: int) -> None:
    first_choice_at: float | None = None
    last_content_at: float | None = None
    last_choice_at = start
    text_parts: list[str] = []
    n_events = 0
    async for event, data in sse_events(body_lines(resp.content)):
        now = time.perf_counter()
        n_events += 1
        if n_events > max_events:
            raise StreamError("stream_overflow", f"more than {max_events} stream events")
        if data == "[DONE]":
            break
        obj = parse_event(event, data)
        choices = obj.get("choices")
        if choices:
            choice = choices[0] if isinstance(choices[0], dict) else {}
            last_choice_at = now
            first_choice_at = first_choice_at if first_choice_at is not None else now
            record.finish_reason = choice.get("finish_reason") or record.finish_reason
            text = choice_text(choice)
            if text:
                if last_content_at is None:
                    record.ttft = now - start
                else:
                    record.itl.append(now - last_content_at)
                last_content_at = now
                text_parts.append(text)
        if isinstance(obj.get("usage"), dict):
            _take_usage(obj["usage"], record)
    if first_choice_at is None:
        raise StreamError("no_content", "the stream ended without any completion chunk")
    if last_content_at is None:  # only empty deltas (e.g. all special tokens): time the first chunk
        record.ttft = first_choice_at - start
    record.e2el = last_choice_at - start
    record.generated_text = "".join(text_parts)
    record.success = True


def parse_event(event: str, data: str) -> dict[str, Any]:
    try:
        obj = orjson.loads(data)
    except ValueError:
        raise StreamError("bad_response", f"stream chunk is not JSON: {data[:200]!r}") from None
    if not isinstance(obj, dict):
        raise StreamError("bad_response", f"stream chunk is not an object: {data[:200]!r}")
    if event == "error" or "error" in obj:
        err = obj.get("error", obj)
        message = err.get("message", err) if isinstance(err, dict) else err
        raise StreamError("stream_error", f"error event mid-stream: {str(message)[:300]}")
    return obj


def choice_text(choice: dict[str, Any]) -> str:
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or delta.get("reasoning_content") or "") if isinstance(delta, dict) else ""


def _take_usage(usage: dict[str, Any], record: RequestRecord) -> None:
    completion = usage.get("completion_tokens")
    if isinstance(completion, int):
        record.output_len = completion
        record.output_len_source = "usage"
    prompt = usage.get("prompt_tokens")
    if isinstance(prompt, int):
        record.prompt_len = prompt


class SSEDecoder:
    """Line-by-line server-sent-events decoder (used by the async client and the Locust file)."""

    def __init__(self) -> None:
        self.event, self.data = "message", []

    def feed(self, line: str) -> tuple[str, str] | None:
        """One line without its newline; returns ``(event type, data)`` when an event completes."""
        if not line:
            out = (self.event, "\n".join(self.data)) if self.data else None
            self.event, self.data = "message", []
            return out
        if line.startswith(":"):  # comment / keep-alive ping
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self.data.append(value)
        elif name == "event":
            self.event = value
        return None

    def flush(self) -> tuple[str, str] | None:
        return self.feed("")


async def body_lines(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The body's lines, without their line break (LF or CRLF), as the bytes arrive."""
    tail = b""
    async for chunk in content.iter_any():
        *lines, tail = (tail + chunk).split(b"\n")
        for line in lines:  # split on bytes: a newline byte never falls inside a UTF-8 character
            yield line.rstrip(b"\r").decode("utf-8", "replace")
    if tail:
        yield tail.rstrip(b"\r").decode("utf-8", "replace")


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """Server-sent events as ``(event type, data)`` from a stream of lines."""
    decoder = SSEDecoder()
    async for line in lines:
        if (event := decoder.feed(line)) is not None:
            yield event
    if (event := decoder.flush()) is not None:
        yield event
