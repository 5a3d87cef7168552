"""``litellm_settings.cache`` and ``litellm_settings.cache_params``: the gateway caches' configuration.

LiteLLM's names where the two map (``type``, ``host``/``port``/``password``, ``namespace``, ``ttl``,
``similarity_threshold``, ``qdrant_collection_name``, ``qdrant_api_base``, ``qdrant_api_key``,
``qdrant_semantic_cache_embedding_model``, ``supported_call_types``). tureen's own additions:

- ``type`` may be a list, ``[redis, qdrant-semantic]``, to run both tiers (exact first);
- ``qdrant_path``: the embedded Qdrant on disk (default: in memory); ``qdrant_api_base`` selects a server;
- tenant isolation is always on (team, else key); it is not a setting;
- ``model_ttl``, ``max_entry_bytes``, ``deterministic_only``, ``semantic_text``,
  ``semantic_max_entries_per_tenant``, ``verification``, the embedding's device, batch size and threads.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

EXACT, SEMANTIC = "exact", "semantic"
TIER_TYPES = {"redis": EXACT, "qdrant-semantic": SEMANTIC}
DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# The lowest threshold whose false-hit rate on the shipped pairs is <= 1% with verification on
# (``tureen cache calibrate --pairs src/tureen/gateway/cache/data/pairs.jsonl``, see README).
DEFAULT_SIMILARITY_THRESHOLD = 0.80
CALL_TYPES = {"completion": "chat", "acompletion": "chat", "text_completion": "completions",
              "atext_completion": "completions"}


class CacheParams(BaseModel):
    model_config = ConfigDict(extra="allow", validate_default=True)

    type: list[str] = Field(["redis"], description="redis (exact tier), qdrant-semantic (semantic tier), or a "
                                                    "list of both (tureen): exact first, then semantic")
    host: str | None = Field(None, description="Redis host of the exact tier (default: router_settings' Redis)")
    port: int = Field(6379, ge=1, le=65535)
    password: SecretStr | None = None
    redis_url: str | None = Field(None, description="Redis URL of the exact tier (overrides host/port)")
    namespace: str | None = Field(None, description="prefix of the cache's Redis keys and Qdrant tenants")
    ttl: float = Field(3600.0, gt=0, description="seconds an entry lives (default 1 h)")
    model_ttl: dict[str, float] = Field(default_factory=dict, description="per public model TTL (tureen)")
    max_entry_bytes: int = Field(1 << 20, ge=1, description="responses larger than this are not stored (tureen)")
    supported_call_types: list[str] = Field(["completion", "acompletion", "text_completion", "atext_completion"])
    deterministic_only: bool = Field(True, description="cache only temperature 0, or seed with n=1 (tureen); "
                                                       "false also caches sampled responses")
    similarity_threshold: float = Field(DEFAULT_SIMILARITY_THRESHOLD, gt=0, le=1,
                                        description="cosine similarity a semantic hit needs")
    qdrant_collection_name: str = Field("tureen_semantic_cache", min_length=1)
    qdrant_api_base: str | None = Field(None, description="a Qdrant server (several gateway replicas share it)")
    qdrant_api_key: SecretStr | None = None
    qdrant_path: str | None = Field(None, description="embedded Qdrant on disk (tureen); default: in memory")
    qdrant_semantic_cache_embedding_model: str = Field(
        DEFAULT_EMBEDDING_MODEL, description="a sentence-transformers model id or local directory")
    embedding_device: str = Field("cpu", description="torch device of the embedding model")
    embedding_batch_size: int = Field(32, ge=1, description="texts embedded together under load")
    embedding_threads: int | None = Field(1, ge=1, description="torch threads for embedding (default 1: the "
                                                                "gateway's event loop keeps a core)")
    semantic_text: Literal["last_user", "conversation"] = Field(
        "last_user", description="last_user: embed the last user message; everything before it (system prompt, "
                                 "history) must match exactly by hash. conversation: embed every non-system "
                                 "message; only the system prompt must match by hash")
    semantic_max_entries_per_tenant: int = Field(10_000, ge=1, description="oldest entries are evicted beyond it")
    verification: bool = Field(True, description="check numbers, negations, names and word order before a "
                                                 "semantic hit is served")
    socket_timeout_s: float = Field(0.25, gt=0, description="a slow cache costs a request at most this per call")
    probe_interval_s: float = Field(1.0, gt=0, description="after a cache error, skip that tier this long")

    @field_validator("type", mode="before")
    @classmethod
    def _types(cls, value: Any) -> list[str]:
        values = [value] if isinstance(value, str) else list(value or [])
        for v in values:
            if v not in TIER_TYPES:
                raise ValueError(f"{v!r}: tureen's caches are {' and '.join(TIER_TYPES)}")
        if not values:
            raise ValueError("give at least one cache type")
        return sorted(dict.fromkeys(values), key=list(TIER_TYPES).index)

    @field_validator("password", "qdrant_api_key", mode="before")
    @classmethod
    def _secret(cls, value: Any) -> SecretStr | None:
        from tureen.gateway.config import resolve_secret

        return resolve_secret(value, allow_literal=True)

    @field_validator("supported_call_types")
    @classmethod
    def _call_types(cls, value: list[str]) -> list[str]:
        for v in value:
            if v not in CALL_TYPES and v not in ("embedding", "aembedding", "transcription", "atranscription"):
                raise ValueError(f"{v!r} is not a call type (completion, text_completion, ...)")
        return value

    @field_validator("model_ttl")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        if any(v <= 0 for v in value.values()):
            raise ValueError("every model_ttl must be positive")
        return value

    @property
    def tiers(self) -> list[str]:
        return [TIER_TYPES[t] for t in self.type]

    @property
    def endpoints(self) -> set[str]:
        return {CALL_TYPES[t] for t in self.supported_call_types if t in CALL_TYPES}

    def ttl_for(self, model: str) -> float:
        return self.model_ttl.get(model, self.ttl)
