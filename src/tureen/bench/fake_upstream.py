"""A fast fake OpenAI-compatible upstream: fixed TTFT and ITL, so the upstream is never the bottleneck.

``python -m tureen.bench.fake_upstream --port 9000 --ttft-ms 20 --itl-ms 10 --tokens 64`` serves
``/v1/chat/completions`` and ``/v1/completions`` (streaming and not), ``/v1/models``, ``/health``
and ``/metrics`` (vLLM's names). It is a raw ASGI app with pre-encoded chunks and deadline-based
pacing, so the token schedule holds at hundreds of concurrent streams.

For tests it can misbehave on demand, set at start-up or at run time with ``POST /control``
(JSON with any ``Behaviour`` field): fail with a status (and ``Retry-After``), be slow, die after
some chunks, answer ``context_length_exceeded`` above a prompt size, fail its health check.
``GET /stats`` returns what it received (counts, and the last request bodies).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from dataclasses import asdict, dataclass, field, fields

from starlette.types import Receive, Scope, Send

JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


@dataclass
class Behaviour:
    ttft_s: float = 0.02
    itl_s: float = 0.01
    tokens: int = 64
    model: str = "fake"
    fail_status: int | None = None  # answer every generation request with this status...
    fail_count: int | None = None  # ...this many times (None: always), then behave
    retry_after: float | None = None  # sent with fail_status
    fail_body: str | None = None  # raw body for fail_status (default: an OpenAI error JSON)
    delay_s: float = 0.0  # extra wait before the response starts
    die_after_chunks: int | None = None  # a stream drops its connection after this many content chunks
    max_prompt_chars: int | None = None  # longer prompts get OpenAI's context_length_exceeded 400
    healthy: bool = True
    num_waiting: float = 0.0  # reported as vllm:num_requests_waiting


@dataclass
class Stats:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    inflight: int = 0
    max_inflight: int = 0
    last_bodies: list[dict] = field(default_factory=list)


class FakeUpstream:
    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.stats = Stats()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        path, method = scope["path"], scope["method"]
        if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            await self._generate(path.endswith("chat/completions"), receive, send)
        elif path == "/health":
            await _send(send, 200 if self.behaviour.healthy else 503, b'{"status":"ok"}')
        elif path == "/metrics":
            await _send(send, 200, self._metrics(), [(b"content-type", b"text/plain; version=0.0.4")])
        elif path == "/v1/models":
            body = {"object": "list", "data": [{"id": self.behaviour.model, "object": "model", "owned_by": "fake"}]}
            await _send(send, 200, json.dumps(body).encode())
        elif path == "/stats":
            await _send(send, 200, json.dumps(asdict(self.stats)).encode())
        elif path == "/control" and method == "POST":
            await self._control(receive, send)
        else:
            await _send(send, 404, b'{"error":{"message":"not found","type":"invalid_request_error"}}')

    async def _control(self, receive: Receive, send: Send) -> None:
        changes = json.loads(await _body(receive) or b"{}")
        known = {f.name for f in fields(Behaviour)}
        for name, value in changes.items():
            if name == "reset_stats":
                self.stats = Stats()
            elif name in known:
                setattr(self.behaviour, name, value)
        await _send(send, 200, json.dumps(asdict(self.behaviour)).encode())

    def _metrics(self) -> bytes:
        b = self.behaviour
        return (f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name=\"{b.model}\"}} "
                f"{self.stats.inflight}\n# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting"
                f"{{model_name=\"{b.model}\"}} {b.num_waiting}\n# TYPE vllm:kv_cache_usage_perc gauge\n"
                f"vllm:kv_cache_usage_perc{{model_name=\"{b.model}\"}} 0.0\n").encode()

    async def _generate(self, chat: bool, receive: Receive, send: Send) -> None:
        body = json.loads(await _body(receive) or b"{}")
        stats, b = self.stats, self.behaviour
        stats.requests += 1
        stats.last_bodies = (stats.last_bodies + [body])[-20:]
        if await self._misbehave(body, send):
            return
        stats.inflight += 1
        stats.max_inflight = max(stats.max_inflight, stats.inflight)
        try:
            if b.delay_s:
                await asyncio.sleep(b.delay_s)
            gone = asyncio.create_task(_disconnected(receive))
            work = asyncio.create_task(self._stream(chat, body, send) if body.get("stream")
                                       else self._whole(chat, body, send))
            done, _ = await asyncio.wait({gone, work}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                gone.cancel()
                work.result()
                stats.completed += 1
            else:  # the client (the gateway) went away: stop generating, as a real server aborts
                work.cancel()
                stats.cancelled += 1
        finally:
            stats.inflight -= 1

    async def _misbehave(self, body: dict, send: Send) -> bool:
        b = self.behaviour
        if b.max_prompt_chars is not None and _prompt_chars(body) > b.max_prompt_chars:
            message = (f"This model's maximum context length is {b.max_prompt_chars} tokens. However, you "
                       f"requested more.")
            error = {"error": {"message": message, "type": "invalid_request_error", "param": "messages",
                               "code": "context_length_exceeded"}}
            await _send(send, 400, json.dumps(error).encode())
            self.stats.failed += 1
            return True
        if b.fail_status is None or b.fail_count == 0:
            return False
        if b.fail_count is not None:
            b.fail_count -= 1
        headers = list(JSON)
        if b.retry_after is not None:
            headers.append((b"retry-after", str(b.retry_after).encode()))
        default = {"error": {"message": f"fake failure {b.fail_status}", "type": "fake_error", "code": None}}
        fail_body = b.fail_body.encode() if b.fail_body is not None else json.dumps(default).encode()
        await _send(send, b.fail_status, fail_body, headers)
        self.stats.failed += 1
        return True

    async def _whole(self, chat: bool, body: dict, send: Send) -> None:
        b = self.behaviour
        await asyncio.sleep(b.ttft_s + b.itl_s * max(0, b.tokens - 1))
        text = "".join(_token(i) for i in range(b.tokens))
        rid = uuid.uuid4().hex
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"} if chat
                  else {"index": 0, "text": text, "finish_reason": "length"})
        out = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}", "object": "chat.completion" if chat else
               "text_completion", "created": int(time.time()), "model": body.get("model", b.model),
               "choices": [choice], "usage": _usage(body, b.tokens)}
        await _send(send, 200, json.dumps(out).encode())

    async def _stream(self, chat: bool, body: dict, send: Send) -> None:
        b = self.behaviour
        start = time.perf_counter()
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        head, tail = _chunk_parts(chat, body.get("model", b.model))
        for i in range(b.tokens):
            delay = start + b.ttft_s + i * b.itl_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if b.die_after_chunks is not None and i >= b.die_after_chunks:
                raise ConnectionAbortedError("fake upstream dies mid-stream")
            finish = b'"length"' if i == b.tokens - 1 else b"null"
            await send({"type": "http.response.body", "body": head + _delta(chat, i) + tail + finish + b"}]}\n\n",
                        "more_body": True})
        usage = b""
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            usage = (b'data: {"id":"x","object":"chat.completion.chunk","choices":[],"usage":'
                     + json.dumps(_usage(body, b.tokens)).encode() + b"}\n\n")
        await send({"type": "http.response.body", "body": usage + b"data: [DONE]\n\n", "more_body": False})


def _chunk_parts(chat: bool, model: str) -> tuple[bytes, bytes]:
    rid = uuid.uuid4().hex
    obj = "chat.completion.chunk" if chat else "text_completion"
    head = (f'data: {{"id":"{"chatcmpl" if chat else "cmpl"}-{rid}","object":"{obj}","created":{int(time.time())},'
            f'"model":{json.dumps(model)},"choices":[{{"index":0,').encode()
    return head, b',"finish_reason":'


def _delta(chat: bool, i: int) -> bytes:
    text = json.dumps(_token(i)).encode()
    return b'"delta":{"content":' + text + b"}" if chat else b'"text":' + text


def _token(i: int) -> str:
    return f" t{i}"


def _prompt_chars(body: dict) -> int:
    if "messages" in body:
        return sum(len(str(m.get("content", ""))) for m in body["messages"] if isinstance(m, dict))
    return len(str(body.get("prompt", "")))


def _usage(body: dict, tokens: int) -> dict:
    prompt = max(1, _prompt_chars(body) // 4)
    return {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send(send: Send, status: int, body: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers or JSON})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tureen.bench.fake_upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--ttft-ms", type=float, default=20.0, help="time to first token (default: 20)")
    parser.add_argument("--itl-ms", type=float, default=10.0, help="inter-token latency (default: 10)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per response (default: 64)")
    parser.add_argument("--model", default="fake", help="the model name it reports (default: fake)")
    parser.add_argument("--behaviour", default="{}",
                        help="JSON with more Behaviour fields, e.g. '{\"fail_status\": 503}'")
    args = parser.parse_args(argv)
    settings = {"ttft_s": args.ttft_ms / 1000, "itl_s": args.itl_ms / 1000, "tokens": args.tokens, "model": args.model}
    behaviour = Behaviour(**{**settings, **json.loads(args.behaviour)})
    import uvicorn

    uvicorn.run(FakeUpstream(behaviour), host=args.host, port=args.port, log_level="warning", access_log=False,
                loop="auto", http="auto", backlog=4096)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
