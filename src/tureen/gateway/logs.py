"""One structured (JSON) log line per request on the ``tureen.gateway.access`` logger.

It names the tenant by key alias and team, never by key; the prompt is included only when
``tureen_settings.log_prompts`` is on.
"""

from __future__ import annotations

import json
import logging
import time

from tureen.gateway.pipeline import RequestContext

access_logger = logging.getLogger("tureen.gateway.access")


def log_request(ctx: RequestContext, log_prompts: bool) -> None:
    if not access_logger.isEnabledFor(logging.INFO):
        return
    usage = ctx.usage or {}
    p = ctx.principal
    record = {
        "request_id": ctx.request_id, "key_alias": p.key_alias if p else None, "team": p.team_id if p else None,
        "endpoint": ctx.endpoint, "model": ctx.model, "served_model": ctx.served_model,
        "deployment": ctx.deployment, "status": ctx.status, "stream": ctx.stream,
        "prompt_tokens": usage.get("prompt_tokens", ctx.prompt_tokens),
        "completion_tokens": usage.get("completion_tokens"), "cost": ctx.cost,
        "upstream_ms": _ms(ctx.upstream_seconds), "overhead_ms": _ms(ctx.state.get("gateway.overhead_s")),
        "total_ms": _ms(time.perf_counter() - ctx.started), "retries": ctx.retries, "fallbacks": ctx.fallbacks,
    }
    if ctx.error:
        record["error"] = ctx.error
    if log_prompts:
        record["prompt"] = ctx.body.get("messages", ctx.body.get("prompt"))
    access_logger.info(json.dumps(record, separators=(",", ":"), default=str))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
