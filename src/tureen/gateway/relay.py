"""Relaying an upstream SSE stream to the client, chunk by chunk, bytes unchanged.

Each chunk the upstream sends is written to the client as it arrives; nothing is buffered or
re-encoded. The only exception is the usage-only chunk that the gateway asked for on the client's
behalf (``stream_options.include_usage``): when the client did not ask for it, complete events are
scanned for it and it is dropped, so the client sees exactly what the upstream would have sent.

If the upstream fails after the first byte, the stream is ended with an SSE ``error`` event in the
OpenAI error shape and ``data: [DONE]``; it is never retried (the client already has part of an
answer). If the client goes away, the task is cancelled and the upstream connection is closed at
once (see ``app.ProxyEndpoint``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from fastapi.sse import format_sse_event
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tureen.gateway.pipeline import RequestContext
from tureen.gateway.upstream import UpstreamError, UpstreamResponse
from tureen.server.errors import UNAVAILABLE, APIError

SSE_DONE = format_sse_event(data_str="[DONE]")
_TAIL_BYTES = 16384
_MARK_COMPACT, _MARK_SPACED = b'"usage":{', b'"usage": {'
_USAGE_MARKS = (_MARK_COMPACT, _MARK_SPACED)


class RelayResponse(Response):
    """An ASGI response that streams an upstream's body; ``on_end(ok)`` runs exactly once.

    ``ok`` is True when the upstream finished, False when it failed mid-stream, None when the
    client went away first.
    """

    media_type = "text/event-stream"

    def __init__(self, ctx: RequestContext, upstream: UpstreamResponse, first: bytes, strip_usage: bool,
                 on_end: Callable[[bool | None], None]) -> None:
        # No Response.__init__: it would add a content-length; the body length is unknown.
        self.status_code = upstream.status_code
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.ctx, self.upstream, self.first = ctx, upstream, first
        self.on_end = on_end
        self.events = UsageStripper() if strip_usage else UsageTail()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ok: bool | None = None
        capture = [] if self.ctx.capture_body else None
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            ok = await self._pump(send, capture)
            if ok is False:
                await send({"type": "http.response.body", "body": self._error_event(), "more_body": True})
            await send({"type": "http.response.body", "body": self.events.flush(), "more_body": False})
        finally:
            await _close_quietly(self.upstream)
            self.ctx.usage = self.events.usage()
            if ok is True and capture is not None:
                self.ctx.response_body = b"".join(capture)
            if ok is False:
                self.ctx.error = "upstream failed mid-stream"
            self.on_end(ok)

    async def _pump(self, send: Send, capture: list[bytes] | None) -> bool:
        """Relay until the upstream's body ends (True) or fails (False); the hot loop of the gateway."""
        chunk, feed, next_chunk = self.first, self.events.feed, self.upstream.next_chunk
        try:
            while chunk:
                out = feed(chunk)
                if out:
                    if capture is not None:
                        capture.append(out)
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                chunk = await next_chunk()
        except UpstreamError:
            return False
        return True

    def _error_event(self) -> bytes:
        error = APIError(502, "The upstream failed while streaming the response; the stream was ended and not "
                              "retried.", UNAVAILABLE, code="upstream_stream_error")
        return self.events.flush() + format_sse_event(data_str=error.sse_payload()) + SSE_DONE


async def discard(response: Response) -> None:
    """Drop an answer that will not be sent: a relay closes its upstream stream and ends (no verdict)."""
    if isinstance(response, RelayResponse):
        await _close_quietly(response.upstream)
        response.on_end(None)


async def _close_quietly(upstream: UpstreamResponse) -> None:
    try:
        await asyncio.shield(upstream.aclose())
    except (Exception, asyncio.CancelledError):
        pass


class UsageTail:
    """Pass-through: keep the last few KiB to find the final usage chunk once the stream ends."""

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        self._tail = chunk[-_TAIL_BYTES:] if len(chunk) >= _TAIL_BYTES else (self._tail + chunk)[-_TAIL_BYTES:]
        return chunk

    def flush(self) -> bytes:
        return b""

    def usage(self) -> dict | None:
        return last_usage(self._tail.split(b"\n\n"))


class UsageStripper:
    """Forward whole events; drop the usage-only event (``choices: []``) the client did not ask for."""

    def __init__(self) -> None:
        self._partial = b""
        self._usage: dict | None = None

    def feed(self, chunk: bytes) -> bytes:
        data = self._partial + chunk if self._partial else chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            if b"\r\n\r\n" in data or len(data) > _TAIL_BYTES:  # CRLF framing or no framing: pass through
                self._partial = b""
                return data
            self._partial = data
            return b""
        if end + 2 == len(data):  # the usual case: the read ended on an event boundary, no copy
            whole, self._partial = data, b""
        else:
            whole, self._partial = data[: end + 2], data[end + 2:]
        if _MARK_COMPACT not in whole and _MARK_SPACED not in whole:
            return whole
        kept = [e for e in whole.split(b"\n\n") if e and not self._take_usage(e)]
        return b"".join(e + b"\n\n" for e in kept)

    def flush(self) -> bytes:
        rest, self._partial = self._partial, b""
        return rest

    def usage(self) -> dict | None:
        return self._usage

    def _take_usage(self, event: bytes) -> bool:
        """True when ``event`` is the usage-only chunk (now recorded and to be dropped)."""
        payload = _event_json(event)
        if not isinstance(payload, dict) or not isinstance(payload.get("usage"), dict):
            return False
        self._usage = payload["usage"]
        return not payload.get("choices")


def last_usage(events: list[bytes]) -> dict | None:
    for event in reversed(events):
        if any(mark in event for mark in _USAGE_MARKS):
            payload = _event_json(event)
            if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
                return payload["usage"]
    return None


def _event_json(event: bytes):
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                return json.loads(line[5:])
            except ValueError:
                return None
    return None


def usage_of(body: bytes) -> dict | None:
    """The ``usage`` of a complete (non-streaming) response body."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    usage = data.get("usage") if isinstance(data, dict) else None
    return usage if isinstance(usage, dict) else None
