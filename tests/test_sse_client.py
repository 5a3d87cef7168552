"""``StreamingClient`` (bench/sse_client.py) against a raw asyncio HTTP server that counts its connections."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tureen.bench.sse_client import BodySink, ResponseError, StreamingClient

EVENTS = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]


class Collect(BodySink):
    def __init__(self) -> None:
        self.status, self.headers, self.body = 0, {}, b""

    def on_headers(self, status: int, reason: str, headers: dict[str, str]) -> None:
        self.status, self.headers = status, headers

    def on_body(self, data: bytes) -> None:
        self.body += data


class RawServer:
    """Answers each POST with a chunked SSE body, one chunk per event; ``close_after`` responses per
    connection, then it closes the connection without saying so (as an idle keep-alive timeout does)."""

    def __init__(self, close_after: int = 0, truncate: bool = False) -> None:
        self.close_after, self.truncate = close_after, truncate
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                self.requests.append(head + await reader.readexactly(length))
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-tureen-cache: miss\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                for event in EVENTS[:1] if self.truncate else EVENTS:
                    writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                    await writer.drain()
                if self.truncate:
                    break
                writer.write(b"0\r\n\r\n")
                await writer.drain()
                served += 1
                if served == self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/prefix"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


def test_sequential_requests_share_one_keep_alive_connection() -> None:
    async def main() -> tuple[RawServer, list[Collect]]:
        srv = RawServer()
        async with srv as url, StreamingClient(url, {"Authorization": "Bearer k"}) as client:
            sinks = [Collect() for _ in range(3)]
            for sink in sinks:
                await client.post("/v1/completions", b'{"x": 1}', sink)
        return srv, sinks

    srv, sinks = asyncio.run(main())
    assert srv.connections == 1 and len(srv.requests) == 3
    assert srv.requests[0].startswith(b"POST /prefix/v1/completions HTTP/1.1\r\n")
    assert b"Authorization: Bearer k\r\n" in srv.requests[0] and srv.requests[0].endswith(b'{"x": 1}')
    for sink in sinks:
        assert sink.status == 200 and sink.headers["x-tureen-cache"] == "miss"
        assert sink.body == b"".join(EVENTS)  # the chunked coding is undone


@pytest.mark.parametrize("idle_s", [0.05, 0.0])  # the close seen while idle, or only once the request meets it
def test_a_connection_closed_while_idle_is_replaced_and_the_request_sent_again(idle_s: float) -> None:
    async def main() -> tuple[RawServer, list[Collect]]:
        srv = RawServer(close_after=1)
        async with srv as url, StreamingClient(url) as client:
            sinks = [Collect() for _ in range(3)]
            for sink in sinks:
                await client.post("/v1/completions", b"{}", sink)
                await asyncio.sleep(idle_s)
        return srv, sinks

    srv, sinks = asyncio.run(main())
    assert srv.connections == 3 and len(srv.requests) == 3
    assert all(s.body == b"".join(EVENTS) for s in sinks)


def test_a_stream_cut_short_is_a_connection_error_and_refused_connect_too() -> None:
    async def main() -> None:
        srv = RawServer(truncate=True)
        async with srv as url, StreamingClient(url) as client:
            sink = Collect()
            with pytest.raises(ResponseError) as cut:
                await client.post("/v1/completions", b"{}", sink)
            assert cut.value.reason == "connection_error" and sink.body == EVENTS[0]
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        async with StreamingClient(f"http://127.0.0.1:{port}") as client:
            with pytest.raises(ResponseError) as refused:
                await client.post("/v1/completions", b"{}", Collect())
            assert refused.value.reason == "connection_error"

    asyncio.run(main())


def test_a_malformed_response_is_an_http_error() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with StreamingClient(f"http://127.0.0.1:{port}") as client:
            with pytest.raises(ResponseError) as bad:
                await client.post("/v1/completions", b"", Collect())
        server.close()
        assert bad.value.reason == "http_error"

    asyncio.run(main())
