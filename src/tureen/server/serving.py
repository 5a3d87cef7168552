"""What both generation endpoints share: admission, the engine streams, timeouts, disconnects, SSE.

A ``Generation`` owns the engine requests of one HTTP request (one per prompt). Whatever ends it
(completion, client disconnect, ``--request-timeout``, an error) goes through ``close()``, which
aborts unfinished engine requests at once (their KV blocks are freed on the engine's next
iteration), records metrics and the log line, and leaves the in-flight registry.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from fastapi.sse import format_sse_event
from pydantic import BaseModel

from tureen.errors import InvalidRequestError, PromptTooLongError
from tureen.outputs import RequestOutput
from tureen.sampling_params import SamplingParams, StructuredOutputsParams
from tureen.server.errors import APIError, model_not_found, request_timeout, to_api_error
from tureen.server.lifecycle import ServerState
from tureen.server.protocol import PromptTokensDetails, SamplingRequest, Usage
from tureen.server.tracking import RequestTracker, logfmt

logger = logging.getLogger("tureen.server")

T = TypeVar("T")
SSE_DONE = format_sse_event(data_str="[DONE]")
_END = object()


def sse(payload: BaseModel | str) -> bytes:
    data = payload if isinstance(payload, str) else payload.model_dump_json()
    return format_sse_event(data_str=data)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None = None  # only for --enable-log-requests


class Generation:
    """The engine streams of one HTTP request, merged as ``(prompt_index, RequestOutput)``."""

    def __init__(self, state: ServerState, request_ids: list[str], prompts: list[Prompt],
                 params: list[SamplingParams], priority: int) -> None:
        assert state.engine is not None
        self.state, self.engine = state, state.engine
        self.request_ids, self.prompts, self.params, self.priority = request_ids, prompts, params, priority
        self.trackers = [RequestTracker(rid, len(p.token_ids), sp.n, sp.max_tokens, state.metrics)
                         for rid, p, sp in zip(request_ids, prompts, params)]
        for tracker in self.trackers:
            state.register(tracker)
        self._streams: list[AsyncIterator[RequestOutput]] = []
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._open = len(prompts)
        self._closed = False
        self._unwritten_since: float | None = None  # end of the step whose output awaits its SSE write

    @property
    def cached_tokens(self) -> int:
        return sum(t.cached for t in self.trackers)

    def _start(self) -> None:
        self._streams = [self.engine.generate(p.token_ids, sp, rid, priority=self.priority)
                         for p, sp, rid in zip(self.prompts, self.params, self.request_ids)]
        if len(self._streams) > 1:
            self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(self._streams)]

    async def _pump(self, index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                self._queue.put_nowait((index, out))
            self._queue.put_nowait((index, _END))
        except Exception as exc:  # forwarded to the consumer; cancellation just ends the task
            self._queue.put_nowait((index, exc))

    async def next(self) -> tuple[int, RequestOutput] | None:
        """The next output of any prompt, or None when all have finished."""
        if not self._streams:
            self._start()
        while True:
            if len(self._streams) == 1:
                try:
                    index, item = 0, await anext(self._streams[0])
                except StopAsyncIteration:
                    return None
            else:
                if self._open == 0:
                    return None
                index, item = await self._queue.get()
            if item is _END:
                self._open -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            self._observe(index, item)
            return index, item

    def _observe(self, index: int, out: RequestOutput) -> None:
        tracker = self.trackers[index]
        if tracker.observe(out) and self._unwritten_since is None and out.metrics is not None:
            self._unwritten_since = out.metrics.last_token_time
        if out.finished:
            tracker.finish()
            self.state.unregister(tracker.request_id)

    def written(self) -> None:
        """A chunk went to the client's socket: record how long ago the step behind it ended.

        Step ends are the engine's ``time.time()`` stamps (``RequestMetrics.last_token_time``), so
        the figure spans the channel between the processes, the event loop and the SSE write.
        """
        since, self._unwritten_since = self._unwritten_since, None
        if since is not None and self.state.metrics is not None:
            self.state.metrics.handoff.observe(max(time.time() - since, 0.0))

    async def close(self, abort_reason: str | None = None) -> None:
        """Abort what is unfinished and settle the bookkeeping; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        unfinished = [t for t in self.trackers if t.request_id in self.state.inflight]
        if unfinished and abort_reason and self.state.metrics is not None:
            self.state.metrics.aborted[abort_reason].inc(len(unfinished))
        for task in self._tasks:  # cancelling a pump closes its engine stream, which aborts the request
            task.cancel()
        for t in unfinished:
            t.finish()
            self.state.unregister(t.request_id)
        if len(self._streams) == 1 and not getattr(self._streams[0], "ag_running", False):
            await self._streams[0].aclose()  # aborts the request when it has not finished


# ---------------------------------------------------------------------------------- preparing


def check_model(state: ServerState, req: SamplingRequest) -> None:
    assert state.engine is not None
    if req.model is not None and req.model != state.engine.model_name:
        raise model_not_found(req.model, state.engine.model_name)


def require_engine(state: ServerState) -> None:
    """Before the model has loaded (or while draining) there is no engine to ask: answer 503."""
    if state.engine is None:
        state.admit(1)  # raises the right 503


OFF_LOOP_CHARS = 16 * 1024  # texts at least this long are tokenized / rendered in a worker thread


