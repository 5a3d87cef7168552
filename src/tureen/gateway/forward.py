"""Calling the upstream: one attempt, retries on other deployments, fallbacks to other models.

An attempt fails *before the first byte reaches the client* in one of these ways, and only then is
it retried: a connection error, a timeout, or a 429/502/503/504 answer. A non-streaming response
is read in full before it is sent, so an upstream that dies mid-body is retried too; a stream is
committed once its first chunk arrived. After that a failure is never retried: the stream ends
with an SSE error event and ``[DONE]`` (see ``RelayResponse``).

Retries wait an exponential backoff with full jitter; a deployment that answered 429/503 with
``Retry-After`` is skipped until then (or waited for when it is the only one). Retries stop at
``num_retries`` or ``retry.max_total_s``. Then ``fallbacks`` (any failure but a client error) or
``context_window_fallbacks`` (the upstream said ``context_length_exceeded`` or "maximum context
length") move the request to the next model.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

from starlette.responses import Response

from tureen.gateway.config import GatewayConfig
from tureen.gateway.metrics import GatewayMetrics
from tureen.gateway.pipeline import RequestContext
from tureen.gateway.relay import RelayResponse, usage_of
from tureen.gateway.routing import NoDeployment, Router
from tureen.gateway.upstream import Deployment, UpstreamClient, UpstreamError, UpstreamResponse, UpstreamTimeout
from tureen.server.errors import UNAVAILABLE, APIError

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
# The upstream refused the gateway's own credentials (api_key): the deployment's fault, not the request's.
CREDENTIAL_STATUS = frozenset({401, 403})
CONTEXT_PHRASE = "maximum context length"
PATHS = {"chat": "/chat/completions", "completions": "/completions"}
LARGE_BODY_BYTES = 1 << 20  # bodies above this are parsed and encoded in a worker thread


@dataclass
class AttemptFailed(Exception):
    """One upstream attempt failed before any byte was sent to the client."""

    deployment: Deployment
    reason: str  # "connect", "timeout", "status_503", ...
    status: int | None = None
    body: bytes | None = None
    retry_after: float | None = None
    context_window: bool = False

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status in RETRYABLE_STATUS or self.status in CREDENTIAL_STATUS

    @property
    def client_error(self) -> bool:  # the request's fault: no retry, no fallback (but a context-window one)
        return (self.status is not None and 400 <= self.status < 500 and self.status != 429
                and self.status not in CREDENTIAL_STATUS)


class Forwarder:
    def __init__(self, config: GatewayConfig, router: Router, client: UpstreamClient, metrics: GatewayMetrics) -> None:
        self.config, self.router, self.client, self.metrics = config, router, client, metrics
        self.retry = config.tureen_settings.retry

    async def __call__(self, ctx: RequestContext) -> Response:
        tried = [ctx.model]
        model = ctx.model
        while True:
            try:
                return await self._with_retries(ctx, model)
            except (AttemptFailed, NoDeployment) as failure:
                nxt = self._fallback(ctx, failure, tried)
                if nxt is None:
                    return self._error(ctx, failure)
                kind = "context_window_fallbacks" if getattr(failure, "context_window", False) else "fallbacks"
            self.metrics.fallbacks.labels(ctx.model, nxt, kind).inc()
            ctx.fallbacks += 1
            tried.append(nxt)
            model = nxt

    def _fallback(self, ctx: RequestContext, failure: Exception, tried: list[str]) -> str | None:
        context_window = isinstance(failure, AttemptFailed) and failure.context_window
        if isinstance(failure, AttemptFailed) and failure.client_error and not context_window:
            return None
        options = self.config.fallbacks_for(ctx.model, context_window=True) if context_window else []
        options += self.config.fallbacks_for(ctx.model)
        allowed = ctx.principal.may_use if ctx.principal is not None else (lambda model: True)
        return next((m for m in options if m not in tried and self.router.group(m) and allowed(m)), None)

    async def _with_retries(self, ctx: RequestContext, model: str) -> Response:
        exclude: set[str] = set()
        deadline = ctx.started + self.retry.max_total_s
        last: AttemptFailed | None = None
        for attempt in range(self.config.num_retries + 1):
            try:
                deployment = self.router.pick(model, ctx, exclude)
            except NoDeployment:
                if last is not None:
                    raise last from None
                raise
            try:
                return await self._attempt(ctx, deployment, model)
            except AttemptFailed as failure:
                last = failure
                if not failure.retryable or attempt == self.config.num_retries:
                    raise
                delay = self._backoff(attempt, failure, model, exclude)
                if time.perf_counter() + delay > deadline:
                    raise
                self.metrics.retries.labels(ctx.model, failure.reason).inc()
                ctx.retries += 1
                ctx.state["gateway.backoff_s"] = ctx.state.get("gateway.backoff_s", 0.0) + delay
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, failure: AttemptFailed, model: str, exclude: set[str]) -> float:
        """Exclude the failed deployment (if another exists) and return the jittered delay."""
        failed = failure.deployment
        group = self.router.group(model) or []
        exclude.add(failed.id)
        if all(d.id in exclude for d in group):  # every one failed once: start over, but not on the last one
            exclude.clear()
            if len(group) > 1:
                exclude.add(failed.id)
        delay = random.uniform(0, min(self.retry.backoff_max_s, self.retry.backoff_base_s * 2 ** attempt))
        others = any(d.id not in exclude and d.routable() and not d.shedding() for d in group)
        if not others and failure.retry_after:
            delay = max(delay, failure.retry_after)
        return delay

    # ---- one attempt -------------------------------------------------------------------------
    async def _attempt(self, ctx: RequestContext, d: Deployment, model: str) -> Response:
        content, strip_usage = await self._upstream_body(ctx, d, model)
        d.inflight += 1
        d.requests += 1
        window_entry = d.count_request((ctx.prompt_tokens or 0) + (ctx.max_tokens or 0))
        ctx.state["gateway.window_entry"] = window_entry
        self.metrics.inflight.labels(d.id).inc()
        sent = time.perf_counter()
        handed_over = False
        try:
            upstream = await self._open(d, content, ctx)
            if upstream.status_code >= 400:
                raise await self._failed_status(d, upstream)
            if ctx.stream:
                response = await self._stream(ctx, d, upstream, sent, strip_usage)
                handed_over = True  # the relay releases the deployment when the stream ends
                return response
            return await self._whole(ctx, d, upstream, sent)
        except AttemptFailed:
            ctx.state["gateway.upstream_wait_s"] = ctx.state.get("gateway.upstream_wait_s", 0.0) + time.perf_counter() - sent
            raise
        except asyncio.CancelledError:  # the client went away: no verdict on the deployment
            d.breaker.release()
            raise
        finally:
            if not handed_over:
                self._release(d, ctx, sent)

    async def _upstream_body(self, ctx: RequestContext, d: Deployment, model: str) -> tuple[bytes, bool]:
        body = dict(ctx.body)
        body["model"] = d.model_for(model)
        if ctx.cache_salt is not None and d.accepts_cache_salt:
            body["cache_salt"] = ctx.cache_salt
        strip_usage = False
        if ctx.stream:  # usage is needed for limits and spend; the client sees it only if it asked
            options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
            strip_usage = not options.get("include_usage")
            body["stream_options"] = {**options, "include_usage": True}
        # ASCII JSON: any string the client sent, lone surrogates included, encodes.
        if ctx.state.get("gateway.body_bytes", 0) > LARGE_BODY_BYTES:  # a big body is encoded off the event loop
            return (await asyncio.to_thread(_encode, body)), strip_usage
        return _encode(body), strip_usage

    async def _open(self, d: Deployment, content: bytes, ctx: RequestContext) -> UpstreamResponse:
        try:
            return await self.client.open(d, PATHS[ctx.endpoint], content, ctx.stream)
        except UpstreamError as exc:
            self._failure(d)
            raise AttemptFailed(d, _reason(exc)) from None

    async def _failed_status(self, d: Deployment, upstream: UpstreamResponse) -> AttemptFailed:
        try:
            body = await upstream.aread()
        except UpstreamError:
            body = b""
        finally:
            await upstream.aclose()
        status = upstream.status_code
        retry_after = _retry_after(upstream.headers.get("retry-after"))
        if status in (429, 503) and retry_after:
            d.shedding_until = time.monotonic() + retry_after
        if status >= 500 or status in CREDENTIAL_STATUS:
            self._failure(d)
        else:
            d.breaker.release()
        return AttemptFailed(d, f"status_{status}", status, body, retry_after, context_window=_is_context(status, body))

    async def _whole(self, ctx: RequestContext, d: Deployment, upstream: UpstreamResponse, sent: float) -> Response:
        try:
            data = await upstream.aread()
        except UpstreamError as exc:
            self._failure(d)
            raise AttemptFailed(d, _reason(exc)) from None
        finally:
            await upstream.aclose()
        d.breaker.record_success()
        self._answered(ctx, d, upstream.status_code, sent)
        ctx.usage = usage_of(data)
        if ctx.capture_body:
            ctx.response_body = data
        media_type = upstream.headers.get("content-type", "application/json")
        return Response(data, upstream.status_code, media_type=media_type)

    async def _stream(self, ctx: RequestContext, d: Deployment, upstream: UpstreamResponse, sent: float,
                      strip_usage: bool) -> Response:
        try:
            first = await upstream.next_chunk()
        except UpstreamError as exc:
            first, reason = b"", _reason(exc)
        else:
            reason = "connect"  # an empty body: the upstream closed before its first byte
        if not first:
            await upstream.aclose()
            self._failure(d)
            raise AttemptFailed(d, reason)
        self._answered(ctx, d, upstream.status_code, sent)
        return RelayResponse(ctx, upstream, first, strip_usage,
                             on_end=lambda ok: self._stream_ended(ctx, d, sent, ok))

    def _stream_ended(self, ctx: RequestContext, d: Deployment, sent: float, ok: bool | None) -> None:
        if ok is True:
            d.breaker.record_success()
        elif ok is False:
            self._failure(d)
            self.metrics.midstream_errors.labels(d.id).inc()
        else:  # the client went away: no verdict on the deployment
            d.breaker.release()
        self._release(d, ctx, sent)

    def _answered(self, ctx: RequestContext, d: Deployment, status: int, sent: float) -> None:
        now = time.perf_counter()
        ctx.deployment, ctx.served_model, ctx.status = d.id, d.model_name if d.model_name != "*" else ctx.model, status
        ctx.state["gateway.upstream_wait_s"] = ctx.state.get("gateway.upstream_wait_s", 0.0) + now - sent
        self.metrics.upstream_ttfb.labels(d.id).observe(now - sent)

    def _release(self, d: Deployment, ctx: RequestContext, sent: float) -> None:
        d.inflight -= 1
        self.metrics.inflight.labels(d.id).dec()
        spent = time.perf_counter() - sent
        ctx.upstream_seconds = (ctx.upstream_seconds or 0.0) + spent
        self.metrics.upstream_latency.labels(d.id).observe(spent)
        if ctx.deployment == d.id and ctx.usage is not None:
            ctx.cost = d.cost(ctx.usage)
            entry = ctx.state.get("gateway.window_entry")
            if entry is not None:  # the tpm window counts what the request really used
                entry[1] = ctx.usage.get("total_tokens") or entry[1]

    def _failure(self, d: Deployment) -> None:
        d.breaker.record_failure()

    # ---- the answer when every attempt failed -------------------------------------------------
    def _error(self, ctx: RequestContext, failure: Exception) -> Response:
        if isinstance(failure, NoDeployment):
            ctx.error = failure.reason
            error = APIError(503, f"No deployment can take the request: {failure.reason}.", UNAVAILABLE,
                             code="no_healthy_deployment", retry_after=failure.retry_after)
            ctx.status = 503
            return error.response()
        assert isinstance(failure, AttemptFailed)
        ctx.deployment, ctx.error = failure.deployment.id, failure.reason
        if failure.status in CREDENTIAL_STATUS:
            ctx.status = 502
            return APIError(502, f"The upstream deployment '{failure.deployment.id}' refused the gateway's "
                                 f"credentials (HTTP {failure.status}); check its api_key.", UNAVAILABLE,
                            code="upstream_auth_error").response()
        if failure.status is not None and _is_openai_error(failure.body):
            ctx.status = failure.status
            headers = {"Retry-After": str(max(1, round(failure.retry_after)))} if failure.retry_after else None
            return Response(failure.body, failure.status, headers=headers, media_type="application/json")
        error = _wrap(failure)
        ctx.status = error.status
        return error.response()


def _encode(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _reason(exc: BaseException) -> str:
    return "timeout" if isinstance(exc, UpstreamTimeout) else "connect"


def _wrap(failure: AttemptFailed) -> APIError:
    where = f"the upstream deployment '{failure.deployment.id}'"
    if failure.reason == "timeout":
        return APIError(504, f"Timed out waiting for {where}.", "timeout_error", code="upstream_timeout")
    if failure.status is None:
        return APIError(502, f"Could not connect to {where}.", UNAVAILABLE, code="upstream_unreachable",
                        retry_after=1.0)
    status = failure.status if failure.status in RETRYABLE_STATUS or failure.status < 500 else 502
    text = (failure.body or b"")[:200].decode("utf-8", "replace").strip()
    return APIError(status, f"{where} answered HTTP {failure.status}: {text}", UNAVAILABLE if status >= 500 else
                    "invalid_request_error", code="upstream_error", retry_after=failure.retry_after)


def _is_openai_error(body: bytes | None) -> bool:
    try:
        data = json.loads(body or b"")
    except ValueError:
        return False
    return isinstance(data, dict) and isinstance(data.get("error"), dict) and "message" in data["error"]


def _is_context(status: int, body: bytes | None) -> bool:
    if status != 400 or not body:
        return False
    text = body.decode("utf-8", "replace")
    return "context_length_exceeded" in text or CONTEXT_PHRASE in text.lower()


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare from LLM servers; fall back to backoff
