"""``EngineCoreClient``: the ``EngineClient`` of ``tureen serve``, with the engine core in its own process.

    API process (this)                                  engine core process (engine/core.py)
    tokenizer, InputProcessor ──EngineCoreRequest──>      LLMEngine: schedule, run, sample,
    HTTP, SSE, metrics        <──StepOutputs (1/step)──   detokenize, stop strings
                               ──AbortRequests──────>
                  (one Unix socket pair, length-prefixed msgpack frames: engine/core_channel.py)

The API process never imports torch. It validates each request once (``InputProcessor``) and
sends it. The event loop that serves the requests reads the channel itself (``loop.add_reader``):
each engine step's ``StepOutputs`` is received, decoded and put into its requests' streams in one
callback, with no thread hop, self-pipe wake-up or lock hand-off between the step's end and the
SSE write. Each request's outputs wait in an ``OutputStream``, which merges the delta outputs a
lagging consumer has not taken yet (engine/output_stream.py). Streams of another event loop get
their batch with one ``call_soon_threadsafe`` per step. Until a loop reads the channel (start-up,
warm-up, a restart) or once its loop has stopped, the watchdog thread reads it instead.

The watchdog thread:

- the engine process exited (its end of the socket closes: noticed at once), or sent nothing
  (not even its idle heartbeat) for ``stall_timeout`` seconds: the stats snapshot goes unhealthy at once, every in-flight request
  fails with ``EngineDeadError``, the process is killed and a new one started and warmed up with a
  real generation, then the snapshot is healthy again and ``engine_restarts`` counts one more;
- after ``max_restarts`` restarts within ``restart_window`` seconds it stops trying: the client
  stays dead and unhealthy, so an orchestrator replaces the pod.

Each engine generation gets a fresh socket pair, so nothing meant for a dead engine reaches its
successor.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import msgspec

from tureen.config import EngineConfig
from tureen.engine.core_channel import ChannelClosed, ClientChannel, channel_pair
from tureen.engine.core_messages import (
    AbortRequests,
    EngineCoreRequest,
    EngineFailed,
    EngineInfo,
    EngineReady,
    Shutdown,
    StepOutputs,
)
from tureen.engine.input_processor import InputLimits, InputProcessor
from tureen.engine.output_stream import OutputStream
from tureen.engine.protocol import EngineStats
from tureen.errors import (ConfigError, EngineDeadError, EngineStepError, InvalidRequestError, ModelLoadError,
                           UnsupportedArchitectureError)
from tureen.outputs import RequestOutput
from tureen.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("tureen.engine")

# Start-up failures the engine process reports by name, re-raised here as the same typed error.
_STARTUP_ERRORS = {cls.__name__: cls for cls in (ConfigError, ModelLoadError, UnsupportedArchitectureError)}
COUNTERS = ("prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "prompt_tokens", "generation_tokens")
POLL_S = 0.05  # the reader thread's poll interval: how soon a dead process is noticed
WARMUP_PROMPT = "warm up"
WARMUP_TOKENS = 2


@dataclass
class WatchdogConfig:
    stall_timeout: float = 30.0  # no message from the engine for this long: a stall
    max_restarts: int = 3  # restarts allowed within restart_window before giving up
    restart_window: float = 300.0
    startup_timeout: float = 900.0  # loading the model may take long
    shutdown_timeout: float = 10.0


@dataclass
class _LoopReader:
    """An event loop that reads an engine's channel (``add_reader`` on its socket)."""

    loop: asyncio.AbstractEventLoop
    engine: "_Engine"
    fd: int


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: OutputStream
    prompt: str | None
    prompt_token_ids: list[int]  # not sent back by the engine with every output: restored here


