"""Connection guards under uvicorn: a request read timeout and a connection limit.

uvicorn times out only *idle* keep-alive connections. A client that opens a connection and sends
nothing, or half a request line, or a body one byte a minute (slow-loris), holds a file descriptor
forever; enough of them exhaust the process's descriptors, and then even ``/health`` cannot be
accepted. The protocol class here adds, per connection:

- **read timeout** (``--http-read-timeout``): a request's headers must arrive in full within the
  timeout of its first byte (or of the connection opening), and its body may not stall for longer
  than the timeout between two reads. Past it the client gets ``408`` and the connection is closed.
- **connection limit** (``--max-connections``): a connection over the limit is answered ``503``
  with ``Retry-After`` and closed at once, so the descriptors stay available for the rest.

Both answers are the OpenAI error JSON. Nothing here holds state beyond the connection, so once the
stalled clients are timed out the server is back to normal by itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("tureen.server")

FD_RESERVE = 128  # descriptors kept for the engine's IPC, log files, the model's files
MIN_CONNECTIONS = 16

# Idle keep-alive connections stay open this long. uvicorn's default (5 s) equals the idle expiry of httpx's
# pool (the openai SDK's client): a client reusing a connection just as the server closes it gets a reset, and a
# POST is not retried, so the request is lost (a gateway soak lost 11 of 3,012 that way). A server should keep
# idle connections longer than its clients do, as nginx (75 s) and load balancers (60 s) do.
KEEP_ALIVE_S = 65


def default_max_connections() -> int:
    """The open-file limit less a reserve: over-limit connections are refused before accept() fails."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 65536
    return max(MIN_CONNECTIONS, soft - FD_RESERVE)


def raw_error_response(status: int, reason: str, message: str, code: str, extra: str = "") -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500 else
                                 "service_unavailable_error", "param": None, "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n{extra}\r\n")
    return head.encode("ascii") + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a read timeout and a connection limit (class attributes)."""

    read_timeout: float | None = None
    max_connections: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timer: asyncio.TimerHandle | None = None
        self._reading_body = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            message = (f"The server has its limit of {self.max_connections} open connections (--max-connections); "
                       "retry shortly.")
            transport.write(raw_error_response(503, "Service Unavailable", message, "too_many_connections",
                                               "retry-after: 1\r\n"))
            transport.close()
            return
        self._arm_read_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if (idle and self._read_timer is None) or self._reading_body:
            self._arm_read_timer()  # headers: from the first byte; body: from the last read
        super().data_received(data)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._reading_body = True
        self._arm_read_timer()

    def on_message_complete(self) -> None:
        self._reading_body = False
        self._cancel_read_timer()
        super().on_message_complete()

    def _arm_read_timer(self) -> None:
        self._cancel_read_timer()
        if self.read_timeout is not None and not self.transport.is_closing():
            self._read_timer = self.loop.call_later(self.read_timeout, self._on_read_timeout)

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _on_read_timeout(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        part = "body" if self._reading_body else "headers"
        if self.cycle is None or not self.cycle.response_started:
            message = (f"The request's {part} did not arrive within the server's --http-read-timeout of "
                       f"{self.read_timeout:g} s.")
            self.transport.write(raw_error_response(408, "Request Timeout", message, "request_timeout"))
        self.transport.close()


def guarded_protocol(read_timeout: float | None, max_connections: int | None) -> type[GuardedHttpToolsProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these limits."""
    return type("TureenHttpProtocol", (GuardedHttpToolsProtocol,),
                {"read_timeout": read_timeout, "max_connections": max_connections})
