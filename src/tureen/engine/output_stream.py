"""One request's outputs on their way to its consumer, with coalescing when the consumer lags.

Both ``EngineClient`` implementations (``AsyncLLM`` in-process, ``EngineCoreClient`` with the
engine in its own process) put each engine step's output for a request into that request's
``OutputStream``, from the event loop's thread. The consumer (an HTTP response) normally takes
each output before the next step's arrives, so every token is handed on as soon as it exists.

When the consumer falls behind (an event loop busy with many streams), several delta outputs
are waiting: ``get`` then merges them into one. The client gets the same tokens and text in fewer,
larger chunks, and the server does its per-chunk work (JSON, the socket write, metrics) once
instead of once per token. That is what keeps a saturated server's throughput from collapsing
into per-token overhead. Errors are never merged away: an error queued behind outputs is raised
right after those outputs are delivered.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from tureen.outputs import CompletionOutput, RequestOutput


class OutputStream:
    """A single consumer's queue: a deque and one waiter future (an ``asyncio.Queue`` does more work
    per item than the token it carries is worth: getter bookkeeping, task counting, loop checks)."""

    def __init__(self, coalesce: bool) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future | None = None  # the consumer, waiting for an item
        self._coalesce = coalesce  # only delta outputs can be merged; cumulative ones are just superseded
        self._held: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the consumer's, looked up once: on Python 3.11
        # every asyncio.get_running_loop() is a getpid() system call, a few us per token

    def put_nowait(self, item: RequestOutput | BaseException) -> None:
        """Called on the consumer's event loop (from another thread: through ``call_soon_threadsafe``)."""
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> RequestOutput:
        """The next output (merged with any others already waiting); raises a queued error."""
        if self._held is not None:
            held, self._held = self._held, None
            raise held
        items = self._items
        while not items:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = items.popleft()
        if isinstance(item, BaseException):
            raise item
        while self._coalesce and not item.finished and items:
            nxt = items.popleft()
            if isinstance(nxt, BaseException):
                self._held = nxt  # deliver what came before it first
                break
            item = merge_delta(item, nxt)
        return item


def merge_delta(first: RequestOutput, second: RequestOutput) -> RequestOutput:
    """``second`` extended backwards by ``first``: text, token ids and logprobs concatenated per completion.

    The state (finished, finish and stop reasons, cumulative logprob, metrics, cached tokens) is
    the later output's.
    """
    merged: dict[int, CompletionOutput] = {c.index: c for c in first.outputs}
    for c in second.outputs:
        prev = merged.get(c.index)
        if prev is None:
            merged[c.index] = c
            continue
        merged[c.index] = CompletionOutput(
            index=c.index, text=prev.text + c.text, token_ids=prev.token_ids + c.token_ids,
            cumulative_logprob=c.cumulative_logprob,
            logprobs=None if prev.logprobs is None and c.logprobs is None else (prev.logprobs or []) + (c.logprobs or []),
            finish_reason=c.finish_reason, stop_reason=c.stop_reason)
    second.outputs = [merged[i] for i in sorted(merged)]
    return second
