"""``EngineClient``: what the HTTP server needs from an engine, and nothing more.

The server depends on this protocol, never on a concrete engine. Implementations: the
multiprocess client (``engine/core_client.py``, the engine core in its own process; what
``tureen serve`` uses), the in-process ``AsyncLLM`` (engine loop in a thread), and the scripted
fake the server tests use (``tests/fake_engine.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from tureen.engine.spec_decode.stats import SpecDecodingStats
from tureen.outputs import RequestOutput
from tureen.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tureen.config import EngineConfig
    from tureen.tokenizer import Tokenizer


@dataclass
class EngineStats:
    """A snapshot published by the engine after every iteration; read without locks."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_blocks: int = 0
    block_size: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    heartbeat: float = 0.0  # time.monotonic() of the loop's last iteration
    is_alive: bool = True
    engine_restarts: int = 0  # times the engine was restarted after a crash or a stall
    spec_decoding: SpecDecodingStats | None = None  # cumulative speculative-decoding counters, when on


@runtime_checkable
class EngineClient(Protocol):
    """Add a request and stream its outputs, abort it, read health and stats, shut down."""

    config: EngineConfig
    tokenizer: Tokenizer
    model_name: str
    max_model_len: int
    is_demo_model: bool

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise a typed ``InvalidRequestError`` unless the request can run; fills ``params.max_tokens``."""

    async def check_structured_outputs(self, params: SamplingParams) -> None:
        """Compile the request's output constraint off the event loop; ``InvalidRequestError`` names a bad one."""

    def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str, *,
                 priority: int = 0) -> AsyncIterator[RequestOutput]:
        """The request's outputs until it finishes; leaving the iterator early aborts the request."""

    async def abort(self, request_id: str) -> None:
        """Abort a request: its blocks are freed within one engine step."""

    def stats(self) -> EngineStats:
        """The latest published snapshot (fast: no engine call)."""

    @property
    def is_alive(self) -> bool:
        """False once the engine is gone for good (crashed past its restart budget, or shut down)."""

    def shutdown(self) -> None:
        """Stop the engine and free its resources (blocking)."""
