"""A lean HTTP/1.1 client for streamed responses: keep-alive connections, a native parser, no tasks per chunk.

The benchmark client shares the machine with the server it measures, so every microsecond it
spends on a chunk is one the server does not get. Here each connection is an ``asyncio.Protocol``
whose bytes go straight into ``httptools``' parser (llhttp, native code: status line, headers,
chunked transfer coding). Its body callback hands the bytes to a ``BodySink`` in the same call: no
stream reader, no async generator and no coroutine wakes up per chunk. The waiting request
resumes once, when the response is complete.

Only what a benchmark needs: one origin, ``POST`` with a JSON body, plain TCP or TLS. Proxies,
redirects, cookies and compression are not supported.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

import httptools


class ResponseError(Exception):
    """The connection failed or the response was malformed; ``reason`` is a RequestRecord error reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class BodySink:
    """What a response's parts are handed to, as they arrive; raising from a method ends the response."""

    def on_headers(self, status: int, reason: str, headers: dict[str, str]) -> None:
        pass

    def on_body(self, data: bytes) -> None:
        pass

    def finished(self) -> bool:
        """True once the sink has all it wants (a stream's ``[DONE]``): the response ends there."""
        return False


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one response at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None  # a fresh one per response (start)
        self.sink: BodySink | None = None
        self.done: asyncio.Future | None = None
        self.received = False  # a byte of the current response has arrived
        self.complete = False  # the parser has seen the whole current response
        self.reusable = False  # ... and the server keeps the connection open after it
        self.lost = False
        self._reason = b""
        self._headers: dict[str, str] = {}

    # ---- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.done is None or self.complete:
            return
        self.received = True
        assert self.parser is not None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:  # the sink's own error (a StreamError) ends the response
            self._fail(exc.__context__ if isinstance(exc.__context__, Exception) else exc)
        except httptools.HttpParserUpgrade:
            self._fail(ResponseError("http_error", "the server switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(ResponseError("http_error", f"malformed HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.done is not None and not self.done.done():
            why = f": {exc}" if exc else ""
            self.done.set_exception(ResponseError("connection_error", f"the connection closed mid-response{why}"))

    # ---- httptools callbacks
    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self.sink is not None and self.parser is not None
        self.sink.on_headers(self.parser.get_status_code(), self._reason.decode("latin-1"), self._headers)

    def on_body(self, body: bytes) -> None:
        assert self.sink is not None and self.done is not None
        self.sink.on_body(body)
        if self.sink.finished() and not self.done.done():
            self.done.set_result(None)  # what follows ([DONE]'s chunk end) is not waited for

    def on_message_complete(self) -> None:
        assert self.parser is not None
        self.complete = True
        self.reusable = self.parser.should_keep_alive()
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    # ----
    def start(self, request: bytes, sink: BodySink) -> asyncio.Future:
        assert self.transport is not None
        self.parser = httptools.HttpResponseParser(self)
        self.sink, self.received, self.complete, self.reusable = sink, False, False, False
        self._reason, self._headers = b"", {}
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.done

    def _fail(self, exc: Exception) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


class StreamingClient:
    """Keep-alive connections to the origin of ``base_url``; use as ``async with``."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None) -> None:
        url = urlsplit(base_url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.prefix = url.path.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address
        host = host if url.port is None else f"{host}:{url.port}"
        lines = [f"Host: {host}", "Content-Type: application/json", "Accept: text/event-stream",
                 *(f"{k}: {v}" for k, v in (headers or {}).items())]
        self._head = "\r\n".join(lines).encode("latin-1")
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()

    async def __aenter__(self) -> "StreamingClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._all.clear()
        self._idle.clear()

    async def post(self, path: str, body: bytes, sink: BodySink) -> None:
        """Send one request and feed its response to ``sink``; raises ``ResponseError``.

        A kept-alive connection the server closed while it was idle is noticed when the request
        meets the closed socket before any response byte: the request is sent once more, on a new
        connection, as other HTTP clients do.
        """
        request = (b"POST " + (self.prefix + path).encode("latin-1") + b" HTTP/1.1\r\n" + self._head
                   + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        conn, reused = await self._acquire()
        try:
            await conn.start(request, sink)
        except ResponseError:
            if not (reused and not conn.received):
                raise
            self._drop(conn)
            conn, _ = await self._acquire(fresh=True)
            await conn.start(request, sink)
        finally:
            self._release(conn)

    async def _acquire(self, fresh: bool = False) -> tuple[_Connection, bool]:
        while self._idle and not fresh:
            conn = self._idle.pop()
            if conn.reusable and not conn.lost:
                return conn, True
            self._drop(conn)  # closed while idle, or its response's end never came
        try:
            _, conn = await asyncio.get_running_loop().create_connection(_Connection, self.host, self.port,
                                                                          ssl=self.ssl)
        except OSError as exc:
            raise ResponseError("connection_error", f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        self._all.add(conn)
        return conn, False

    def _release(self, conn: _Connection) -> None:
        """Back to the pool if the response ended cleanly. A stream whose sink stopped at ``[DONE]``
        goes back too: the chunked body's last bytes follow at once, and ``_acquire`` checks."""
        done = conn.done
        if not conn.lost and done is not None and done.done() and not done.cancelled() and done.exception() is None:
            self._idle.append(conn)
            return
        self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        self._all.discard(conn)

