"""The engine's structured-output manager: compiles constraints off the step's critical path,
caches them by hash, and builds each step's token bitmask.

Compilation runs in a small thread pool as soon as a request arrives (xgrammar releases the GIL
while it compiles), so the engine keeps stepping other requests meanwhile; equal constraints
(same ``StructuredOutputsParams.key()``) share one compiled grammar and one compilation. The
matcher state lives on each engine Request (``Request.grammar``) and advances in the scheduler.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from tureen.config import StructuredOutputsConfig
from tureen.engine.messages import SchedulerOutput, TokenBitmask
from tureen.engine.request import Request
from tureen.errors import ConfigError
from tureen.sampling_params import StructuredOutputsParams
from tureen.tokenizer import Tokenizer

logger = logging.getLogger("tureen.structured")


def make_backend(name: str, tokenizer: Tokenizer, vocab_size: int, max_threads: int) -> Any:
    if name in ("auto", "xgrammar"):
        try:
            from tureen.executor.structured.xgrammar_backend import XgrammarBackend
        except ImportError as exc:
            raise ConfigError(f"structured_outputs_backend={name!r} needs the xgrammar package: {exc}") from exc
        return XgrammarBackend(tokenizer, vocab_size, max_threads)
    raise ConfigError(f"unknown structured_outputs_backend {name!r}; choose auto or xgrammar")


class StructuredOutputManager:
    def __init__(self, config: StructuredOutputsConfig, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.config = config
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._backend: Any = None  # built on first use: the vocabulary scan costs start-up time
        self._backend_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=config.structured_outputs_compile_threads,
                                        thread_name_prefix="tureen-grammar")
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.compile_seconds_total = 0.0
        self.num_compiled = 0
        self.bitmask_seconds_total = 0.0  # engine-thread time spent filling step bitmasks

    def warm_up(self) -> None:
        """Build the backend (import, vocabulary scan) in the background now, not on the first request."""
        self._pool.submit(lambda: self.backend)

    @property
    def backend(self) -> Any:
        with self._backend_lock:
            if self._backend is None:
                self._backend = make_backend(self.config.structured_outputs_backend, self._tokenizer,
                                             self._vocab_size, self.config.structured_outputs_compile_threads)
            return self._backend

    # ---- compiling --------------------------------------------------------------------------
    def compile_async(self, spec: StructuredOutputsParams) -> Future:
        """A future of the compiled grammar; shared by every request with an equal constraint.

        A failed compilation stays cached too: the same bad schema fails fast the next time.
        """
        key = spec.key()
        with self._cache_lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[key] = future
            while len(self._cache) > self.config.structured_outputs_cache_size:
                self._cache.popitem(last=False)
            return future

    def check(self, spec: StructuredOutputsParams) -> None:
        """Compile now (or wait for the cached compilation); raise InvalidRequestError if it is bad."""
        self.compile_async(spec).result()

    def _compile(self, spec: StructuredOutputsParams) -> Any:
        start = time.perf_counter()
        compiled = self.backend.compile(spec)
        seconds = time.perf_counter() - start
        self.compile_seconds_total += seconds
        self.num_compiled += 1
        logger.debug("compiled a %s constraint in %.1f ms", spec.kind, seconds * 1e3)
        return compiled

    def new_grammar(self, compiled: Any) -> Any:
        return self.backend.new_grammar(compiled)

    # ---- one step ---------------------------------------------------------------------------
    def token_bitmask(self, sched: SchedulerOutput, requests: dict[str, Request]) -> TokenBitmask | None:
        """The step's mask over the sampling rows of constrained requests; None when there are none."""
        ids = [sr.req_id for sr in sched.requests
               if sr.sample and (req := requests.get(sr.req_id)) is not None and req.grammar is not None]
        if not ids:
            return None
        start = time.perf_counter()
        bitmask = self.backend.fill_bitmask([requests[i].grammar for i in ids])
        self.bitmask_seconds_total += time.perf_counter() - start
        return TokenBitmask(ids, bitmask)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
