"""The gateway's prompt step: a chat request names a registered prompt instead of carrying its text.

Request body extension (the OpenAI SDK's ``extra_body``)::

    "prompt": {"name": "support-chat", "tag": "stable", "variables": {"customer": "Ada"}}
    # or {"name": ..., "version": "v4", ...}; tag defaults to stable

The step resolves the version (``tag: stable`` goes to the canary for ``canary_weight`` % of callers,
sticky by hash of the body's ``user``, else of the caller's key), refuses a version not certified for
the requested model (400 naming both, unless ``allow_uncertified: warn``), renders it and puts its
messages before the request's own, then the request is routed as usual. The response carries
``x-tureen-prompt-name``, ``x-tureen-prompt-version`` and ``x-tureen-prompt-tag``;
``ctx.state["prompt"]`` holds them for later steps (cache keys). A poll task reloads the registry when
``tags.yaml`` or the git HEAD changes; a bad change keeps the last good state.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.responses import Response

from tureen.gateway.pipeline import RequestContext
from tureen.prompts.registry import PromptError, Registry, Resolved
from tureen.prompts.render import ROLE_LINE
from tureen.server.errors import UNAVAILABLE, APIError

logger = logging.getLogger("tureen.gateway")
HEADERS = ("x-tureen-prompt-name", "x-tureen-prompt-version", "x-tureen-prompt-tag")


class PromptMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("tureen_gateway_prompt_requests", "Chat requests rendered from a registered "
                                "prompt, by prompt, version and served tag (canary share: tag=canary over all).",
                                ["prompt", "version", "tag"], registry=registry)
        self.refused = Counter("tureen_gateway_prompt_refused", "Prompt requests refused, by reason.", ["reason"],
                               registry=registry)
        self.uncertified = Counter("tureen_gateway_prompt_uncertified", "Versions served on a model they are not "
                                   "certified for (allow_uncertified: warn).", ["prompt", "version"],
                                   registry=registry)
        self.canary_weight = Gauge("tureen_gateway_prompt_canary_weight", "Configured canary percent per prompt.",
                                   ["prompt"], registry=registry)
        self.eval_pass_rate = Gauge("tureen_prompt_eval_pass_rate", "Pass rate of the last committed eval run "
                                    "of each prompt version (from the registry's results files).",
                                    ["prompt", "version"], registry=registry)
        self.eval_finished = Gauge("tureen_prompt_eval_last_run_timestamp_seconds", "When the last committed "
                                   "eval run of each prompt version finished (unix time).", ["prompt", "version"],
                                   registry=registry)
        self.reloads = Counter("tureen_gateway_prompt_reloads", "Registry reloads, by result.", ["result"],
                               registry=registry)


class PromptStep:
    """Renders ``body.prompt`` into messages; see the module docstring."""

    name = "prompt"

    def __init__(self, registry: Registry, metrics: PromptMetrics, allow_uncertified: str | None = None,
                 reload_interval_s: float = 1.0) -> None:
        self.registry, self.metrics = registry, metrics
        self.allow_uncertified = allow_uncertified
        self.reload_interval_s = reload_interval_s
        self._task: asyncio.Task | None = None
        self.publish()

    async def before(self, ctx: RequestContext) -> Response | None:
        if ctx.endpoint != "chat" or "prompt" not in ctx.body:
            return None
        if not self.registry.snapshot.prompts and self.registry.last_error is not None:
            self.metrics.refused.labels("registry_unavailable").inc()
            ctx.error = "prompt registry not loaded"
            return APIError(503, "The prompt registry is not loaded; the gateway keeps retrying.", UNAVAILABLE,
                            code="prompt_registry_unavailable", retry_after=self.reload_interval_s).response()
        try:
            resolved, messages = self._render(ctx)
        except PromptError as exc:
            self.metrics.refused.labels(exc.code).inc()
            ctx.error = f"prompt refused: {exc.code}"
            return APIError(exc.status, str(exc), param=exc.param, code=exc.code).response()
        ctx.body["messages"] = messages + ctx.body["messages"]
        tag = resolved.tag or "version"
        ctx.state["prompt"] = {"name": resolved.name, "version": resolved.version, "tag": tag}
        ctx.response_headers.update(zip(HEADERS, (resolved.name, resolved.version, tag)))
        self.metrics.requests.labels(resolved.name, resolved.version, tag).inc()
        return None

    async def after(self, ctx: RequestContext) -> None:
        return None

    def _render(self, ctx: RequestContext) -> tuple[Resolved, list[dict]]:
        ref = ctx.body.pop("prompt")
        if not isinstance(ref, dict) or not isinstance(ref.get("name"), str):
            raise PromptError("'prompt' must be an object with a 'name' (and optional tag, version, variables)",
                              param="prompt")
        variables = ref.get("variables", {})
        if not isinstance(variables, dict):
            raise PromptError("'prompt.variables' must be an object", param="prompt.variables")
        for field in ("tag", "version"):
            if ref.get(field) is not None and not isinstance(ref[field], str):
                raise PromptError(f"'prompt.{field}' must be a string", param=f"prompt.{field}")
        resolved = self.registry.resolve(ref["name"], ref.get("tag"), ref.get("version"), self._sticky(ctx))
        self._check_certified(resolved, ctx.model)
        return resolved, resolved.render(variables)

    @staticmethod
    def _sticky(ctx: RequestContext) -> str:
        user = ctx.body.get("user")
        if isinstance(user, str) and user:
            return "user:" + user
        if ctx.principal is not None and ctx.principal.key_hash:
            return "key:" + ctx.principal.key_hash
        return "request:" + ctx.request_id  # no identity: a fair draw, not sticky

    def _check_certified(self, resolved: Resolved, model: str) -> None:
        if resolved.certified(model):
            return
        mode = self.allow_uncertified or resolved.prompt.spec.allow_uncertified
        if mode == "warn":
            logger.warning("prompt %s %s is not certified for model %s; served (allow_uncertified: warn)",
                           resolved.name, resolved.version, model)
            self.metrics.uncertified.labels(resolved.name, resolved.version).inc()
            return
        raise PromptError(f"prompt '{resolved.name}' {resolved.version} is not certified for model '{model}'",
                          400, "model", "prompt_not_certified")

    # ---- reload -----------------------------------------------------------------------------
    def publish(self) -> None:
        """Gauges from the current snapshot: canary weights and committed eval pass rates."""
        snapshot = self.registry.snapshot
        for name, prompt in snapshot.prompts.items():
            self.metrics.canary_weight.labels(name).set(snapshot.tags.get(name).canary_weight
                                                        if name in snapshot.tags else 0)
            suite = Path(prompt.directory / (prompt.spec.evals or "evals/x")).parent / "results"
            for path in suite.glob(f"{name}-v*.json"):
                version = path.stem[len(name) + 1:]
                if version in prompt.sources:
                    try:
                        result = json.loads(path.read_text())
                        rate, finished = result["candidate"]["pass_rate"], result.get("finished_at", 0)
                    except (OSError, ValueError, KeyError, TypeError):
                        continue
                    self.metrics.eval_pass_rate.labels(name, version).set(rate)
                    self.metrics.eval_finished.labels(name, version).set(finished)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval_s)
            try:
                before = self.registry.last_error
                changed = await asyncio.to_thread(self.registry.reload_if_changed)
            except Exception:  # the poll never dies; the last good state stays
                logger.exception("prompt registry poll failed")
                continue
            if changed:
                self.metrics.reloads.labels("ok").inc()
                self.publish()
            elif self.registry.last_error is not None and self.registry.last_error != before:
                self.metrics.reloads.labels("refused").inc()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def langfuse_shape(registry: Registry, resolved: Resolved) -> dict[str, Any]:
    """One version as Langfuse serves it: name, version, labels, type, prompt, config (plus tureen's extras)."""
    prompt = resolved.prompt
    source = prompt.sources[resolved.version]
    labels = [tag for tag, v in registry.tags(resolved.name).tags().items() if v == resolved.version]
    if prompt.spec.type == "chat":
        parts = ROLE_LINE.split(source)
        body: Any = [{"role": r, "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    else:
        body = source
    spec = prompt.spec.versions.get(resolved.version)
    return {"name": resolved.name, "version": resolved.version, "labels": labels, "type": prompt.spec.type,
            "prompt": body, "config": {**prompt.spec.config, **(spec.config if spec else {})},
            "variables": {k: v.model_dump(exclude_none=True) for k, v in prompt.spec.variables.items()},
            "certified_models": spec.models if spec else []}


def prompts_router(step: PromptStep, authenticate) -> APIRouter:
    """``GET /v1/prompts`` and ``GET /v1/prompts/{name}?tag=&version=``, read-only, behind the gateway's auth."""
    router = APIRouter()

    async def _auth(request: Request) -> Response | None:
        principal = await authenticate(request)
        return principal if isinstance(principal, Response) else None

    @router.get("/v1/prompts")
    async def list_prompts(request: Request) -> Response:
        if (denied := await _auth(request)) is not None:
            return denied
        registry = step.registry
        data = [{"name": n, "type": registry.get(n).spec.type, "versions": registry.get(n).versions(),
                 "labels": registry.tags(n).tags(), "canary_weight": registry.tags(n).canary_weight}
                for n in registry.names()]
        return JSONResponse({"object": "list", "data": data})

    @router.get("/v1/prompts/{name}")
    async def get_prompt(request: Request, name: str, tag: str | None = None, version: str | None = None
                         ) -> Response:
        if (denied := await _auth(request)) is not None:
            return denied
        try:
            resolved = step.registry.resolve(name, tag, version)
        except PromptError as exc:
            return APIError(exc.status, str(exc), param=exc.param, code=exc.code).response()
        return JSONResponse(langfuse_shape(step.registry, resolved))

    return router


def build_prompt_step(settings, registry: CollectorRegistry) -> PromptStep | None:
    """The step for ``tureen_settings.prompts``; None when no registry path is configured."""
    if settings.registry_path is None:
        return None
    return PromptStep(Registry.degraded(Path(settings.registry_path)), PromptMetrics(registry),
                      settings.allow_uncertified,
                      settings.reload_interval_s)


def install(gateway, app) -> PromptStep | None:
    """Put the step after auth (it needs the caller for canary stickiness) and before limits (which count the
    rendered prompt's tokens), include the read-only routes, start the reload poll."""
    step = build_prompt_step(gateway.config.tureen_settings.prompts, gateway.registry)
    if step is None:
        return None
    names = [s.name for s in gateway.pipeline.steps]
    gateway.pipeline.insert(names.index("auth") + 1 if "auth" in names else 0, step)
    app.include_router(prompts_router(step, gateway.policy.authenticate))
    step.start()
    return step