class _Engine:
    """One engine-core process and our end of its channel."""

    def __init__(self, config: EngineConfig, log_level: str) -> None:
        ours, theirs = channel_pair()
        cmd = [sys.executable, "-m", "tureen.engine.core", "--config-json", msgspec.json.encode(config).decode(),
               "--channel-fd", str(theirs.fileno()), "--parent-pid", str(os.getpid()), "--log-level", log_level]
        try:
            # A session of its own: a terminal's Ctrl-C reaches the server, which then stops the engine.
            self.proc = subprocess.Popen(cmd, start_new_session=True, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()  # the child holds it now; our copy would hide the child's exit from us
        self.channel = ClientChannel(ours)
        self.closed = False  # the engine's end of the channel is closed: the process is gone
        self._received: collections.deque[Any] = collections.deque()
        self.last_message = time.monotonic()
        self.baseline: dict[str, int] = {}  # the engine's counters after its warm-up
        self.info: EngineInfo | None = None

    def recv(self, timeout_s: float) -> Any | None:
        """The next message, or None when none came within ``timeout_s`` or the channel is closed."""
        if not self._received and not self.closed:
            try:
                self._received.extend(self.channel.receive(timeout_s))
            except ChannelClosed:
                self.closed = True
        if self._received:
            self.last_message = time.monotonic()
            return self._received.popleft()
        if self.closed:  # nothing more will come: wait as long as a receive would have, never spin
            if self.proc.poll() is None:
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(timeout_s)
        return None

    def take_received(self) -> list[Any]:
        """Messages a ``recv`` read but has not returned yet."""
        out = list(self._received)
        self._received.clear()
        return out

    def send(self, message: Any) -> None:
        try:
            self.channel.send(message)
        except ChannelClosed:  # the engine is gone: the reader sees the end of file and recovers
            pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.channel.close()


class EngineCoreClient:
    def __init__(self, config: EngineConfig, watchdog: WatchdogConfig | None = None, log_level: str = "info") -> None:
        self.config = config
        self.watchdog = watchdog or WatchdogConfig()
        self.log_level = log_level
        self._generation = 0
        self._send_lock = threading.Lock()  # guards swapping self._engine against a send to it
        self._lock = threading.Lock()  # guards _streams
        # One reader of the channel at a time (an event loop or the watchdog thread), delivering in order.
        self._read_lock = threading.Lock()
        self._loop_reader: _LoopReader | None = None
        self._wake = threading.Event()  # the watchdog's sleep, cut short when a loop reader sees the end of file
        # Batches queued on each loop with call_soon_threadsafe and not yet put: while a loop has
        # any, its own reads queue behind them, so no stream sees a later step before an earlier one.
        self._queued: dict[asyncio.AbstractEventLoop, int] = {}
        self._checker: Any = None  # a StructuredOutputManager for validating constraints, built on first use
        self._checker_lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._restarts: collections.deque[float] = collections.deque()
        self._num_restarts = 0
        self._stopping = False  # shutdown has begun: no more restarts
        self._closing = False  # the reader thread should exit
        self._engine: _Engine | None = None
        self._dead_reason: str | None = None
        self._stats = EngineStats()
        self._latest: tuple[EngineStats, float] | None = None  # the engine's last snapshot and when it came, not folded in
        self._carried: dict[str, int] = {}  # counters of engine processes that are gone
        atexit.register(self._kill_quietly)
        self._engine = self._start_engine()  # raises the engine's own start-up error
        self._init_from(self._engine.info)
        self._reader = threading.Thread(target=self._read_forever, name="tureen-engine-reader", daemon=True)
        self._reader.start()

    @classmethod
    def from_config(cls, config: EngineConfig, **kwargs: Any) -> "EngineCoreClient":
        return cls(config, **kwargs)

    def _init_from(self, info: EngineInfo) -> None:
        from tureen.tokenizer import Tokenizer

        self.info = info
        self.model_name, self.max_model_len, self.is_demo_model = info.model_name, info.max_model_len, info.is_demo_model
        self.tokenizer = Tokenizer.from_pretrained(info.checkpoint_dir, chat_template=self.config.model.chat_template)
        self.processor = InputProcessor(self.tokenizer, InputLimits(info.vocab_size, info.max_model_len,
                                                                    info.num_kv_blocks, info.block_size))
        self._stats = EngineStats(num_blocks=info.num_kv_blocks, block_size=info.block_size,
                                  heartbeat=time.monotonic())

    # ---- EngineClient ----------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        max_tokens = self.processor.validate(prompt_token_ids, params)
        if params.max_tokens is None:
            params.max_tokens = max_tokens

    async def check_structured_outputs(self, params: SamplingParams) -> None:
        """Compile the constraint here, in a worker thread, so a bad one is a 400 before anything is queued.

        The engine core compiles it again for its own matcher (cached there by the same key): a
        compiled grammar holds native state that does not cross the process boundary.
        """
        if params.structured_outputs is not None:
            await asyncio.to_thread(self._structured_checker().check, params.structured_outputs)

    def _structured_checker(self) -> Any:
        with self._checker_lock:
            if self._checker is None:
                from tureen.executor.structured import StructuredOutputManager

                self._checker = StructuredOutputManager(self.config.structured_outputs, self.tokenizer,
                                                        self.info.logits_size or self.info.vocab_size)
            return self._checker

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str, *,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        if not self._stats.is_alive:
            raise EngineDeadError(f"the engine is not running ({self._dead_reason or 'restarting'}); retry shortly")
        core = self.processor.process(request_id, prompt, params, priority=priority)
        stream = OutputStream(coalesce=core.params.output_kind == RequestOutputKind.DELTA)
        with self._lock:
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
            loop = asyncio.get_running_loop()
            self._streams[request_id] = _Stream(loop, stream, core.prompt, core.prompt_token_ids)
        finished = False
        try:
            if not self._stats.is_alive:  # the engine failed between the check above and registering
                raise EngineDeadError("the engine is restarting; retry shortly")
            self._read_in(loop)
            self._send(core)
            while True:
                item = await stream.get()  # raises the request's error
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:  # the consumer left (disconnect, timeout): the engine frees its blocks next step
                self._send(AbortRequests([request_id]))

    async def abort(self, request_id: str) -> None:
        self._send(AbortRequests([request_id]))

    def stats(self) -> EngineStats:
        return self._fold()

    def _fold(self) -> EngineStats:
        """The stats, with the engine's latest snapshot folded in: once when asked, not on every step."""
        latest, self._latest = self._latest, None
        if latest is not None:
            stats, heartbeat = latest
            self._stats = replace(stats, heartbeat=heartbeat, is_alive=True, engine_restarts=self._num_restarts,
                                  **self._counters(stats))
        return self._stats

    @property
    def is_alive(self) -> bool:
        """False once the engine is gone for good; a restart in progress still counts as alive."""
        return self._dead_reason is None and not self._stopping

    @property
    def engine_pid(self) -> int | None:
        engine = self._engine
        return None if engine is None else engine.proc.pid

    def shutdown(self, timeout: float | None = None) -> None:
        """Abort what is left, stop the engine process (killing it if it does not exit), release all."""
        if self._stopping:
            return
        self._stopping = True
        timeout = self.watchdog.shutdown_timeout if timeout is None else timeout
        engine = self._engine
        if engine is not None and engine.proc.poll() is None:
            self._send(Shutdown())  # the engine aborts what is left and reports it before exiting
            try:
                engine.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("the engine process did not exit in %.0f s; killing it", timeout)
        time.sleep(2 * POLL_S)  # let the reader deliver the engine's last outputs
        self._closing = True
        self._wake.set()
        self._reader.join(timeout=2.0)
        self._stop_loop_reading()
        if engine is not None:
            engine.kill()
            engine.close()
        self._fail_all(EngineDeadError("the server is shutting down"))
        self._stats = replace(self._fold(), is_alive=False)

    # ---- sending -----------------------------------------------------------------------------
    def _send(self, message: Any) -> None:
        with self._send_lock:
            engine = self._engine
            if engine is not None:  # none while restarting: the watchdog fails those requests
                engine.send(message)

    # ---- reader thread: outputs and the watchdog ---------------------------------------------
    def _read_forever(self) -> None:
        while not self._closing:
            try:
                failure = self._read_once()
            except Exception as exc:  # a broken channel is an engine failure, never a silent hang
                if self._closing:
                    return
                logger.exception("the engine channel failed")
                failure = f"the engine channel failed: {exc!r}"
            if failure is not None and not self._stopping:
                self._recover(failure)
                if self._dead_reason is not None:
                    return

    def _read_once(self) -> str | None:
        """Deliver what arrived within ``POLL_S`` (unless an event loop reads the channel), then
        check the engine; returns a failure or None."""
        engine = self._engine
        if self._loop_reads(engine):
            if engine.channel.has_pending:  # the loop reads; sends the socket could not take wait here
                engine.channel.flush_when_writable(POLL_S)
            else:
                self._wake.wait(POLL_S)
                self._wake.clear()
            if not engine.closed and engine.channel.wait_readable(0):
                engine.last_message = time.monotonic()  # unread data: the engine is alive, the loop busy
            return self._check(engine)
        if not engine.closed and engine.channel.wait_readable(POLL_S):
            with self._read_lock:
                if not self._loop_reads(engine):
                    self._receive(engine)
        elif engine.closed:
            engine.recv(POLL_S)  # waits for the process to exit, never spins
        return self._check(engine)

    def _loop_reads(self, engine: _Engine) -> bool:
        reader = self._loop_reader
        return reader is not None and reader.engine is engine and reader.loop.is_running()

    def _receive(self, engine: _Engine, here: asyncio.AbstractEventLoop | None = None) -> None:
        """Read and deliver what the channel holds now (under ``_read_lock``)."""
        messages = engine.take_received()  # what a start-up wait read past its own message
        try:
            messages += engine.channel.receive_ready()
        except ChannelClosed:
            engine.closed = True
            self._wake.set()
        if messages:
            engine.last_message = time.monotonic()
        for message in messages:
            self._on_message(message, here)

    # ---- an event loop reads the channel --------------------------------------------------------
    def _read_in(self, loop: asyncio.AbstractEventLoop) -> None:
        """From now on ``loop`` (the caller's, running) reads the channel, unless a running loop already does."""
        reader = self._loop_reader
        if reader is not None and reader.loop is loop and reader.engine is self._engine:
            return
        with self._read_lock:
            engine, reader = self._engine, self._loop_reader
            if engine is None or engine.closed or (reader is not None and reader.engine is engine
                                                   and reader.loop.is_running()):
                return
            if reader is not None and not reader.loop.is_closed() and not reader.loop.is_running():
                reader.loop.remove_reader(reader.fd)  # a stopped loop: nothing runs there to race with
            fd = engine.channel.sock.fileno()
            loop.remove_reader(fd)  # a stale registration of this descriptor number (an engine before)
            loop.add_reader(fd, self._on_readable, engine, loop)
            self._loop_reader = _LoopReader(loop, engine, fd)

    def _on_readable(self, engine: _Engine, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop's callback: one read, decoded and put into the streams right here.
        (``loop`` is the one it was registered on, passed in: asking asyncio costs a getpid().)"""
        with self._read_lock:
            reader = self._loop_reader
            if reader is None or reader.engine is not engine or reader.loop is not loop:
                loop.remove_reader(engine.channel.sock.fileno())  # stale: another reader took over
                return
            self._receive(engine, here=loop)
            if engine.closed:
                loop.remove_reader(reader.fd)
                self._loop_reader = None

    def _stop_loop_reading(self) -> None:
        """Take the channel back from the event loop (before its socket is closed): the loop drops
        the descriptor, so a later socket with the same number is registered afresh."""
        with self._read_lock:
            reader, self._loop_reader = self._loop_reader, None
        if reader is None or reader.loop.is_closed():
            return
        if not reader.loop.is_running():
            reader.loop.remove_reader(reader.fd)
            return
        removed = threading.Event()

        def remove() -> None:
            reader.loop.remove_reader(reader.fd)
            removed.set()

        try:
            reader.loop.call_soon_threadsafe(remove)
        except RuntimeError:  # closed meanwhile
            return
        removed.wait(1.0)

    def _on_message(self, message: Any, here: asyncio.AbstractEventLoop | None = None) -> None:
        if not isinstance(message, StepOutputs):
            return
        self._latest = (message.stats, time.monotonic())
        if message.outputs:
            self._dispatch(message.outputs, here)

    def _counters(self, stats: EngineStats) -> dict[str, int]:
        """Cumulative counters that survive restarts and leave out the warm-up generations.

        Each engine process counts from zero; what earlier processes counted is carried over, and
        this process's counts at the end of its warm-up are subtracted (Prometheus counters must
        never go backwards, and a warm-up is no client's traffic)."""
        base = self._engine.baseline if self._engine is not None else {}
        return {name: self._carried.get(name, 0) + getattr(stats, name) - base.get(name, 0) for name in COUNTERS}

    def _dispatch(self, outputs: list[RequestOutput], here: asyncio.AbstractEventLoop | None = None) -> None:
        """Hand one step's outputs to their event loops: one call per loop, not one per token;
        streams of ``here`` (the loop running this) get theirs at once."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[OutputStream, Any]]] = {}
        with self._lock:
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target is not None:
                    out.prompt, out.prompt_token_ids = target.prompt, target.prompt_token_ids
                    item = out if out.error is None else EngineStepError(out.error)
                    by_loop.setdefault(target.loop, []).append((target.queue, item))
        for loop, items in by_loop.items():
            if loop is here and not self._queued.get(loop):
                _put_all(items)
            else:  # another loop, or this one still has earlier batches queued: keep the order
                self._schedule(loop, items)

    def _schedule(self, loop: asyncio.AbstractEventLoop, items: list[tuple[OutputStream, Any]]) -> None:
        """Queue a batch on ``loop`` from any thread, counted until it is put (see ``_dispatch``)."""
        with self._lock:
            self._queued[loop] = self._queued.get(loop, 0) + 1
        try:
            loop.call_soon_threadsafe(self._put_queued, loop, items)
        except RuntimeError:  # that event loop is closed
            self._put_queued(loop, [])

    def _put_queued(self, loop: asyncio.AbstractEventLoop, items: list[tuple[OutputStream, Any]]) -> None:
        _put_all(items)
        with self._lock:
            left = self._queued.get(loop, 1) - 1
            if left > 0:
                self._queued[loop] = left
            else:
                self._queued.pop(loop, None)

    def _check(self, engine: _Engine) -> str | None:
        code = engine.proc.poll()
        if code is None and engine.closed:  # its end of the channel closed: it is exiting
            try:
                code = engine.proc.wait(self.watchdog.shutdown_timeout)
            except subprocess.TimeoutExpired:
                return "the engine process closed its channel"
        if code is not None:
            return f"the engine process exited with code {code}"
        silent = time.monotonic() - engine.last_message
        if silent > self.watchdog.stall_timeout:
            return f"the engine sent nothing for {silent:.1f} s (watchdog limit {self.watchdog.stall_timeout:g} s)"
        return None

    def _recover(self, failure: str) -> None:
        logger.error("%s: failing its in-flight requests and restarting it", failure)
        self._stats = replace(self._fold(), is_alive=False, num_running=0, num_waiting=0, kv_cache_usage=0.0)
        self._carried = {name: getattr(self._stats, name) for name in COUNTERS}
        self._retire_engine()
        self._latest = None  # a snapshot that came in meanwhile is the dead engine's
        self._fail_all(EngineDeadError(f"the engine failed while serving this request ({failure}); retry it"))
        while not self._stopping:
            now = time.monotonic()
            while self._restarts and now - self._restarts[0] > self.watchdog.restart_window:
                self._restarts.popleft()
            if len(self._restarts) >= self.watchdog.max_restarts:
                self._dead_reason = (f"{len(self._restarts)} restarts within {self.watchdog.restart_window:g} s; "
                                     "giving up")
                logger.critical("the engine keeps failing (%s): staying unhealthy", self._dead_reason)
                return
            self._restarts.append(now)
            self._num_restarts += 1
            try:
                engine = self._start_engine()
            except Exception as exc:
                logger.error("engine restart %d failed: %s", self._num_restarts, exc)
                continue
            with self._send_lock:
                self._engine = engine
            self._stats = replace(self._stats, is_alive=True, heartbeat=time.monotonic(),
                                  engine_restarts=self._num_restarts)
            logger.warning("the engine is back after restart %d (pid %d)", self._num_restarts, engine.proc.pid)
            return

    def _retire_engine(self) -> None:
        self._stop_loop_reading()
        with self._send_lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.kill()
            engine.close()

    def _fail_all(self, exc: BaseException) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[OutputStream, Any]]] = {}
        with self._lock:
            for target in self._streams.values():
                by_loop.setdefault(target.loop, []).append((target.queue, exc))
        for loop, items in by_loop.items():
            self._schedule(loop, items)

    # ---- starting an engine process ----------------------------------------------------------
    def _start_engine(self) -> _Engine:
        """Spawn, wait for EngineReady, then warm up with a real generation; raises on failure."""
        self._generation += 1
        engine = _Engine(self.config, self.log_level)
        try:
            engine.info = self._await_ready(engine)
            self._warm_up(engine)
        except BaseException:
            engine.kill()
            engine.close()
            raise
        return engine

    def _await_ready(self, engine: _Engine) -> EngineInfo:
        deadline = time.monotonic() + self.watchdog.startup_timeout
        while time.monotonic() < deadline:
            message = engine.recv(POLL_S)
            if isinstance(message, EngineReady):
                return message.info
            if isinstance(message, EngineFailed):
                raise _STARTUP_ERRORS.get(message.kind, EngineDeadError)(message.message)
            if engine.proc.poll() is not None:
                raise EngineDeadError(f"the engine process exited with code {engine.proc.returncode} while starting")
        raise EngineDeadError(f"the engine did not start within {self.watchdog.startup_timeout:g} s")

    def _warm_up(self, engine: _Engine) -> None:
        """A real greedy generation through the channel before the engine is reported healthy."""
        from tureen.tokenizer import Tokenizer

        tokenizer = getattr(self, "tokenizer", None) or Tokenizer.from_pretrained(
            engine.info.checkpoint_dir, chat_template=self.config.model.chat_template)
        ids = tokenizer.encode(WARMUP_PROMPT, add_special_tokens=False) or [0]
        params = SamplingParams(temperature=0.0, max_tokens=WARMUP_TOKENS, ignore_eos=True,
                                output_kind=RequestOutputKind.FINAL_ONLY, eos_token_ids=list(tokenizer.eos_token_ids))
        request_id = f"warmup-{self._generation}"
        engine.send(EngineCoreRequest(request_id, None, ids, params, 0, time.time()))
        deadline = time.monotonic() + self.watchdog.startup_timeout
        while time.monotonic() < deadline:
            message = engine.recv(POLL_S)
            if isinstance(message, StepOutputs):
                for out in message.outputs:
                    if out.request_id == request_id and out.finished:
                        if out.error is not None or not out.outputs or not out.outputs[0].token_ids:
                            raise EngineDeadError(f"the engine's warm-up generation failed: {out.error}")
                        engine.baseline = {name: getattr(message.stats, name) for name in COUNTERS}
                        return
            if engine.proc.poll() is not None:
                raise EngineDeadError(f"the engine process exited with code {engine.proc.returncode} in warm-up")
        raise EngineDeadError("the engine's warm-up generation did not finish in time")

    def _kill_quietly(self) -> None:
        engine = self._engine
        if engine is not None and engine.proc.poll() is None:
            engine.proc.kill()


def _put_all(items: list[tuple[OutputStream, Any]]) -> None:
    for stream, item in items:
        stream.put_nowait(item)
