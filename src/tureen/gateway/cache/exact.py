"""The exact tier: one Redis string per (tenant, model, canonical request), expiring by TTL.

Keys are ``<namespace>tureen:cache:x:<tenant hash>:<model hash>:<request sha256>``: a tenant's or a
model's entries are found by a SCAN pattern for the admin flush, and no tenant or key appears in
clear text in Redis.
"""

from __future__ import annotations

import hashlib
import time

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tureen.gateway.cache.degrade import Degrader
from tureen.gateway.cache.entry import Entry
from tureen.gateway.cache.keys import CacheRequest
from tureen.gateway.cache.settings import EXACT, CacheParams


def short(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


class ExactTier:
    name = EXACT

    def __init__(self, url: str, params: CacheParams, degrader: Degrader) -> None:
        self.prefix = f"{params.namespace or ''}tureen:cache:x:"
        self.degrader = degrader
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=64, timeout=params.socket_timeout_s, socket_timeout=params.socket_timeout_s,
            socket_connect_timeout=params.socket_timeout_s, retry=Retry(NoBackoff(), 0))
        self._redis = aioredis.Redis(connection_pool=pool)

    def _key(self, req: CacheRequest) -> str:
        return f"{self.prefix}{short(req.tenant)}:{short(req.model)}:{req.key}"

    async def lookup(self, req: CacheRequest) -> tuple[Entry, dict[str, str]] | None:
        raw = await self.degrader.run("lookup", lambda: self._redis.get(self._key(req)))
        if raw is None:
            return None
        entry = Entry.loads(raw)
        if req.controls.s_maxage is not None and time.time() - entry.stored_at > req.controls.s_maxage:
            return None
        return entry, {}

    async def store(self, req: CacheRequest, entry: Entry, ttl: float) -> bool:
        await self.degrader.run("store", lambda: self._redis.set(self._key(req), entry.dumps(),
                                                                 px=max(1, int(ttl * 1000))))
        return True

    async def flush(self, tenant: str | None, model: str | None) -> int:
        pattern = f"{self.prefix}{short(tenant) if tenant else '*'}:{short(model) if model else '*'}:*"

        async def scan_and_delete() -> int:
            removed, batch = 0, []
            async for key in self._redis.scan_iter(match=pattern, count=500):
                batch.append(key)
                if len(batch) >= 500:
                    removed += await self._redis.unlink(*batch)
                    batch = []
            if batch:
                removed += await self._redis.unlink(*batch)
            return removed
        return await self.degrader.run("flush", scan_and_delete)

    async def aclose(self) -> None:
        await self._redis.aclose()
