"""The semantic tier: a paraphrase of a question already answered gets the stored answer.

What is embedded (``semantic_text``): by default the last user message; everything before it (the
system prompt, earlier turns) goes into the entry's *scope*, a hash that must match exactly, so the
same question under another system prompt never matches. The scope also holds the model, the
deployments' identity, the prompt version and every other request parameter (the canonical body
without its messages), as for the exact tier.

The store is Qdrant (``qdrant-client``): embedded in this process (in memory, or on disk with
``qdrant_path``) by default, or a server (``qdrant_api_base``) shared by gateway replicas; one code
path. One collection; every search and scroll carries a mandatory filter on the tenant and the
scope, so one tenant never receives another's answer. Entries expire (``expires_at`` in the filter,
and a sweep deletes them), and a tenant keeps at most ``semantic_max_entries_per_tenant`` (the
oldest go first). Qdrant's client is synchronous; its calls run on one worker thread.

A hit needs the cosine similarity at or above ``similarity_threshold`` *and*, with ``verification``,
the checks of ``verify`` to pass (see there why the threshold alone is not enough).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from tureen.gateway.cache.degrade import Degrader
from tureen.gateway.cache.embedding import BatchingEmbedder, load_encoder
from tureen.gateway.cache.entry import Entry
from tureen.gateway.cache.keys import CacheRequest, digest
from tureen.gateway.cache.metrics import CacheMetrics
from tureen.gateway.cache.settings import SEMANTIC, CacheParams
from tureen.gateway.cache.verify import CHECKS, verify

logger = logging.getLogger("tureen.gateway")
CANDIDATES = 3  # nearest entries tried in turn (verification may refuse the first)
SWEEP_INTERVAL_S = 60.0


def _text(part) -> str | None:
    if isinstance(part, str):
        return part
    if isinstance(part, list):  # content parts: text only (an image makes the message not embeddable)
        texts = [p.get("text") for p in part if isinstance(p, dict)]
        return None if any(not isinstance(t, str) for t in texts) else "\n".join(texts)
    return None


def semantic_view(req: CacheRequest, mode: str) -> tuple[str, str] | None:
    """``(text to embed, scope hash)``, or None when the request has nothing to embed."""
    body = req.canonical
    params = {k: v for k, v in body.items() if k not in ("messages", "prompt")}
    if req.endpoint == "completions":
        prompt = body.get("prompt")
        text = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
        context: object = None
        if not isinstance(text, str):
            return None
    else:
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
        if last is None:
            return None
        if mode == "last_user":
            text, context = _text(messages[last].get("content")), [messages[:last], messages[last + 1:]]
        else:
            turns = [m for m in messages if m.get("role") != "system"]
            pieces = [_text(m.get("content")) if m.get("content") is not None else "" for m in turns]
            text = None if any(p is None for p in pieces) else "\n".join(
                f"{m.get('role')}: {p}" for m, p in zip(turns, pieces))
            context = [m for m in messages if m.get("role") == "system"]
        if not text:
            return None
    scope = digest({"model": req.model, "identity": req.identity, "prompt": req.prompt_version,
                    "endpoint": req.endpoint, "params": params, "context": context})
    return text, scope


class VectorStore:
    """Qdrant calls on one worker thread (the client is synchronous; local mode is not thread-safe)."""

    def __init__(self, params: CacheParams, dim: int) -> None:
        from qdrant_client import QdrantClient, models

        self.models = models
        self.collection = params.qdrant_collection_name
        if params.qdrant_api_base:
            key = params.qdrant_api_key.get_secret_value() if params.qdrant_api_key else None
            self.client = QdrantClient(url=params.qdrant_api_base, api_key=key, timeout=params.socket_timeout_s)
        elif params.qdrant_path:
            self.client = QdrantClient(path=params.qdrant_path)
        else:
            self.client = QdrantClient(location=":memory:")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tureen-qdrant")
        self._dim, self._indexed = dim, bool(params.qdrant_api_base)
        self._ready = False  # the collection is made on first use: a server that is down at start-up
        # only degrades the tier until it answers

    def _ensure(self) -> None:
        if self._ready:
            return
        m, dim, indexed = self.models, self._dim, self._indexed
        if not self.client.collection_exists(self.collection):
            self.client.create_collection(self.collection, vectors_config=m.VectorParams(
                size=dim, distance=m.Distance.COSINE))
        for name, schema in (("tenant", m.PayloadSchemaType.KEYWORD), ("scope", m.PayloadSchemaType.KEYWORD),
                             ("model", m.PayloadSchemaType.KEYWORD), ("stored_at", m.PayloadSchemaType.FLOAT),
                             ("expires_at", m.PayloadSchemaType.FLOAT)) if indexed else ():
            try:  # the embedded mode keeps no payload indexes
                self.client.create_payload_index(self.collection, name, schema)
            except Exception:  # already there, or made by another replica at the same time
                pass
        self._ready = True

    async def call(self, fn, *args, **kwargs):
        def run():
            self._ensure()
            return fn(*args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    def filter(self, tenant: str | None = None, scope: str | None = None, model: str | None = None,
               live_at: float | None = None, expired_at: float | None = None):
        m = self.models
        must = [m.FieldCondition(key=k, match=m.MatchValue(value=v))
                for k, v in (("tenant", tenant), ("scope", scope), ("model", model)) if v is not None]
        if live_at is not None:
            must.append(m.FieldCondition(key="expires_at", range=m.Range(gt=live_at)))
        if expired_at is not None:
            must.append(m.FieldCondition(key="expires_at", range=m.Range(lte=expired_at)))
        return m.Filter(must=must)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.client.close()


class SemanticTier:
    name = SEMANTIC

    def __init__(self, params: CacheParams, embedder: BatchingEmbedder, store: VectorStore, metrics: CacheMetrics,
                 degrader: Degrader, clock=time.time) -> None:
        self.params, self.embedder, self.vectors = params, embedder, store
        self.clock = clock  # wall time: entries carry it (stored_at, expires_at) across replicas
        self.metrics, self.degrader = metrics, degrader
        self.checks = CHECKS if params.verification else {}
        self._last_sweep = time.monotonic()

    async def _view(self, req: CacheRequest):
        """``(text, scope, vector)``, embedded once per request (lookup, then store)."""
        if "semantic" not in req.scratch:
            view = semantic_view(req, self.params.semantic_text)
            if view is None:
                req.scratch["semantic"] = None
            else:
                started = time.perf_counter()
                vector = await self.degrader.run("embed", lambda: self.embedder.embed(view[0]))
                self.metrics.embedding_seconds.labels(req.label).observe(time.perf_counter() - started)
                req.scratch["semantic"] = (*view, vector)
        return req.scratch["semantic"]

    async def lookup(self, req: CacheRequest) -> tuple[Entry, dict[str, str]] | None:
        view = await self._view(req)
        if view is None:
            return None
        text, scope, vector = view
        query = self.vectors.filter(tenant=req.tenant, scope=scope, live_at=self.clock())
        found = await self.degrader.run("lookup", lambda: self.vectors.call(
            self.vectors.client.query_points, self.vectors.collection, query=vector.tolist(), query_filter=query,
            limit=CANDIDATES, with_payload=True))
        points = found.points
        if points:
            self.metrics.similarity.labels(req.label).observe(points[0].score)
        for point in points:
            if point.score < self.params.similarity_threshold:
                break
            failed = verify(text, point.payload["text"], self.checks)
            if failed is not None:
                self.metrics.rejected.labels(req.label, failed).inc()
                continue
            entry = Entry.loads(point.payload["entry"])
            if req.controls.s_maxage is not None and self.clock() - entry.stored_at > req.controls.s_maxage:
                continue
            return entry, {"x-tureen-cache-similarity": f"{point.score:.4f}"}
        return None

    async def store(self, req: CacheRequest, entry: Entry, ttl: float) -> bool:
        view = await self._view(req)
        if view is None:
            return False
        text, scope, vector = view
        now = self.clock()
        point_id = str(uuid.uuid5(uuid.NAMESPACE_URL, digest([req.tenant, scope, text])))
        payload = {"tenant": req.tenant, "scope": scope, "model": req.model, "text": text,
                   "entry": entry.dumps().decode(), "stored_at": now, "expires_at": now + ttl}
        point = self.vectors.models.PointStruct(id=point_id, vector=vector.tolist(), payload=payload)
        await self.degrader.run("store", lambda: self.vectors.call(self.vectors.client.upsert, self.vectors.collection,
                                                                 [point]))
        await self.degrader.run("evict", lambda: self._evict(req.tenant, req.label))
        return True

    async def _evict(self, tenant: str, model: str) -> None:
        """Oldest-first beyond the tenant's cap; now and then, a sweep of expired entries."""
        s, cap = self.vectors, self.params.semantic_max_entries_per_tenant
        count = (await s.call(s.client.count, s.collection, count_filter=s.filter(tenant=tenant))).count
        if count > cap:
            oldest, _ = await s.call(s.client.scroll, s.collection, scroll_filter=s.filter(tenant=tenant),
                                     limit=count - cap, order_by=s.models.OrderBy(key="stored_at", direction="asc"),
                                     with_payload=False)
            await s.call(s.client.delete, s.collection, s.models.PointIdsList(points=[p.id for p in oldest]))
            self.metrics.evictions.labels(self.name, model, "size").inc(len(oldest))
        if time.monotonic() - self._last_sweep > SWEEP_INTERVAL_S:
            self._last_sweep = time.monotonic()
            expired = s.filter(expired_at=self.clock())
            n = (await s.call(s.client.count, s.collection, count_filter=expired)).count
            if n:
                await s.call(s.client.delete, s.collection, s.models.FilterSelector(filter=expired))
                self.metrics.evictions.labels(self.name, "all", "ttl").inc(n)

    async def flush(self, tenant: str | None, model: str | None) -> int:
        s = self.vectors
        selected = s.filter(tenant=tenant, model=model)

        async def run() -> int:
            n = (await s.call(s.client.count, s.collection, count_filter=selected)).count
            await s.call(s.client.delete, s.collection, s.models.FilterSelector(filter=selected))
            return n
        return await self.degrader.run("flush", run)

    async def aclose(self) -> None:
        self.embedder.close()
        await asyncio.to_thread(self.vectors.close)


async def build_semantic_tier(params: CacheParams, metrics: CacheMetrics, degrader: Degrader) -> SemanticTier:
    """Load the embedding model (off the event loop) and open the vector store."""
    encoder = await asyncio.to_thread(load_encoder, params.qdrant_semantic_cache_embedding_model,
                                      params.embedding_device, params.embedding_threads)
    logger.info("semantic cache: %s loaded in %.1f s (dim %d), threshold %.2f, verification %s",
                params.qdrant_semantic_cache_embedding_model, encoder.load_seconds, encoder.dim,
                params.similarity_threshold, "on" if params.verification else "off")
    store = await asyncio.to_thread(VectorStore, params, encoder.dim)
    embedder = BatchingEmbedder(encoder, params.embedding_batch_size, metrics.embedding_batch.observe)
    return SemanticTier(params, embedder, store, metrics, degrader)
