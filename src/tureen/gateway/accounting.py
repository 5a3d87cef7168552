"""The policy's metrics and the bookkeeping that feeds them: tokens, spend, limits, Redis health.

Every label set is bounded: ``scope`` and ``limit_type`` are fixed words, and the tenant label
(``team`` or ``key_alias``) exists only when ``tureen_settings.metrics_label_by`` asks for it. Keys
are created by an admin, so the tenants are as many as the admin made. A key never becomes a label.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tureen.gateway.pipeline import Principal

logger = logging.getLogger("tureen.gateway")

NO_TENANT = "none"


class EveryLog:
    """A log line at most once per ``interval_s`` (the Redis-outage warnings), with a count of the skipped ones."""

    def __init__(self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last = float("-inf")
        self._skipped = 0

    def warning(self, message: str, *args) -> bool:
        return self._log(logging.WARNING, message, *args)

    def error(self, message: str, *args) -> bool:
        return self._log(logging.ERROR, message, *args)

    def _log(self, level: int, message: str, *args) -> bool:
        now = self._clock()
        if now - self._last < self.interval_s:
            self._skipped += 1
            return False
        suffix = f" ({self._skipped} more since the last such line)" if self._skipped else ""
        logger.log(level, message + suffix, *args)
        self._last, self._skipped = now, 0
        return True


class TokenBudgetUsage(Collector):
    """``tureen_gateway_token_budget_usage_ratio``: the highest rolling-window usage / budget among the keys
    seen within the window, per tenant label (one series without a tenant label). Above 1 means a key is
    over its token budget: the alert the seeds ask for against looping agents."""

    def __init__(self, label_name: str | None, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.label_name = label_name
        self.window_s = window_s
        self._clock = clock
        self._seen: dict[str, dict[str, tuple[float, float]]] = {}  # tenant -> key hash -> (ratio, seen at)

    def observe(self, tenant: str, key_hash: str, ratio: float) -> None:
        self._seen.setdefault(tenant, {})[key_hash] = (ratio, self._clock())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = [self.label_name] if self.label_name else []
        family = GaugeMetricFamily("tureen_gateway_token_budget_usage_ratio",
                                   "Highest rolling token usage / token budget among recently active keys",
                                   labels=labels)
        cutoff = self._clock() - self.window_s
        for tenant, keys in list(self._seen.items()):
            for key_hash in [h for h, (_, at) in keys.items() if at < cutoff]:
                del keys[key_hash]
            if not keys and tenant != NO_TENANT:
                del self._seen[tenant]
                continue
            value = max((ratio for ratio, _ in keys.values()), default=0.0)
            family.add_metric([tenant] if labels else [], value)
        if not labels and NO_TENANT not in self._seen:
            family.add_metric([], 0.0)
        yield family


class PolicyMetrics:
    def __init__(self, registry: CollectorRegistry, label_by: str = "none",
                 token_budget_window_s: float = 300.0) -> None:
        self.label_name = {"team": "team", "key_alias": "key_alias"}.get(label_by)
        tenant = [self.label_name] if self.label_name else []
        self.rate_limited = Counter(
            "tureen_gateway_rate_limited_requests", "Requests refused by a limit (429, or 400 for max_prompt_tokens)",
            ["scope", "limit_type"], registry=registry)
        self.auth_failures = Counter(
            "tureen_gateway_auth_failures", "Requests refused by authentication or model access", ["reason"],
            registry=registry)
        self.tokens = Counter("tureen_gateway_tokens", "Tokens used, from the upstreams' reported usage",
                              [*tenant, "kind"], registry=registry)
        self.spend = Counter("tureen_gateway_spend", "Spend in the deployments' price unit (USD)", tenant,
                             registry=registry)
        self.redis_errors = Counter("tureen_gateway_redis_errors", "Redis commands that failed", ["operation"],
                                    registry=registry)
        self.redis_up = Gauge("tureen_gateway_redis_up", "1 while the policy store answers, 0 during an outage",
                              registry=registry)
        self.redis_up.set(1)
        self.admitted_ahead = Counter(
            "tureen_gateway_admitted_ahead", "Requests sent on before Redis admitted them (admit_ahead), by what Redis "
            "then said: confirmed, refused (a limit exceeded by other replicas' traffic) or unconfirmed (Redis failed)",
            ["outcome"], registry=registry)
        self.fail_open = Counter("tureen_gateway_redis_fail_open_requests",
                                 "Requests served without limits because Redis was unreachable (fail_open)",
                                 registry=registry)
        self.fail_closed = Counter("tureen_gateway_redis_fail_closed_requests",
                                   "Requests refused with 503 because Redis was unreachable (fail_closed)",
                                   registry=registry)
        self.key_cache_served = Counter(
            "tureen_gateway_key_cache_served", "Keys accepted from the in-process cache while Redis was unreachable",
            registry=registry)
        self.token_budget_breaches = Counter(
            "tureen_gateway_token_budget_breaches", "Requests from keys over their rolling token budget",
            [*tenant, "action"], registry=registry)
        self.token_budget_usage = TokenBudgetUsage(self.label_name, token_budget_window_s)
        registry.register(self.token_budget_usage)

    def tenant(self, principal: Principal | None) -> str:
        if principal is None or self.label_name is None:
            return NO_TENANT
        value = principal.team_id if self.label_name == "team" else principal.key_alias
        return value or NO_TENANT

    def _tenant_labels(self, principal: Principal | None) -> list[str]:
        return [self.tenant(principal)] if self.label_name else []

    def record_usage(self, principal: Principal | None, usage: dict | None, cost: float | None) -> None:
        labels = self._tenant_labels(principal)
        if usage:
            self.tokens.labels(*labels, "prompt").inc(_nonneg(usage.get("prompt_tokens")))
            self.tokens.labels(*labels, "completion").inc(_nonneg(usage.get("completion_tokens")))
        if cost:
            spend = self.spend.labels(*labels) if labels else self.spend
            spend.inc(max(0.0, float(cost)))

    def breach(self, principal: Principal | None, action: str) -> None:
        self.token_budget_breaches.labels(*self._tenant_labels(principal), action).inc()


def _nonneg(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
