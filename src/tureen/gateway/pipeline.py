"""The gateway's request pipeline: ordered steps around the upstream call.

Each request gets one ``RequestContext``. The app runs ``before`` of every step in order; a step may
answer early by returning a ``Response`` (a 401, a 429, a cache hit). Then the app routes and calls
the upstream (with retries and fallbacks), and once the response or stream has ended it runs
``after`` of every step that passed ``before``, in reverse order, with ``usage``, ``status``,
``deployment`` and ``cost`` filled in. Between the two, a step may still refuse a request whose
upstream has answered, before the client sees a byte of it (an optional ``before_response``). A new
concern (caches, prompt rendering) is a new step, not an ``if`` in the handler.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from starlette.requests import Request
from starlette.responses import Response

logger = logging.getLogger("tureen.gateway")

Endpoint = Literal["chat", "completions"]


@dataclass
class Principal:
    """Who is calling, set by the auth step. It never holds the raw key."""

    key_hash: str | None  # sha256 hex of the key (None when keys are not required)
    key_alias: str | None
    team_id: str | None
    allowed_models: frozenset[str] | None  # None = every model
    metadata: dict = field(default_factory=dict)

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


@dataclass
class RequestContext:
    """Everything one request carries through the pipeline."""

    request: Request
    endpoint: Endpoint
    body: dict  # the parsed JSON body; steps may rewrite it (prompt rendering)
    model: str  # public model name from the body
    stream: bool
    principal: Principal | None = None
    prompt_tokens: int | None = None  # counted (tokenizer or estimate) by the limits step
    max_tokens: int | None = None
    cache_salt: str | None = None  # the tenant's salt, sent to deployments that accept it (tenant_salt.py)
    response_headers: dict[str, str] = field(default_factory=dict)  # added to the final response
    deployment: str | None = None  # id of the deployment that answered
    served_model: str | None = None  # public model that answered (differs from ``model`` after a fallback)
    usage: dict | None = None  # OpenAI usage of the finished response (body, or the last stream chunk)
    cost: float | None = None
    status: int | None = None  # final HTTP status sent to the client
    retries: int = 0
    fallbacks: int = 0
    capture_body: bool = False  # a step sets this in before() when its after() needs the response bytes
    response_body: bytes | None = None  # the complete response bytes, when captured and the response completed
    upstream_seconds: float | None = None  # time spent waiting on upstreams (connect to last byte)
    error: str | None = None  # short reason when the request failed (no prompt text, no key)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.perf_counter)
    state: dict = field(default_factory=dict)  # per-step scratch space, keyed by step name


@runtime_checkable
class Step(Protocol):
    name: str

    async def before(self, ctx: RequestContext) -> Response | None:
        """Inspect or rewrite the request; return a Response to answer early."""
        ...

    async def after(self, ctx: RequestContext) -> None:
        """Runs once per request whose before() returned None, after the response ended (also on error)."""
        ...


class Pipeline:
    """Runs steps' ``before`` in order and ``after`` in reverse; ``after`` never raises into a request."""

    def __init__(self, steps: Sequence[Step], on_step_error: Callable[[str, str], None] | None = None) -> None:
        self.steps = list(steps)
        self._on_step_error = on_step_error or (lambda step, phase: None)

    def insert(self, index: int, step: Step) -> None:
        self.steps.insert(index, step)

    async def before(self, ctx: RequestContext) -> Response | None:
        passed: list[Step] = ctx.state.setdefault("pipeline.passed", [])
        for step in self.steps:
            answer = await step.before(ctx)
            if answer is not None:
                return answer
            passed.append(step)
        return None

    async def before_response(self, ctx: RequestContext) -> Response | None:
        """The first refusal by a passed step's optional ``before_response(ctx) -> Response | None``
        (run once the upstream has answered, before the client sees a byte), or None: send the answer."""
        for step in ctx.state.get("pipeline.passed", []):
            gate = getattr(step, "before_response", None)
            if gate is not None and (answer := await gate(ctx)) is not None:
                return answer
        return None

    async def after(self, ctx: RequestContext) -> None:
        passed: list[Step] = ctx.state.pop("pipeline.passed", [])
        for step in reversed(passed):
            try:
                await step.after(ctx)
            except Exception:  # a failing after() is logged and counted, never raised into the request
                logger.exception("gateway step %s failed in after()", step.name)
                self._on_step_error(step.name, "after")
