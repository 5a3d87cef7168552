"""Building the cache step from the config, putting it in the pipeline, and the admin flush route.

``POST /cache/flush`` (master key as ``Authorization: Bearer``) removes entries from every tier:
``{"team_id": "search"}`` or ``{"key": "sk-..." | token}`` for one tenant, ``{"model": "m"}`` for one
model, both to narrow, or ``{"all": true}`` for everything. The answer counts the entries removed per
tier (-1: that tier was unavailable).
"""

from __future__ import annotations

import hmac
import json
import logging

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from tureen.gateway.cache.degrade import Degrader
from tureen.gateway.cache.keys import digest
from tureen.gateway.cache.metrics import CacheMetrics
from tureen.gateway.cache.settings import EXACT, SEMANTIC, CacheParams
from tureen.gateway.cache.step import CacheStep
from tureen.gateway.config import WILDCARD, GatewayConfig, GatewayConfigError
from tureen.server.errors import APIError

logger = logging.getLogger("tureen.gateway")


def redis_url(config: GatewayConfig) -> str | None:
    params = config.litellm_settings.cache_params
    if params.redis_url:
        return params.redis_url
    if params.host:
        auth = f":{params.password.get_secret_value()}@" if params.password else ""
        return f"redis://{auth}{params.host}:{params.port}/0"
    return config.router_settings.redis_connection_url()


def _identity(gateway):
    """Public model -> the identities of the deployments that may answer it (upstream name, revision)."""
    by_model: dict[str, list[str]] = {}
    for entry in gateway.config.model_list:
        name = f"{entry.litellm_params.upstream_model}@{entry.model_info.revision or ''}"
        by_model.setdefault(entry.model_name, []).append(name)
    frozen = {m: sorted(set(ids)) for m, ids in by_model.items()}

    def identity(model: str) -> list[str]:
        if model in frozen:
            return frozen[model]
        return [i.replace(WILDCARD, model, 1) for i in frozen.get(WILDCARD, [])]
    return identity


def _prices(gateway):
    prices: dict[str, tuple[float, float]] = {}
    for d in gateway.deployments:  # the first deployment's prices (deployments of one model usually agree)
        prices.setdefault(d.model_name, (d.input_cost_per_token, d.output_cost_per_token))
    return lambda model: prices.get(model, prices.get(WILDCARD, (0.0, 0.0)))


async def build_step(gateway) -> CacheStep:
    params: CacheParams = gateway.config.litellm_settings.cache_params
    metrics = CacheMetrics(gateway.registry)
    on_error = lambda tier, op: metrics.errors.labels(tier, op).inc()  # noqa: E731
    tiers = []
    if EXACT in params.tiers:
        from tureen.gateway.cache.exact import ExactTier

        url = redis_url(gateway.config)
        if url is None:
            raise GatewayConfigError("litellm_settings.cache_params: the redis cache needs host/port, redis_url, "
                                     "or router_settings' Redis")
        tiers.append(ExactTier(url, params, Degrader(EXACT, params.probe_interval_s, on_error)))
    if SEMANTIC in params.tiers:
        from tureen.gateway.cache.semantic import build_semantic_tier

        tiers.append(await build_semantic_tier(params, metrics, Degrader(SEMANTIC, params.probe_interval_s,
                                                                         on_error)))
    for model in gateway.config.public_models():  # series exist from the start, so rate() sees the first lookup
        for tier in tiers:
            metrics.lookups.labels(tier.name, model)
            metrics.hits.labels(tier.name, model)
    return CacheStep(params, tiers, metrics, _identity(gateway), _prices(gateway), gateway._model_label)


async def install(gateway, app) -> CacheStep | None:
    """The step, last in the pipeline (after auth, prompt rendering and limits), and the flush route."""
    if not gateway.config.litellm_settings.cache:
        return None
    step = await build_step(gateway)
    gateway.pipeline.steps.append(step)
    app.include_router(flush_router(step, gateway.config))
    logger.info("response cache on: tiers %s", ", ".join(t.name for t in step.tiers))
    return step


def flush_router(step: CacheStep, config: GatewayConfig) -> APIRouter:
    router = APIRouter()
    master = config.general_settings.master_key

    @router.post("/cache/flush")
    async def flush(request: Request) -> Response:
        from tureen.gateway.keys import bearer_key, token_of

        if master is None:
            return APIError(403, "The cache admin API is disabled: set general_settings.master_key.",
                            "permission_error", code="admin_disabled").response()
        given = bearer_key(request) or ""
        if not hmac.compare_digest(given.encode(), master.get_secret_value().encode()):
            return APIError(401, "The cache admin API needs the master key as 'Authorization: Bearer'.",
                            code="invalid_api_key").response()
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            return APIError(400, "The request body is not valid JSON.", code="invalid_json").response()
        if not isinstance(body, dict):
            return APIError(400, "The request body must be a JSON object.", code="invalid_json").response()
        tenant = ("team:" + str(body["team_id"]) if body.get("team_id") else
                  "key:" + token_of(str(body["key"])) if body.get("key") else None)
        model = str(body["model"]) if body.get("model") else None
        if tenant is None and model is None and body.get("all") is not True:
            return APIError(400, "Name a team_id, a key, a model, or pass all: true.", param="team_id").response()
        removed = await step.flush(tenant, model)
        logger.info("cache flushed: tenant=%s model=%s removed=%s", digest(tenant)[:12] if tenant else "*",
                    model or "*", removed)
        return JSONResponse({"removed": removed})

    return router