async def off_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in a worker thread when its input is large, so the event loop keeps serving.

    Small inputs run inline: a thread hop costs more than tokenizing a short prompt. (The tokenizer
    releases the GIL while it encodes, so the loop really does run meanwhile.)
    """
    if size < OFF_LOOP_CHARS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def check_text_fits(state: ServerState, text: str, param: str = "prompt") -> None:
    """Reject a text that cannot fit in max_model_len tokens whatever it tokenizes to, before tokenizing it."""
    assert state.engine is not None
    if len(text) > state.max_prompt_chars:
        limit = state.engine.max_model_len
        raise PromptTooLongError(
            f"the {param} has {len(text)} characters; no text longer than {state.max_prompt_chars} characters "
            f"fits in max_model_len={limit} tokens with this tokenizer", limit=limit, value=len(text))


def prepare_params(state: ServerState, req: Any, prompts: list[Prompt],
                   structured_outputs: StructuredOutputsParams | None = None) -> list[SamplingParams]:
    """One SamplingParams per prompt, validated by the engine (which fills max_tokens).

    ``structured_outputs`` overrides the request's own output constraint (tool_choice decides it).
    """
    assert state.engine is not None
    base = req.to_sampling_params(state.engine.tokenizer.generation_defaults, structured_outputs)
    out = []
    for p in prompts:
        sp = copy.copy(base)
        state.engine.validate(p.token_ids, sp)
        out.append(sp)
    return out


async def check_constraints(state: ServerState, params: list[SamplingParams], field: str) -> None:
    """Compile the request's output constraint off the event loop; a bad one is a 400 naming it.

    ``field`` is the request field the constraint came from; errors name it rather than the
    internal ``structured_outputs.*`` spelling. The engine caches the compiled grammar, so its
    own compilation of this request is a lookup.
    """
    assert state.engine is not None
    if not params or params[0].structured_outputs is None:
        return
    try:
        await state.engine.check_structured_outputs(params[0])
    except InvalidRequestError as exc:
        internal = f"structured_outputs.{params[0].structured_outputs.kind}"
        if field.startswith("structured_outputs") or not (exc.param or "").startswith(internal):
            raise
        raise InvalidRequestError(str(exc).replace(internal, field), param=field) from None


def start_generation(state: ServerState, base_id: str, prompts: list[Prompt], params: list[SamplingParams],
                     priority: int) -> Generation:
    state.admit(len(prompts))
    ids = [base_id] if len(prompts) == 1 else [f"{base_id}-{i}" for i in range(len(prompts))]
    if state.config.enable_log_requests:
        for rid, p, sp in zip(ids, prompts, params):
            logger.info("request received %s", logfmt({"id": rid, "prompt": _clip(p, state.config.max_log_len),
                                                        "params": repr(sp)}))
    return Generation(state, ids, prompts, params, priority)


def _clip(p: Prompt, limit: int | None) -> str:
    text = p.text if p.text is not None else json.dumps(p.token_ids)
    return text if limit is None else text[:limit]


# ---------------------------------------------------------------------------------- running


def deadline(state: ServerState) -> float | None:
    timeout = state.config.request_timeout
    return None if timeout is None else asyncio.get_running_loop().time() + timeout


@asynccontextmanager
async def time_limit(when: float | None, seconds: float | None):
    try:
        async with asyncio.timeout_at(when):
            yield
    except TimeoutError:
        raise request_timeout(seconds or 0.0) from None


async def collect(state: ServerState, gen: Generation, raw: Request,
                  build: Callable[[], Awaitable[Response]]) -> Response:
    """Run a non-streaming request to the end, aborting it if the client leaves or time runs out."""
    task = asyncio.create_task(build())
    watcher = asyncio.create_task(_wait_for_disconnect(raw))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task not in done:  # the client went away
        await gen.close("client_disconnect")
        return Response(status_code=499)
    exc = task.exception()
    await gen.close("timeout" if isinstance(exc, APIError) and exc.code == "request_timeout" else None)
    if exc is not None:
        return to_api_error(exc).response()
    return task.result()


async def _wait_for_disconnect(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


async def event_stream(state: ServerState, gen: Generation,
                       chunks: Callable[[], AsyncIterator[bytes]]) -> AsyncIterator[bytes]:
    """SSE body: the endpoint's chunks, an error event if something fails midway, then [DONE]."""
    reason = "client_disconnect"  # if we are closed or cancelled before the end, the client left
    try:
        async for chunk in chunks():
            yield chunk  # resumed once the server has handed the chunk to the socket
            gen.written()
        reason = None
    except Exception as exc:  # after the headers went out, errors travel as an SSE event
        err = to_api_error(exc)
        reason = "timeout" if err.code == "request_timeout" else None
        yield sse(err.sse_payload())
    finally:
        await gen.close(reason)
    yield SSE_DONE


class GenerationResponse(StreamingResponse):
    """A streaming response that always closes its Generation, even if streaming never started."""

    def __init__(self, state: ServerState, gen: Generation, chunks: Callable[[], AsyncIterator[bytes]]) -> None:
        super().__init__(event_stream(state, gen, chunks), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.gen = gen

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.gen.close("client_disconnect")


async def next_output(gen: Generation, when: float | None, seconds: float | None
                      ) -> tuple[int, RequestOutput] | None:
    if when is None:  # no --request-timeout: no timer to arm and cancel for every token
        return await gen.next()
    async with time_limit(when, seconds):
        return await gen.next()


# ---------------------------------------------------------------------------------- shaping


def usage(gen: Generation, completion_tokens: int) -> Usage:
    prompt_tokens = sum(len(p.token_ids) for p in gen.prompts)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=gen.cached_tokens))
