"""``tureen_gateway_cache_*``: per tier (exact, semantic) and public model. The names of hits and
lookups are fixed: deploy/prometheus rules and the Grafana dashboard read them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

LOOKUP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        tm = ["tier", "model"]
        self.lookups = Counter("tureen_gateway_cache_lookups", "Cache lookups, by tier and public model.", tm,
                               registry=registry)
        self.hits = Counter("tureen_gateway_cache_hits", "Requests answered from the cache, by tier and model.",
                            tm, registry=registry)
        self.stores = Counter("tureen_gateway_cache_stores", "Responses stored in the cache.", tm,
                              registry=registry)
        self.evictions = Counter("tureen_gateway_cache_evictions", "Entries removed by the gateway (per-tenant "
                                 "size cap, expiry sweep, admin flush).", [*tm, "reason"], registry=registry)
        self.lookup_seconds = Histogram("tureen_gateway_cache_lookup_seconds", "Time of one cache lookup "
                                        "(the semantic tier's includes the embedding).", tm,
                                        buckets=LOOKUP_BUCKETS, registry=registry)
        self.embedding_seconds = Histogram("tureen_gateway_cache_embedding_seconds", "Time to embed one "
                                           "request's text (queueing and batching included).", ["model"],
                                           buckets=LOOKUP_BUCKETS, registry=registry)
        self.embedding_batch = Histogram("tureen_gateway_cache_embedding_batch_size", "Texts per embedding "
                                         "batch.", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry)
        self.similarity = Histogram("tureen_gateway_cache_similarity", "Cosine similarity of the nearest "
                                    "semantic entry.", ["model"],
                                    buckets=(0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0), registry=registry)
        self.rejected = Counter("tureen_gateway_cache_verification_rejects", "Semantic candidates above the "
                                "threshold that verification refused, by check.", ["model", "check"],
                                registry=registry)
        self.saved_tokens = Counter("tureen_gateway_cache_saved_tokens", "Tokens not generated upstream thanks "
                                    "to hits (the cached responses' usage).", [*tm, "kind"], registry=registry)
        self.saved_cost = Counter("tureen_gateway_cache_saved_cost", "Cost saved by hits, at the deployment's "
                                  "prices (input_cost_per_token, output_cost_per_token).", tm, registry=registry)
        self.skipped = Counter("tureen_gateway_cache_skipped", "Requests that bypassed the cache, by reason "
                               "(not_deterministic, no_cache, call_type).", ["model", "reason"], registry=registry)
        self.errors = Counter("tureen_gateway_cache_errors", "Cache operations that failed (the tier was "
                              "skipped; the request went on).", ["tier", "operation"], registry=registry)
