"""The cache step of the gateway's pipeline: look up the tiers in order, answer a hit, store a miss.

``before``: the request's ``cache`` field and ``Cache-Control`` header are read (and the field
removed, so the upstream never sees it); a request that is not deterministic (temperature 0, or a
seed with n=1) passes through unless ``deterministic_only`` is false. The tiers are asked in order,
exact then semantic; the first hit answers (as JSON or as an SSE replay, whichever the client asked
for). On a miss the step asks for the response bytes (``ctx.capture_body``).

``after``: a complete, successful response from the requested model (not a fallback) is stored in
every tier that missed, unless ``no-store``. A tier that fails is skipped (``Degrader``); the
request never fails because of a cache.

Every response of a cached call type carries ``x-tureen-cache: hit | semantic-hit | miss``; a
semantic hit also ``x-tureen-cache-similarity``. A hit is charged nothing (usage 0, cost 0); what it
saved is counted in ``tureen_gateway_cache_saved_tokens`` and ``..._saved_cost``.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from starlette.responses import Response

from tureen.gateway.cache.degrade import TierUnavailable
from tureen.gateway.cache.entry import Entry, from_response, respond
from tureen.gateway.cache.keys import CacheRequest, Controls, canonical_body, is_deterministic, tenant_of
from tureen.gateway.cache.metrics import CacheMetrics
from tureen.gateway.cache.settings import EXACT, CacheParams
from tureen.gateway.pipeline import RequestContext

logger = logging.getLogger("tureen.gateway")
CACHE_HEADER = "x-tureen-cache"
SIMILARITY_HEADER = "x-tureen-cache-similarity"
HIT_NAMES = {EXACT: "hit"}
ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


class Tier(Protocol):
    name: str

    async def lookup(self, req: CacheRequest) -> tuple[Entry, dict[str, str]] | None: ...

    async def store(self, req: CacheRequest, entry: Entry, ttl: float) -> bool: ...

    async def flush(self, tenant: str | None, model: str | None) -> int: ...

    async def aclose(self) -> None: ...


class CacheStep:
    name = "cache"

    def __init__(self, params: CacheParams, tiers: list[Tier], metrics: CacheMetrics, identity, prices,
                 label=lambda model: model) -> None:
        self.params, self.tiers, self.metrics = params, tiers, metrics
        self._label = label  # requested model -> its bounded metric label
        self._identity = identity  # public model -> the upstream identity list (names, revisions)
        self._prices = prices  # public model -> (input, output) cost per token
        self.endpoints = params.endpoints

    async def before(self, ctx: RequestContext) -> Response | None:
        field = ctx.body.pop("cache", None)  # never forwarded, also on a route that is not cached
        if ctx.endpoint not in self.endpoints:
            return None
        controls = Controls.parse(field, ctx.request.headers.get("cache-control"))
        ctx.response_headers[CACHE_HEADER] = "miss"
        canonical = canonical_body(ctx.body, ctx.endpoint)
        if self.params.deterministic_only and not is_deterministic(canonical):
            self.metrics.skipped.labels(self._label(ctx.model), "not_deterministic").inc()
            return None
        req = self._request(ctx, canonical, controls)
        missed: list[Tier] = []
        if controls.no_cache:
            self.metrics.skipped.labels(req.label, "no_cache").inc()
            missed = list(self.tiers)
        else:
            for tier in self.tiers:
                answer = await self._lookup(tier, req, ctx)
                if answer is not None:
                    return answer
                missed.append(tier)
        if not controls.no_store and missed:
            ctx.capture_body = True
            ctx.state[self.name] = (req, missed)
        return None

    def _request(self, ctx: RequestContext, canonical: dict, controls: Controls) -> CacheRequest:
        prompt = ctx.state.get("prompt")
        options = ctx.body.get("stream_options")
        return CacheRequest(
            endpoint=ctx.endpoint, tenant=tenant_of(ctx.principal), model=ctx.model,
            identity=self._identity(ctx.model), prompt_version=f"{prompt['name']}@{prompt['version']}" if prompt
            else None, canonical=canonical, controls=controls, stream=ctx.stream,
            include_usage=isinstance(options, dict) and bool(options.get("include_usage")),
            label=self._label(ctx.model))

    async def _lookup(self, tier: Tier, req: CacheRequest, ctx: RequestContext) -> Response | None:
        started = time.perf_counter()
        self.metrics.lookups.labels(tier.name, req.label).inc()
        try:
            found = await tier.lookup(req)
        except TierUnavailable:
            return None
        finally:
            self.metrics.lookup_seconds.labels(tier.name, req.label).observe(time.perf_counter() - started)
        if found is None:
            return None
        entry, headers = found
        response = respond(entry, req.stream, req.include_usage)
        if response is None:
            return None
        self.metrics.hits.labels(tier.name, req.label).inc()
        self._count_saved(tier.name, req.label, ctx.model, entry)
        ctx.response_headers[CACHE_HEADER] = HIT_NAMES.get(tier.name, f"{tier.name}-hit")
        ctx.response_headers.update(headers)
        ctx.usage, ctx.cost, ctx.deployment, ctx.served_model = dict(ZERO_USAGE), 0.0, "cache", ctx.model
        return response

    def _count_saved(self, tier: str, label: str, model: str, entry: Entry) -> None:
        usage = entry.usage or {}
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        self.metrics.saved_tokens.labels(tier, label, "prompt").inc(prompt)
        self.metrics.saved_tokens.labels(tier, label, "completion").inc(completion)
        input_price, output_price = self._prices(model)
        self.metrics.saved_cost.labels(tier, label).inc(prompt * input_price + completion * output_price)

    async def after(self, ctx: RequestContext) -> None:
        pending = ctx.state.pop(self.name, None)
        if pending is None or ctx.status != 200 or ctx.response_body is None or ctx.served_model != ctx.model:
            return
        req, missed = pending
        entry = from_response(ctx.endpoint, ctx.stream, ctx.response_body, ctx.usage, ctx.cost)
        if entry is None or entry.size > self.params.max_entry_bytes:
            return
        ttl = req.controls.ttl or self.params.ttl_for(ctx.model)
        for tier in missed:
            try:
                if await tier.store(req, entry, ttl):
                    self.metrics.stores.labels(tier.name, req.label).inc()
            except TierUnavailable:
                continue

    async def flush(self, tenant: str | None, model: str | None) -> dict[str, int]:
        removed: dict[str, int] = {}
        for tier in self.tiers:
            try:
                removed[tier.name] = await tier.flush(tenant, model)
            except TierUnavailable:
                removed[tier.name] = -1
                continue
            self.metrics.evictions.labels(tier.name, model or "all", "flush").inc(removed[tier.name])
        return removed

    async def aclose(self) -> None:
        for tier in self.tiers:
            try:
                await tier.aclose()
            except Exception:  # closing a dead store is not an error worth raising at shutdown
                logger.debug("closing the %s cache failed", tier.name, exc_info=True)
