"""The in-process ``EngineClient``: the engine loop in a thread of the caller's process.

``tureen serve`` runs the engine core in its own process instead (``engine/core_client.py``);
this client remains for embedding the engine in another asyncio program and for tests. Requests
are validated once by the engine's input processor on the caller's side; commands go in through
a thread-safe queue; outputs come back through ``loop.call_soon_threadsafe`` into one asyncio
queue per request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tureen.config import EngineConfig
from tureen.engine.core_messages import EngineCoreRequest
from tureen.engine.llm_engine import LLMEngine
from tureen.engine.output_stream import OutputStream
from tureen.engine.protocol import EngineStats
from tureen.errors import EngineDeadError, EngineStepError, InvalidRequestError
from tureen.outputs import RequestOutput
from tureen.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("tureen.engine")

_IDLE_WAIT_S = 0.25  # the loop wakes at least this often when idle, to refresh the heartbeat


@dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


class AsyncLLM:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.config = engine.config
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.is_demo_model = engine.is_demo_model
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, OutputStream]] = {}
        self._lock = threading.Lock()  # guards _streams
        self._stats = EngineStats(num_blocks=engine.num_kv_blocks, block_size=engine.block_size,
                                  heartbeat=time.monotonic())
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tureen-engine", daemon=True)
        self._thread.start()
        engine.structured.warm_up()  # a server's first constrained request should not pay for it

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncLLM":
        return cls(LLMEngine(config))

    # ---- public API (event-loop side) -------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        max_tokens = self.engine.processor.validate(prompt_token_ids, params)
        if params.max_tokens is None:
            params.max_tokens = max_tokens

    async def check_structured_outputs(self, params: SamplingParams) -> None:
        """Compile the request's constraint in a worker thread (cached for the engine's own use);
        InvalidRequestError says what is wrong with it."""
        if params.structured_outputs is not None:
            await asyncio.to_thread(self.engine.check_structured_outputs, params)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str, *,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        if self._error is not None or not self._thread.is_alive():
            raise EngineDeadError(f"the engine loop has stopped: {self._error!r}")
        core = self.engine.processor.process(request_id, prompt, params, priority=priority)
        loop = asyncio.get_running_loop()
        stream = OutputStream(coalesce=core.params.output_kind == RequestOutputKind.DELTA)
        with self._lock:
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
            self._streams[request_id] = (loop, stream)
        self._commands.put(core)
        finished = False
        try:
            while True:
                item = await stream.get()  # raises the request's error
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:  # consumer went away (disconnect, timeout, cancel): free its blocks now
                self._commands.put(_Abort(request_id))
            with self._lock:
                self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def is_alive(self) -> bool:
        return self._error is None and self._thread.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._commands.put(_Stop())
            self._thread.join(timeout)

    # ---- engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                if not self._apply_commands(block=not engine.has_unfinished_requests()):
                    break
                if engine.has_unfinished_requests():
                    self._deliver(engine.step())
                self._publish_stats()
        except BaseException as exc:  # a bug in a step must not leave clients hanging
            logger.exception("engine loop crashed")
            self._error = exc
            self._fail_all(EngineDeadError(f"the engine loop crashed: {exc!r}"))
            self._publish_stats()
            return
        self._abort_all()

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands; returns False on stop."""
        try:
            cmd = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(cmd, _Stop):
                return False
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, cmd: EngineCoreRequest | _Abort) -> None:
        if isinstance(cmd, _Abort):
            self.engine.abort_request(cmd.request_id)
            return
        with self._lock:
            if cmd.request_id not in self._streams:  # the client left before the engine saw it
                return
        try:
            self.engine.add_core_request(cmd)
        except Exception as exc:  # validated already; anything left is reported, never fatal
            self._send(cmd.request_id, exc)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._send(out.request_id, out if out.error is None else EngineStepError(out.error))

    def _send(self, request_id: str, item: Any) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is None:
            return
        loop, stream = target
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # the client's event loop is closed
            pass

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            ids = list(self._streams)
        for request_id in ids:
            self._send(request_id, exc)

    def _abort_all(self) -> None:
        self.engine.abort_all()
        self._deliver(self.engine.step())
        self._publish_stats()

    def _publish_stats(self) -> None:
        engine = self.engine
        s = engine.stats()
        self._stats = EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, kv_cache_usage=s.kv_cache_usage,
            num_blocks=s.num_blocks, block_size=engine.block_size,
            prefix_cache_queries=s.prefix_cache_queries, prefix_cache_hits=s.prefix_cache_hits,
            num_preemptions=s.num_preemptions, prompt_tokens=engine.prompt_tokens_total,
            generation_tokens=engine.generation_tokens_total, heartbeat=time.monotonic(),
            is_alive=self._error is None, spec_decoding=s.spec_decoding)
