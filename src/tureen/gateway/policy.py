"""The gateway's policy: who may call (virtual keys), how much (limits, budgets), and the key admin API.

``build_policy`` makes one ``Policy`` at start-up. The app runs ``policy.steps`` (auth, then limits)
around every request, mounts ``policy.admin_router`` and calls ``policy.aclose()`` at shutdown.

The admin API follows LiteLLM's names and shapes and needs the master key
(``general_settings.master_key``) as ``Authorization: Bearer``:

- ``POST /key/generate``: LiteLLM's fields (``models``, ``max_budget``, ``budget_duration``,
  ``rpm_limit``, ``tpm_limit``, ``max_parallel_requests``, ``max_prompt_tokens``, ``duration``,
  ``key_alias``, ``team_id``, ``metadata``). The new key is in the response's ``key``, shown once;
  ``token`` is its SHA-256, the handle for every later call.
- ``GET /key/info?key=``: the key (or its token) -> ``{"key": token, "info": {...}}``, with ``spend``.
  A key may read its own info without the master key.
- ``POST /key/update`` (``key`` plus the fields to change), ``POST /key/delete``
  (``keys`` and/or ``key_aliases`` -> ``deleted_keys``: tokens), ``GET /key/list``
  (``page``, ``size``, ``team_id``, ``key_alias``, ``return_full_object``).
- ``GET /team/info?team_id=``: the team's limits (``tureen_settings.teams``), spend and keys.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response

from tureen.gateway.accounting import PolicyMetrics
from tureen.gateway.admit_ahead import AdmitAhead
from tureen.gateway.config import GatewayConfig
from tureen.gateway.keys import (
    AuthStep,
    DeleteKeyRequest,
    GenerateKeyRequest,
    KeyService,
    UpdateKeyRequest,
    bearer_key,
    hash_key,
    iso,
    spend_name,
    token_of,
)
from tureen.gateway.limits import LimitsStep
from tureen.gateway.pipeline import Principal, Step
from tureen.gateway.redis_store import MemoryStore, PolicyStore, RedisStore, StoreUnavailable
from tureen.gateway.tokens import TokenCounters
from tureen.server.errors import APIError

logger = logging.getLogger("tureen.gateway")


class Policy:
    """Auth and limits steps, the admin router, and the store they share."""

    def __init__(self, config: GatewayConfig, store: PolicyStore, metrics: PolicyMetrics,
                 counters: TokenCounters) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.keys = KeyService(store, config, metrics)
        self.auth = AuthStep(self.keys, config, metrics)
        self.limits = LimitsStep(store, config, counters, metrics, _admit_ahead(config, store))
        self.steps: list[Step] = [self.auth, self.limits]
        self.admin_router = admin_router(self)

    async def authenticate(self, request: Request) -> Principal | Response:
        return await self.auth.authenticate(request)

    async def health(self) -> dict[str, str]:
        if isinstance(self.store, MemoryStore):
            return {"policy_store": "in-process"}
        return {"policy_store": "ok" if await self.store.ping() else "unreachable"}

    async def aclose(self) -> None:
        await self.limits.aclose()
        await self.store.aclose()


async def build_policy(config: GatewayConfig, registry: CollectorRegistry, *,
                       store: PolicyStore | None = None) -> Policy:
    """The policy for ``config``: Redis when the router settings name one, else an in-process store."""
    settings = config.tureen_settings
    metrics = PolicyMetrics(registry, settings.metrics_label_by, settings.token_budget.window_s)
    if store is None:
        store = _store(config, metrics)
    if isinstance(store, RedisStore) and not await store.ping():
        logger.warning("redis is unreachable at start-up; serving by redis_failure_mode=%s until it answers",
                       settings.redis_failure_mode)
    counters = TokenCounters.from_config(config)
    return Policy(config, store, metrics, counters)


def _admit_ahead(config: GatewayConfig, store: PolicyStore) -> AdmitAhead | None:
    """Only in front of Redis (an in-process store answers at once), and never when an outage must refuse."""
    settings = config.tureen_settings
    ahead = settings.admit_ahead
    if not ahead.enabled or settings.redis_failure_mode == "fail_closed" or not isinstance(store, RedisStore):
        return None
    return AdmitAhead(ahead.headroom, ahead.max_age_s)


def _store(config: GatewayConfig, metrics: PolicyMetrics) -> PolicyStore:
    url = config.router_settings.redis_connection_url()
    if url is None:
        logger.warning("no Redis configured (router_settings.redis_url): keys, limits and spend live in this "
                       "process only; they are lost on restart and not shared with other gateway replicas")
        return MemoryStore()
    return RedisStore(url, on_error=lambda op: metrics.redis_errors.labels(op).inc(),
                      on_state=lambda up: metrics.redis_up.set(1 if up else 0))


# ----------------------------------------------------------------------------- admin API


async def _body(request: Request, model: type[BaseModel]) -> BaseModel:
    try:
        data = json.loads(await request.body() or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"Invalid request: {param or 'body'}: {first['msg'].removeprefix('Value error, ')}",
                       param=param) from None


def _require_master(policy: Policy, request: Request) -> None:
    if policy.auth._master is None:
        raise APIError(403, "The key admin API is disabled: set general_settings.master_key.",
                       "permission_error", code="admin_disabled")
    if not policy.auth.is_master(bearer_key(request)):
        raise APIError(401, "The key admin API needs the master key as 'Authorization: Bearer'.",
                       code="invalid_api_key")


def _answer(handler):
    """Run an admin handler; typed errors and store outages become OpenAI error JSON."""
    async def run(request: Request) -> Response:
        try:
            return JSONResponse(await handler(request))
        except APIError as exc:
            return exc.response()
        except StoreUnavailable:
            return APIError(503, "The key store (Redis) is unreachable; retry shortly.", "service_unavailable_error",
                            code="policy_store_unavailable", retry_after=2).response()
    run.__name__ = handler.__name__
    return run


def admin_router(policy: Policy) -> APIRouter:
    router = APIRouter(tags=["key management"])
    keys = policy.keys

    async def generate_key(request: Request) -> dict[str, Any]:
        _require_master(policy, request)
        body = await _body(request, GenerateKeyRequest)
        key, record = await keys.generate(body)
        logger.info("key generated: token=%s alias=%s team=%s", record.token[:12], record.key_alias, record.team_id)
        return {"key": key, **(await keys.info(record))}

    async def key_info(request: Request) -> dict[str, Any]:
        caller = bearer_key(request)
        asked = request.query_params.get("key")
        own = caller is not None and not policy.auth.is_master(caller) and (asked is None or
                                                                             token_of(asked) == hash_key(caller))
        if not own:
            _require_master(policy, request)
        if asked is None and not own:
            raise APIError(400, "Pass the key or its token as ?key=", param="key")
        if own:  # the caller's own key: looked up by the hash of what it sent, never as a token it names
            record = await keys.record(hash_key(caller))
            if record is None or record.expired(time.time()) or record.blocked:
                raise APIError(401, "Invalid API key.", code="invalid_api_key")
        else:
            record = await keys.require(asked)
        return {"key": record.token, "info": await keys.info(record)}

    async def update_key(request: Request) -> dict[str, Any]:
        _require_master(policy, request)
        record = await keys.update(await _body(request, UpdateKeyRequest))
        return {"key": record.token, **(await keys.info(record))}

    async def delete_key(request: Request) -> dict[str, Any]:
        _require_master(policy, request)
        body = await _body(request, DeleteKeyRequest)
        if not body.keys and not body.key_aliases:
            raise APIError(400, "Pass keys (keys or tokens) and/or key_aliases to delete.", param="keys")
        deleted = await keys.delete(body)
        if not deleted:
            raise APIError(404, "None of the given keys exist.", param="keys", code="key_not_found")
        return {"deleted_keys": deleted}

    async def list_keys(request: Request) -> dict[str, Any]:
        _require_master(policy, request)
        return await _list(policy, request)

    router.add_api_route("/key/generate", _answer(generate_key), methods=["POST"])
    router.add_api_route("/key/info", _answer(key_info), methods=["GET"])
    router.add_api_route("/key/update", _answer(update_key), methods=["POST"])
    router.add_api_route("/key/delete", _answer(delete_key), methods=["POST"])
    async def team_info(request: Request) -> dict[str, Any]:
        _require_master(policy, request)
        team_id = request.query_params.get("team_id")
        if not team_id:
            raise APIError(400, "Pass the team as ?team_id=", param="team_id")
        return await _team_info(policy, team_id)

    router.add_api_route("/key/list", _answer(list_keys), methods=["GET"])
    router.add_api_route("/team/info", _answer(team_info), methods=["GET"])
    return router


async def _team_info(policy: Policy, team_id: str) -> dict[str, Any]:
    """LiteLLM's ``/team/info`` shape: the team's limits (from ``tureen_settings.teams``), spend and keys."""
    keys = [r.token for r in await policy.keys.all_records() if r.team_id == team_id]
    limits = policy.limits.teams.get(team_id)
    if not keys and limits is None:
        raise APIError(404, f"no team {team_id!r}: no key has it and tureen_settings.teams does not name it",
                       param="team_id", code="team_not_found")
    spend = (await policy.store.spends([spend_name("team", team_id)]))[0]
    info = {"team_id": team_id, **(limits.model_dump(exclude_unset=False) if limits else {}),
            "spend": spend.spend, "total_spend": spend.total_spend, "budget_reset_at": iso(spend.reset_at)}
    return {"team_id": team_id, "team_info": info, "keys": keys}


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    try:
        value = default if raw is None else int(raw)
    except ValueError:
        raise APIError(400, f"{name} must be an integer", param=name) from None
    if not low <= value <= high:
        raise APIError(400, f"{name} must be between {low} and {high}", param=name)
    return value


async def _list(policy: Policy, request: Request) -> dict[str, Any]:
    page = _query_int(request, "page", 1, 1, 1 << 30)
    size = _query_int(request, "size", 10, 1, 100)
    team_id, alias = request.query_params.get("team_id"), request.query_params.get("key_alias")
    full = request.query_params.get("return_full_object", "false").lower() in ("1", "true", "yes")
    start = (page - 1) * size
    if team_id is None and alias is None:
        tokens, total = await policy.store.list_keys(start, size)
        chosen = await policy.keys.records(tokens) if full else []
    else:
        records = [r for r in await policy.keys.all_records()
                   if (team_id is None or r.team_id == team_id) and (alias is None or r.key_alias == alias)]
        total, chosen = len(records), records[start:start + size]
        tokens = [r.token for r in chosen]
    items: list[Any] = await policy.keys.infos(chosen) if full else tokens
    return {"keys": items, "total_count": total, "current_page": page,
            "total_pages": max(1, math.ceil(total / size))}

