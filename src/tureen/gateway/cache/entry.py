"""A stored response, and serving it again as JSON or as an SSE stream.

An entry keeps what the upstream sent: the complete JSON body of a non-streaming response, or the
``data:`` payloads of a stream's content chunks (the usage-only chunk and ``[DONE]`` are left out,
the usage is kept aside). Served in the form it was stored in, it is byte-identical to the original
apart from ``id`` (fresh, so clients never see two responses with one id) and ``created`` (now).
Served in the other form it is converted: a body becomes a role+content chunk and a finish chunk;
stream chunks are joined into one message (text content only, else the entry serves streams only).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

from starlette.responses import Response, StreamingResponse

COMPLETE = frozenset({"stop", "length"})
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_CREATED = re.compile(rb'("created"\s*:\s*)(\d+)')


@dataclass
class Entry:
    endpoint: str  # "chat" | "completions"
    body: str | None  # the complete JSON response
    events: list[str] | None  # stream content chunks' data payloads
    usage: dict | None
    id: str  # the original response id (replaced when served)
    model: str
    stored_at: float
    cost: float | None = None  # what the original cost at the deployment's prices

    def dumps(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def loads(cls, raw: bytes | str) -> Entry:
        return cls(**json.loads(raw))

    @property
    def size(self) -> int:
        return len(self.body or "") + sum(len(e) for e in self.events or ())


def from_response(endpoint: str, stream: bool, raw: bytes, usage: dict | None, cost: float | None) -> Entry | None:
    """The entry for a finished response, or None when it must not be stored (error, incomplete)."""
    try:
        if not stream:
            data = json.loads(raw)
            if not isinstance(data, dict) or not _complete(data.get("choices")):
                return None
            return Entry(endpoint, raw.decode(), None, data.get("usage") or usage, str(data.get("id", "")),
                         str(data.get("model", "")), time.time(), cost)
        return _from_stream(endpoint, raw, usage, cost)
    except (ValueError, TypeError, UnicodeDecodeError):
        return None


def _complete(choices) -> bool:
    return bool(choices) and all(isinstance(c, dict) and c.get("finish_reason") in COMPLETE for c in choices)


def _from_stream(endpoint: str, raw: bytes, usage: dict | None, cost: float | None) -> Entry | None:
    events, finish, first = [], {}, None
    for payload in _payloads(raw.decode()):
        if payload == "[DONE]":
            continue
        data = json.loads(payload)
        if not isinstance(data, dict) or "error" in data:
            return None
        if not data.get("choices"):  # the usage-only chunk: kept aside, replayed when asked
            usage = data.get("usage") or usage
            continue
        first = first or data
        for c in data["choices"]:
            if c.get("finish_reason"):
                finish[c.get("index", 0)] = c["finish_reason"]
        events.append(payload)
    if first is None or not finish or not set(finish.values()) <= COMPLETE:
        return None
    return Entry(endpoint, None, events, usage, str(first.get("id", "")), str(first.get("model", "")),
                 time.time(), cost)


def _payloads(text: str) -> list[str]:
    out = []
    for event in re.split(r"\r?\n\r?\n", text):
        data = [line[5:].removeprefix(" ") for line in event.splitlines() if line.startswith("data:")]
        if data:
            out.append("\n".join(data))
    return out


# ---- serving ------------------------------------------------------------------------------------


def respond(entry: Entry, stream: bool, include_usage: bool) -> Response | None:
    """The response for a hit, or None when the entry cannot take this form."""
    new_id = _new_id(entry.endpoint)
    now = int(time.time())
    if not stream:
        body = entry.body if entry.body is not None else _joined(entry)
        if body is None:
            return None
        return Response(_renamed(body, entry.id, new_id, now), 200, media_type="application/json")
    events = entry.events if entry.events is not None else _chunks(entry)
    if events is None:
        return None
    chunks = [_renamed(e, entry.id, new_id, now) for e in events]
    if include_usage and entry.usage is not None:
        chunks.append(_usage_chunk(entry, new_id, now))
    return StreamingResponse(_sse(chunks), 200, headers=SSE_HEADERS, media_type="text/event-stream")


async def _sse(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield b"data: " + chunk + b"\n\n"
    yield b"data: [DONE]\n\n"


def _new_id(endpoint: str) -> str:
    return ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex


def _renamed(text: str, old_id: str, new_id: str, created: int) -> bytes:
    raw = text.encode()
    if old_id:
        raw = raw.replace(json.dumps(old_id).encode(), json.dumps(new_id).encode())
    return _CREATED.sub(lambda m: m.group(1) + str(created).encode(), raw, count=1)


def _usage_chunk(entry: Entry, new_id: str, created: int) -> bytes:
    obj = "chat.completion.chunk" if entry.endpoint == "chat" else "text_completion"
    return json.dumps({"id": new_id, "object": obj, "created": created, "model": entry.model, "choices": [],
                       "usage": entry.usage}, separators=(",", ":")).encode()


def _chunks(entry: Entry) -> list[str] | None:
    """Stream chunks made from a stored body: per choice, the content, then the finish reason."""
    data = json.loads(entry.body or "{}")
    head = {"id": entry.id, "created": data.get("created", 0), "model": entry.model}
    chunks = []
    for c in data.get("choices", []):
        i, finish = c.get("index", 0), c.get("finish_reason")
        if entry.endpoint == "chat":
            message = c.get("message") or {}
            if set(message) - {"role", "content", "refusal", "tool_calls"} or message.get("tool_calls"):
                return None
            delta = {"role": "assistant", "content": message.get("content") or ""}
            chunks += [{**head, "object": "chat.completion.chunk",
                        "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]},
                       {**head, "object": "chat.completion.chunk",
                        "choices": [{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}]}]
        else:
            chunks.append({**head, "object": "text_completion",
                           "choices": [{"index": i, "text": c.get("text", ""), "logprobs": None,
                                        "finish_reason": finish}]})
    return [json.dumps(c, separators=(",", ":")) for c in chunks]


def _joined(entry: Entry) -> str | None:
    """One complete body from stored stream chunks (text content only)."""
    texts: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    created = 0
    for payload in entry.events or ():
        data = json.loads(payload)
        created = created or data.get("created", 0)
        for c in data["choices"]:
            i = c.get("index", 0)
            if entry.endpoint == "chat":
                delta = c.get("delta") or {}
                if set(delta) - {"role", "content"}:
                    return None
                piece = delta.get("content") or ""
            else:
                piece = c.get("text") or ""
            texts.setdefault(i, []).append(piece)
            if c.get("finish_reason"):
                finish[i] = c["finish_reason"]
    if entry.endpoint == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": "".join(t)}, "logprobs": None,
                    "finish_reason": finish.get(i)} for i, t in sorted(texts.items())]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": "".join(t), "logprobs": None, "finish_reason": finish.get(i)}
                   for i, t in sorted(texts.items())]
        obj = "text_completion"
    body = {"id": entry.id, "object": obj, "created": created, "model": entry.model, "choices": choices,
            "usage": entry.usage}
    return json.dumps(body, separators=(",", ":"))
