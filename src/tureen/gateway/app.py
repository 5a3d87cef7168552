"""The gateway's HTTP app: the two generation routes, /v1/models, /health, /metrics, the admin API.

The generation routes are plain ASGI endpoints (no request parsing beyond one ``json.loads``):
for each request a ``RequestContext`` goes through the policy's steps (auth, limits, and later
caches and prompts), then the ``Forwarder`` (routing, retries, fallbacks), then the steps' ``after``
in reverse, once the response or stream has ended. A watcher task cancels the request the moment
the client disconnects, which closes the upstream connection at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tureen.gateway import openapi as gateway_openapi
from tureen.gateway.cache.install import install as install_cache
from tureen.gateway.config import WILDCARD, GatewayConfig
from tureen.gateway.forward import LARGE_BODY_BYTES, Forwarder
from tureen.gateway.health import HealthMonitor
from tureen.gateway.logs import log_request
from tureen.gateway.metrics import GatewayMetrics
from tureen.gateway.pipeline import Endpoint, Pipeline, Principal, RequestContext
from tureen.gateway.prompt_step import install as install_prompts
from tureen.gateway.relay import discard
from tureen.gateway.routing import Router, build_strategy
from tureen.gateway.tenant_salt import install as install_tenant_salt
from tureen.gateway.upstream import UpstreamClient, build_deployments
from tureen.server.errors import UNAVAILABLE, APIError, install_error_handlers

logger = logging.getLogger("tureen.gateway")

OVERHEAD_HEADER = "x-tureen-overhead-duration-ms"
MAX_BODY_BYTES = 32 * 1024 * 1024
PolicyFactory = Callable[[GatewayConfig, CollectorRegistry], Awaitable[Any]]


class OpenPolicy:
    """No keys, no limits: the policy used when ``tureen.gateway.policy`` is not available."""

    def __init__(self) -> None:
        self.steps: list = []
        self.admin_router = APIRouter()

    async def authenticate(self, request: Request) -> Principal:
        return Principal(key_hash=None, key_alias=None, team_id=None, allowed_models=None, metadata={})

    async def aclose(self) -> None:
        return None


async def open_policy(config: GatewayConfig, registry: CollectorRegistry) -> OpenPolicy:
    return OpenPolicy()


async def default_policy(config: GatewayConfig, registry: CollectorRegistry) -> Any:
    try:
        from tureen.gateway.policy import build_policy
    except ModuleNotFoundError as exc:
        if exc.name != "tureen.gateway.policy":
            raise
        logger.warning("tureen.gateway.policy is not available: serving without keys or limits")
        return await open_policy(config, registry)
    return await build_policy(config, registry)


class GatewayState:
    """Draining and in-flight requests, in the shape ``tureen.server.runner.DrainingServer`` drives."""

    def __init__(self, drain_timeout_s: float) -> None:
        self.drain_timeout_s = drain_timeout_s
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.finishing: set[asyncio.Task] = set()

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    def begin_drain(self) -> None:
        if not self.draining:
            self.draining = True
            logger.info("draining: %d request(s) in flight; new requests get 503", self.inflight)

    async def drain(self) -> None:
        self.begin_drain()
        try:
            await asyncio.wait_for(self._idle.wait(), self.drain_timeout_s)
        except TimeoutError:
            logger.warning("drain timeout: %d request(s) still in flight are cut off", self.inflight)
        if self.finishing:
            await asyncio.wait(self.finishing, timeout=5)
        logger.info("drained")


class Gateway:
    """Everything one gateway process holds; built inside the server's event loop."""

    def __init__(self, config: GatewayConfig, registry: CollectorRegistry, policy: Any) -> None:
        self.config = config
        self.registry = registry
        self.policy = policy
        self.metrics = GatewayMetrics(registry, config.tureen_settings.metrics_label_by)
        self.state = GatewayState(config.tureen_settings.drain_timeout_s)
        self.client = UpstreamClient(config.tureen_settings.max_connections)
        self.deployments = build_deployments(config, self._breaker_changed)
        self.router = Router(self.deployments, build_strategy(config))
        self.forward = Forwarder(config, self.router, self.client, self.metrics)
        self.pipeline = Pipeline(policy.steps, lambda step, phase: self.metrics.step_errors.labels(step, phase).inc())
        self.monitor = HealthMonitor(self.deployments, self.client, config.tureen_settings.health_check,
                                     lambda d: self.metrics.healthy.labels(d.id).set(int(d.healthy)))
        for d in self.deployments:
            self.metrics.breaker_state.labels(d.id).set(0)
            self.metrics.healthy.labels(d.id).set(1)
            self.metrics.inflight.labels(d.id).set(0)

    def _breaker_changed(self, deployment_id: str, state) -> None:
        logger.warning("circuit breaker of %s is now %s", deployment_id, state.name.lower())
        self.metrics.breaker_state.labels(deployment_id).set(int(state))

    async def aclose(self) -> None:
        await self.monitor.aclose()
        await self.policy.aclose()
        await self.client.aclose()

    # ---- one request --------------------------------------------------------------------------
    async def serve(self, ctx: RequestContext, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        watch = DisconnectWatch(receive, task)
        self.state.enter()
        response: Response | None = None
        try:
            response = await self._respond(ctx, watch)
            if response is not None:
                self._decorate(ctx, response)
                await response(scope, receive, watch.guard(send))
        except asyncio.CancelledError:
            if not watch.cancelled:
                raise
            task.uncancel()
        finally:
            watch.close()
            if watch.cancelled or response is None:
                ctx.status, ctx.error = 499, "client disconnected"
                self.metrics.client_disconnects.labels(self._model_label(ctx.model)).inc()
            self.state.leave()
            self._finish_soon(ctx)

    async def _respond(self, ctx: RequestContext, watch: DisconnectWatch) -> Response | None:
        """The answer, or None when the client went away before the upstream call."""
        try:
            response = await self.pipeline.before(ctx)
            if response is not None:
                ctx.status = response.status_code
                return response
            if not watch.arm():
                return None
            answer = await self.forward(ctx)
            refusal = await self.pipeline.before_response(ctx)
            if refusal is None:
                return answer
            await discard(answer)  # the client never sees it: nothing of it is used or charged
            ctx.status, ctx.usage, ctx.response_body, ctx.cost = refusal.status_code, None, None, None
            return refusal
        except Exception as exc:  # a bug: answered as a 500 in the OpenAI shape, never a crash or a hang
            logger.exception("gateway request %s failed", ctx.request_id)
            ctx.status, ctx.error = 500, f"internal error: {type(exc).__name__}"
            return APIError(500, f"internal gateway error: {type(exc).__name__}", "internal_server_error").response()

    def _decorate(self, ctx: RequestContext, response: Response) -> None:
        waited = ctx.state.get("gateway.upstream_wait_s", 0.0) + ctx.state.get("gateway.backoff_s", 0.0)
        overhead = max(0.0, time.perf_counter() - ctx.started - waited)
        ctx.state["gateway.overhead_s"] = overhead
        self.metrics.overhead.observe(overhead)
        headers = response.headers
        for name, value in ctx.response_headers.items():
            headers[name] = value
        headers[OVERHEAD_HEADER] = f"{overhead * 1000:.3f}"

    def _finish_soon(self, ctx: RequestContext) -> None:
        task = asyncio.get_running_loop().create_task(self._finish(ctx))
        self.state.finishing.add(task)
        task.add_done_callback(self.state.finishing.discard)

    async def _finish(self, ctx: RequestContext) -> None:
        try:
            await self.pipeline.after(ctx)
        finally:
            labels = [self._model_label(ctx.model), ctx.deployment or "none", str(ctx.status)]
            self.metrics.requests.labels(*labels, *self.metrics.tenant(ctx)).inc()
            log_request(ctx, self.config.tureen_settings.log_prompts)

    def _model_label(self, model: str) -> str:
        return model if model in self.router.groups else WILDCARD if WILDCARD in self.router.groups else "unknown"

    def refuse(self, error: APIError, started: float, model: str | None = None) -> Response:
        """An answer before any pipeline step ran (bad JSON, unknown model, draining): all of it is overhead."""
        labels = [self._model_label(model) if model else "unknown", "none", str(error.status)]
        if self.metrics.label_by != "none":
            labels.append("")
        self.metrics.requests.labels(*labels).inc()
        response = error.response()
        overhead = time.perf_counter() - started
        self.metrics.overhead.observe(overhead)
        response.headers[OVERHEAD_HEADER] = f"{overhead * 1000:.3f}"
        return response


class DisconnectWatch:
    """Notices the client going away, and then cancels the request's task, but only once it is armed.

    It is armed after the pipeline's ``before`` steps: they are never cancelled halfway (a limiter
    that took a slot always sees its ``after``); from then on a disconnect cancels the upstream call
    or the stream at once, which closes the upstream connection.
    """

    def __init__(self, receive: Receive, task: asyncio.Task) -> None:
        self.gone = False
        self.cancelled = False
        self._armed = False
        self._task = task
        self._watcher = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        if self._armed:
            self.cancelled = True
            self._task.cancel()

    def guard(self, send: Send) -> Send:
        """``send``, disarming before the last body message: once the response is complete the server
        reports a disconnect too, which must not cancel the request's finishing work."""
        async def guarded(message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._armed = False
            await send(message)
        return guarded

    def arm(self) -> bool:
        """Allow cancelling from now on; False when the client is already gone."""
        self._armed = True
        return not self.gone

    def close(self) -> None:
        self._armed = False
        self._watcher.cancel()


class ProxyEndpoint:
    """``POST /v1/chat/completions`` or ``/v1/completions`` as a raw ASGI app."""

    def __init__(self, app: FastAPI, endpoint: Endpoint) -> None:
        self.app, self.endpoint = app, endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        gateway: Gateway = self.app.state.gateway
        try:
            body, size = await _read_json(receive)
            model, stream = _model_and_stream(body, self.endpoint)
        except APIError as error:
            await gateway.refuse(error, started)(scope, receive, send)
            return
        if gateway.state.draining:
            error = APIError(503, "The gateway is shutting down and accepts no new requests.", UNAVAILABLE,
                             code="draining", retry_after=1.0)
            await gateway.refuse(error, started, model)(scope, receive, send)
            return
        if gateway.router.group(model) is None:
            error = APIError(404, f"The model '{model}' does not exist on this gateway.", param="model",
                             code="model_not_found")
            await gateway.refuse(error, started, model)(scope, receive, send)
            return
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        ctx = RequestContext(request=Request(scope, receive), endpoint=self.endpoint, body=body, model=model,
                             stream=stream, max_tokens=max_tokens if isinstance(max_tokens, int) else None,
                             started=started)
        ctx.state["gateway.body_bytes"] = size
        await gateway.serve(ctx, scope, receive, send)


async def _read_json(receive: Receive) -> tuple[dict, int]:
    """The body as a JSON object and its size; a big body is parsed off the event loop."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise APIError(400, "The client disconnected before sending the body.", code="client_disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, "The request body is larger than the gateway accepts.", code="request_too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    try:
        raw = b"".join(chunks)
        body = await asyncio.to_thread(json.loads, raw) if size > LARGE_BODY_BYTES else json.loads(raw)
    except ValueError as exc:
        raise APIError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:  # json.loads of very deep nesting: bad input, not a gateway bug
        raise APIError(400, "The request body is nested too deeply.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return body, size


def _model_and_stream(body: dict, endpoint: Endpoint) -> tuple[str, bool]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "The request needs a 'model' (a string).", param="model")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean.", param="stream")
    if endpoint == "chat" and not isinstance(body.get("messages"), list):
        raise APIError(400, "The request needs 'messages' (a list).", param="messages")
    if endpoint == "completions" and "prompt" not in body:
        raise APIError(400, "The request needs a 'prompt'.", param="prompt")
    return model, bool(stream)


def build_app(config: GatewayConfig, policy_factory: PolicyFactory = default_policy,
              registry: CollectorRegistry | None = None) -> FastAPI:
    registry = registry or CollectorRegistry()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        policy = await policy_factory(config, registry)
        gateway = Gateway(config, registry, policy)
        app.state.gateway = gateway
        app.include_router(policy.admin_router)
        install_tenant_salt(gateway)
        prompts = install_prompts(gateway, app)
        cache = await install_cache(gateway, app)
        gateway.monitor.start()
        try:
            yield
        finally:
            if cache is not None:
                await cache.aclose()
            if prompts is not None:
                await prompts.aclose()
            await gateway.aclose()

    app = FastAPI(title="tureen gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    _add_info_routes(app, registry)
    gateway_openapi.install(app)
    return HotPaths(app, {"/v1/chat/completions": ProxyEndpoint(app, "chat"),
                          "/v1/completions": ProxyEndpoint(app, "completions")})


class HotPaths:
    """The generation routes go straight to their endpoint; everything else to the FastAPI app.

    Every chunk of a stream would otherwise pass through FastAPI's and Starlette's middleware
    wrappers around ``send``; skipping them is a measurable share of the gateway's CPU per token.
    The endpoints answer their own errors in the OpenAI shape (``Gateway.serve``).
    """

    def __init__(self, app: FastAPI, routes: dict[str, ProxyEndpoint]) -> None:
        self.app, self.routes = app, routes

    @property
    def state(self):
        return self.app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            endpoint = self.routes.get(scope["path"])
            if endpoint is not None:
                if scope["method"] == "POST":
                    await endpoint(scope, receive, send)
                else:
                    await APIError(405, "Use POST.", code="method_not_allowed",
                                   extra_headers={"Allow": "POST"}).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _add_info_routes(app: FastAPI, registry: CollectorRegistry) -> None:
    @app.get("/health")
    async def health(request: Request, deep: bool = False) -> Response:
        gateway: Gateway = request.app.state.gateway
        if gateway.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "1"})
        if not deep:
            return JSONResponse({"status": "ok"})
        return await _deep_health(gateway)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        gateway: Gateway = request.app.state.gateway
        principal = await gateway.policy.authenticate(request)
        if isinstance(principal, Response):
            return principal
        names = [m for m in await _model_names(gateway) if principal.may_use(m)]
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "tureen-gateway"} for name in names]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def _deep_health(gateway: Gateway) -> Response:
    models: dict[str, Any] = {}
    for name, group in gateway.router.groups.items():
        healthy = [d.id for d in group if d.routable()]
        models[name] = {"healthy": healthy, "unhealthy": [d.id for d in group if not d.routable()]}
    ok = all(entry["healthy"] for entry in models.values())
    body: dict[str, Any] = {"status": "ok" if ok else "degraded", "models": models}
    policy_health = getattr(gateway.policy, "health", None)
    if policy_health is not None:
        body["policy"] = await policy_health()
    return JSONResponse(body, status_code=200 if ok else 503)


async def _model_names(gateway: Gateway) -> list[str]:
    """Configured public names; a wildcard entry lists what its upstreams serve."""
    names = gateway.config.public_models()
    for d in gateway.router.groups.get(WILDCARD, []):
        try:
            _, body = await gateway.client.get(d.api_base + "/models", 2.0, headers=d.headers)
            names += [m["id"] for m in json.loads(body).get("data", []) if isinstance(m, dict) and "id" in m]
        except Exception:  # a wildcard upstream that cannot list its models adds nothing
            continue
    return list(dict.fromkeys(names))
