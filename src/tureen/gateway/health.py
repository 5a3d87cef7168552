"""Active health checks and load scraping, one background task each.

Every ``health_check.interval_s`` the gateway GETs each deployment's ``/health``: a connection
error, a timeout or a 5xx (``tureen serve`` answers 503 while it loads or drains) marks it
unhealthy until a check passes again. Every ``metrics_scrape_interval_s`` it reads the upstream's
``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc`` from ``/metrics``, the tie-breakers
of the least-busy strategy. Upstreams without those metrics (a hosted API) just keep zeros.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from prometheus_client.parser import text_string_to_metric_families

from tureen.gateway.config import HealthCheckSettings
from tureen.gateway.upstream import Deployment, UpstreamClient, UpstreamError

logger = logging.getLogger("tureen.gateway")

SCRAPED = {"vllm:num_requests_waiting": "num_waiting", "vllm:kv_cache_usage_perc": "kv_cache_usage"}


class HealthMonitor:
    def __init__(self, deployments: Sequence[Deployment], client: UpstreamClient, settings: HealthCheckSettings,
                 on_health: Callable[[Deployment], None] | None = None) -> None:
        self.deployments = list(deployments)
        self.client = client
        self.settings = settings
        self._on_health = on_health or (lambda d: None)
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._every(self.settings.interval_s, self.check_all)),
                       asyncio.create_task(self._every(self.settings.metrics_scrape_interval_s, self.scrape_all))]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _every(self, interval: float, job: Callable) -> None:
        while True:
            try:
                await job()
            except Exception:  # a monitoring bug must never stop the loop
                logger.exception("health monitor job failed")
            await asyncio.sleep(interval)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(d) for d in self.deployments))

    async def scrape_all(self) -> None:
        await asyncio.gather(*(self.scrape(d) for d in self.deployments))

    async def check(self, d: Deployment) -> bool:
        try:
            status, _ = await self.client.get(d.root + self.settings.path, self.settings.timeout_s, headers=_auth(d))
            healthy = status < 500
        except UpstreamError:
            healthy = False
        if healthy != d.healthy:
            logger.warning("deployment %s is now %s", d.id, "healthy" if healthy else "unhealthy")
            d.healthy = healthy
            self._on_health(d)
        return healthy

    async def scrape(self, d: Deployment) -> None:
        try:
            status, body = await self.client.get(d.root + "/metrics", self.settings.timeout_s, headers=_auth(d))
            if status != 200:
                return
            values = parse_load(body.decode("utf-8", "replace"))
        except (UpstreamError, ValueError):
            return
        d.num_waiting = values.get("num_waiting", 0.0)
        d.kv_cache_usage = values.get("kv_cache_usage", 0.0)


def parse_load(text: str) -> dict[str, float]:
    """Sum of each scraped gauge over its label sets (one model per upstream in practice)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        attr = SCRAPED.get(family.name)
        if attr is not None:
            values[attr] = sum(sample.value for sample in family.samples)
    return values


def _auth(d: Deployment) -> dict[str, str] | None:
    token = d.headers.get("authorization")
    return {"authorization": token} if token else None
