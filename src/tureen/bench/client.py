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
from typing import Any

import httpx
import orjson

from tureen.bench.datasets import SampleRequest
from tureen.bench.serve_config import TargetConfig
from tureen.bench.sse_client import BodySink, ResponseError, StreamingClient
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


def make_http_client(target: TargetConfig) -> StreamingClient:
    """One pool of keep-alive connections per run (use it inside the run's event loop).

    Streams go through ``StreamingClient`` (bench/sse_client.py), not a general HTTP library: a
    streamed chunk costs it a native parse and one Python callback, CPU that a server under test
    on the same machine keeps. No proxy ever sits between us and the target.
    """
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    return StreamingClient(target.base_url, headers)


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


async def send_request(http: StreamingClient, target: TargetConfig, payload: dict[str, Any],
                       record: RequestRecord, clock_zero: float) -> None:
    """Send one request and fill ``record``; every failure is recorded with its reason, never raised.

    ``asyncio.CancelledError`` (Ctrl-C, the overall deadline) does propagate.
    """
    start = time.perf_counter()
    record.start_time = start - clock_zero
    record.sent = True
    stream = StreamRecorder(record, start, _max_events(payload))
    try:
        async with asyncio.timeout(target.timeout):
            await http.post(target.api_path, orjson.dumps(payload), stream)
        stream.settle()
    except TimeoutError:
        record.fail("timeout", f"no complete response within {target.timeout:g} s")
    except (ResponseError, StreamError) as exc:
        record.fail(exc.reason, str(exc))


def _max_events(payload: dict[str, Any]) -> int:
    # Generous: a well-behaved server sends about one chunk per token plus a few extra.
    return 64 + 16 * int(payload.get("max_tokens") or 1)


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


class StreamRecorder(BodySink):
    """Times one streamed response into its RequestRecord as the bytes arrive (in the parser's callback).

    A chunk's events share its arrival time, as they would reading the socket by hand.
    """

    def __init__(self, record: RequestRecord, start: float, max_events: int) -> None:
        self.record, self.start, self.max_events = record, start, max_events
        self.events = SSEParser()
        self.status = 0
        self.reason = ""
        self.error_body = b""
        self.n_events = 0
        self.done = False  # [DONE] seen
        self.first_choice_at: float | None = None
        self.last_content_at: float | None = None
        self.last_choice_at = start
        self.text_parts: list[str] = []

    def on_headers(self, status: int, reason: str, headers: dict[str, str]) -> None:
        self.status, self.reason = status, reason
        self.record.status_code = status
        self.record.cache = headers.get("x-tureen-cache")
        if status != 200:
            self.record.retry_after = headers.get("retry-after")

    def on_body(self, data: bytes) -> None:
        if self.status != 200:
            self.error_body = (self.error_body + data)[:_ERROR_BODY_BYTES]
            return
        now = time.perf_counter()
        for event, payload in self.events.feed(data):
            self._on_event(event, payload, now)

    def finished(self) -> bool:
        return self.done

    def _on_event(self, event: str, data: bytes, now: float) -> None:
        if self.done:
            return
        self.n_events += 1
        if self.n_events > self.max_events:
            raise StreamError("stream_overflow", f"more than {self.max_events} stream events")
        if data == b"[DONE]":
            self.done = True
            return
        obj = parse_event(event, data)
        choices = obj.get("choices")
        record = self.record
        if choices:
            choice = choices[0] if isinstance(choices[0], dict) else {}
            self.last_choice_at = now
            if self.first_choice_at is None:
                self.first_choice_at = now
            record.finish_reason = choice.get("finish_reason") or record.finish_reason
            text = choice_text(choice)
            if text:
                if self.last_content_at is None:
                    record.ttft = now - self.start
                else:
                    record.itl.append(now - self.last_content_at)
                self.last_content_at = now
                self.text_parts.append(text)
        if isinstance(obj.get("usage"), dict):
            _take_usage(obj["usage"], record)

    def settle(self) -> None:
        """The response has ended: mark the record a success, or raise why it is not."""
        record = self.record
        if self.status != 200:
            message = _error_message(self.error_body) or self.reason
            if record.retry_after is not None:
                message += f" (Retry-After: {record.retry_after})"
            raise StreamError(f"http_{self.status}", message)
        now = time.perf_counter()
        for event, payload in self.events.flush():  # a last event without its blank line
            self._on_event(event, payload, now)
        if self.first_choice_at is None:
            raise StreamError("no_content", "the stream ended without any completion chunk")
        if self.last_content_at is None:  # only empty deltas (e.g. all special tokens): time the first chunk
            record.ttft = self.first_choice_at - self.start
        record.e2el = self.last_choice_at - self.start
        record.generated_text = "".join(self.text_parts)
        record.success = True


def parse_event(event: str, data: str | bytes) -> dict[str, Any]:
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


class SSEParser:
    """Server-sent events from a byte stream as it arrives: ``(event type, data)`` per event.

    Lines end in LF or CRLF; a newline byte never falls inside a UTF-8 character, so splitting
    bytes is safe. Comments (keep-alive pings) are skipped; multi-line data is joined with LF.
    """

    def __init__(self) -> None:
        self._tail = b""
        self._event = "message"
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        lines = (self._tail + chunk).split(b"\n")
        self._tail = lines.pop()
        out = []
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            if not line:
                if self._data:
                    out.append((self._event, b"\n".join(self._data)))
                self._event, self._data = "message", []
            elif line[:1] != b":":  # ":" starts a comment
                name, _, value = line.partition(b":")
                value = value[1:] if value[:1] == b" " else value
                if name == b"data":
                    self._data.append(value)
                elif name == b"event":
                    self._event = value.decode("utf-8", "replace")
        return out

    def flush(self) -> list[tuple[str, bytes]]:
        """The event left open when the stream ended without its blank line."""
        return self.feed(b"\n\n") if self._tail or self._data else []
