"""Virtual keys: generation, storage as SHA-256 hashes, verification, and the auth step.

A key is ``sk-`` plus 43 URL-safe random characters (256 bits from ``secrets``). It is returned
once, by ``/key/generate``; the store holds only ``sha256(key)`` (LiteLLM calls that hash the key's
``token``) and the record below. The master key is compared with ``hmac.compare_digest``; a record
found by hash is checked against the computed hash with ``compare_digest`` too. No key, nor any
part of one, is put in a log line, a metric label, an error message or the store.

A verified record is reused for ``key_lookup_ttl_s`` (2 s) without asking the store, so a hot key
costs no lookup round trip; changes made through another gateway take effect within that time.
When the store is unreachable, keys verified within the last ``key_cache_ttl_s`` seconds keep
working from the same in-process cache; any other key gets a 503 (an unverifiable key is never let in,
whatever the Redis failure mode: ``fail_open`` relaxes limits, never authentication).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.requests import Request
from starlette.responses import Response

from tureen.gateway.accounting import EveryLog, PolicyMetrics
from tureen.gateway.config import GatewayConfig, parse_duration
from tureen.gateway.pipeline import Principal, RequestContext
from tureen.gateway.redis_store import PolicyStore, StoreUnavailable
from tureen.server.errors import UNAVAILABLE, APIError

KEY_PREFIX = "sk-"
ALL_MODELS = "all-proxy-models"  # LiteLLM's spelling of "every model"
_HASH = re.compile(r"[0-9a-f]{64}")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def token_of(value: str) -> str:
    """A key or its hash (LiteLLM's admin API accepts either) -> the hash."""
    return value if _HASH.fullmatch(value) else hash_key(value)


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()


def _check_duration(value: str | None) -> str | None:
    if value is not None:
        parse_duration(value)
    return value


class KeyFields(BaseModel):
    """The settable fields of a key, in LiteLLM's names (unknown LiteLLM fields are accepted and ignored)."""

    model_config = ConfigDict(extra="ignore")

    models: list[str] | None = None
    max_budget: float | None = Field(None, ge=0)
    budget_duration: str | None = None
    rpm_limit: int | None = Field(None, ge=1)
    tpm_limit: int | None = Field(None, ge=1)
    max_parallel_requests: int | None = Field(None, ge=1)
    max_prompt_tokens: int | None = Field(None, ge=1)
    model_rpm_limit: dict[str, int] | None = None  # per public model, on top of rpm_limit (LiteLLM's names)
    model_tpm_limit: dict[str, int] | None = None
    duration: str | None = None  # validity from now: "30d", "1h"; None = never expires
    key_alias: str | None = Field(None, min_length=1, max_length=256)
    team_id: str | None = Field(None, min_length=1, max_length=256)
    user_id: str | None = None
    metadata: dict[str, Any] | None = None
    blocked: bool | None = None

    @field_validator("budget_duration", "duration")
    @classmethod
    def _durations(cls, value: str | None) -> str | None:
        return _check_duration(value)


class GenerateKeyRequest(KeyFields):
    key: str | None = Field(None, min_length=16, description="a key of your own choosing (must start with sk-)")

    @field_validator("key")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(KEY_PREFIX):
            raise ValueError("a custom key must start with 'sk-'")
        return value


class UpdateKeyRequest(KeyFields):
    key: str = Field(min_length=1, description="the key, or its SHA-256 hash (the 'token')")


class DeleteKeyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    keys: list[str] = Field(default_factory=list)
    key_aliases: list[str] = Field(default_factory=list)


class KeyRecord(BaseModel):
    """What the store keeps for a key: never the key itself."""

    token: str  # sha256 hex of the key
    key_alias: str | None = None
    team_id: str | None = None
    user_id: str | None = None
    models: list[str] = Field(default_factory=list)  # empty = every model
    max_budget: float | None = None
    budget_duration: str | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    max_prompt_tokens: int | None = None
    model_rpm_limit: dict[str, int] = Field(default_factory=dict)
    model_tpm_limit: dict[str, int] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    expires: float | None = None  # unix seconds
    created_at: float
    updated_at: float
    blocked: bool = False

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def allowed_models(self) -> frozenset[str] | None:
        if not self.models or ALL_MODELS in self.models:
            return None
        return frozenset(self.models)

    def public(self) -> dict[str, Any]:
        """LiteLLM's key fields, with timestamps as ISO 8601."""
        data = self.model_dump()
        data.update(expires=iso(self.expires), created_at=iso(self.created_at), updated_at=iso(self.updated_at))
        return data


@dataclass
class KeyPrincipal(Principal):
    """A principal that knows its key's record (limits, budget) and whether it is the admin."""

    record: KeyRecord | None = None
    admin: bool = False


class KeyCache:
    """Recently verified key hashes -> records. Bounded (LRU), with two ages:

    - ``lookup_ttl_s`` (short): a record verified this recently is used without asking the store, so a
      hot key costs no round trip. Changes made through ANOTHER gateway take effect within it; this
      gateway's own admin calls drop the entry at once.
    - ``ttl_s`` (``key_cache_ttl_s``): while the store is unreachable, records verified this recently
      keep working.
    """

    def __init__(self, ttl_s: float, lookup_ttl_s: float = 0.0, max_entries: int = 100_000,
                 clock=time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.lookup_ttl_s = lookup_ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[KeyRecord, float]] = OrderedDict()

    def put(self, record: KeyRecord) -> None:
        self._entries[record.token] = (record, self._clock())
        self._entries.move_to_end(record.token)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, token: str, max_age_s: float | None = None) -> KeyRecord | None:
        entry = self._entries.get(token)
        if entry is None or self._clock() - entry[1] > (self.ttl_s if max_age_s is None else max_age_s):
            return None
        return entry[0]

    def fresh(self, token: str) -> KeyRecord | None:
        return self.get(token, self.lookup_ttl_s) if self.lookup_ttl_s > 0 else None

    def drop(self, token: str) -> None:
        self._entries.pop(token, None)


def unauthorized(message: str, code: str = "invalid_api_key") -> APIError:
    return APIError(401, message, code=code)


def unavailable(message: str, retry_after: float = 2.0) -> APIError:
    return APIError(503, message, UNAVAILABLE, code="policy_store_unavailable", retry_after=retry_after)


def bearer_key(request: Request) -> str | None:
    """The key from ``Authorization: Bearer``, or the ``x-api-key`` / ``api-key`` headers some SDKs send."""
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    for header in ("x-api-key", "api-key"):
        if request.headers.get(header):
            return request.headers[header].strip()
    return None


def spend_name(scope: str, ident: str) -> str:
    """The store's name for a scope's spend: ``spend:key:<hash>`` or ``spend:team:<team_id>``."""
    return f"spend:{scope}:{ident}"


class KeyService:
    """Key lifecycle on the store, and verification with the outage cache."""

    def __init__(self, store: PolicyStore, config: GatewayConfig, metrics: PolicyMetrics, clock=time.time) -> None:
        self.store = store
        self.defaults = config.tureen_settings.default_key_limits
        settings = config.tureen_settings
        self.cache = KeyCache(settings.key_cache_ttl_s, settings.key_lookup_ttl_s)
        self.metrics = metrics
        self._clock = clock
        self._outage_log = EveryLog(60.0)
        self._corrupt_log = EveryLog(60.0)

    # ---- lifecycle (admin API) -------------------------------------------------------------
    async def generate(self, request: GenerateKeyRequest) -> tuple[str, KeyRecord]:
        key = request.key or new_key()
        token = hash_key(key)
        if await self.store.get_key(token) is not None:
            raise APIError(400, "a key with this value already exists", param="key", code="key_exists")
        now = self._clock()
        fields = request.model_dump(exclude={"key", "duration"}, exclude_unset=True)
        for name, value in self.defaults.model_dump().items():  # tureen_settings.default_key_limits
            if name in KeyRecord.model_fields and fields.get(name) is None and value is not None:
                fields[name] = value
        fields = {k: v for k, v in fields.items() if v is not None}
        record = KeyRecord(token=token, created_at=now, updated_at=now, **fields)
        record.expires = now + parse_duration(request.duration) if request.duration else None
        if record.key_alias:
            await self._claim_alias(record.key_alias, token)
        await self.store.put_key(token, record.model_dump(), created=now)
        if record.budget_duration:
            await self.store.start_budget_period(spend_name("key", token), parse_duration(record.budget_duration))
        return key, record

    async def _claim_alias(self, alias: str, token: str) -> None:
        holder = await self.store.claim_alias(alias, token)
        if holder is not None and await self.store.get_key(holder) is None:
            # a stale binding (a creation that failed half-way, a record deleted by hand): take the alias over
            await self.store.release_alias(alias, holder)
            holder = await self.store.claim_alias(alias, token)
        if holder is not None:
            raise APIError(400, f"key_alias {alias!r} is already used by another key", param="key_alias",
                           code="key_alias_exists")

    async def record(self, token: str) -> KeyRecord | None:
        try:
            raw = await self.store.get_key(token)
            return KeyRecord.model_validate(raw) if raw else None
        except ValueError:  # a record that is not JSON or not a key (written by hand?): treat as unknown, say so
            self._corrupt_log.error("key record tureen:key:%s... is unreadable; the key is refused", token[:12])
            return None

    async def require(self, key_or_token: str) -> KeyRecord:
        token = token_of(key_or_token)
        record = await self.record(token)
        if record is None:
            raise APIError(404, f"no key with token {token}", param="key", code="key_not_found")
        return record

    async def info(self, record: KeyRecord) -> dict[str, Any]:
        return (await self.infos([record]))[0]

    async def infos(self, records: list[KeyRecord]) -> list[dict[str, Any]]:
        """LiteLLM's key fields plus ``spend`` (this budget period), ``total_spend`` and ``budget_reset_at``."""
        spends = await self.store.spends([spend_name("key", r.token) for r in records])
        out = []
        for record, spend in zip(records, spends):
            data = record.public()
            data.update(spend=spend.spend, total_spend=spend.total_spend, budget_reset_at=iso(spend.reset_at))
            out.append(data)
        return out

    async def update(self, request: UpdateKeyRequest) -> KeyRecord:
        record = await self.require(request.key)
        changes = request.model_dump(exclude={"key", "duration"}, exclude_unset=True)
        if "key_alias" in changes and changes["key_alias"] != record.key_alias:
            if changes["key_alias"]:
                await self._claim_alias(changes["key_alias"], record.token)
            if record.key_alias:
                await self.store.release_alias(record.key_alias, record.token)
        now = self._clock()
        if "metadata" in changes and changes["metadata"] is None:
            changes["metadata"] = {}
        for name, empty in (("models", []), ("model_rpm_limit", {}), ("model_tpm_limit", {})):
            if name in changes and changes[name] is None:
                changes[name] = empty
        updated = record.model_copy(update={**changes, "updated_at": now})
        if "duration" in request.model_fields_set:
            updated.expires = now + parse_duration(request.duration) if request.duration else None
        updated = KeyRecord.model_validate(updated.model_dump())
        await self.store.put_key(record.token, updated.model_dump(), created=record.created_at)
        if "budget_duration" in changes and changes["budget_duration"] != record.budget_duration:
            period = parse_duration(updated.budget_duration) if updated.budget_duration else None
            await self.store.start_budget_period(spend_name("key", record.token), period)
        self.cache.drop(record.token)
        return updated

    async def delete(self, request: DeleteKeyRequest) -> list[str]:
        tokens = [token_of(k) for k in request.keys]
        for alias in request.key_aliases:
            tokens += [r.token for r in await self.all_records() if r.key_alias == alias]
        deleted = []
        for token in dict.fromkeys(tokens):
            record = await self.record(token)
            if record is None:
                continue
            await self.store.delete_key(token)
            if record.key_alias:
                await self.store.release_alias(record.key_alias, token)
            self.cache.drop(token)
            deleted.append(token)
        return deleted

    async def records(self, tokens: list[str]) -> list[KeyRecord]:
        """The readable records of ``tokens``, in order (a few round trips, whatever their number)."""
        out = []
        for raw in await self.store.get_keys(tokens):
            try:
                out.append(KeyRecord.model_validate(raw))
            except ValueError:
                continue  # deleted meanwhile (None) or unreadable
        return out

    async def all_records(self) -> list[KeyRecord]:
        tokens, _ = await self.store.list_keys(0, 1 << 30)
        return await self.records(tokens)

    # ---- verification (every request) ------------------------------------------------------
    async def verify(self, key: str) -> KeyRecord | None:
        """The key's record (None: unknown). Raises ``StoreUnavailable`` when neither store nor cache knows."""
        token = hash_key(key)
        cached = self.cache.fresh(token)
        if cached is not None:
            return cached
        try:
            record = await self.record(token)
        except StoreUnavailable:
            cached = self.cache.get(token)
            if cached is None:
                self._outage_log.warning("policy store unreachable: keys not verified in the last %g s are "
                                         "refused with 503", self.cache.ttl_s)
                raise
            self.metrics.key_cache_served.inc()
            return cached
        if record is None or not hmac.compare_digest(record.token, token):
            self.cache.drop(token)
            return None
        self.cache.put(record)
        return record


class AuthStep:
    """First pipeline step: who is calling, and may they use this model? 401 / 403 / 503 answers."""

    name = "auth"

    def __init__(self, keys: KeyService, config: GatewayConfig, metrics: PolicyMetrics) -> None:
        self.keys = keys
        master = config.general_settings.master_key
        self._master = master.get_secret_value().encode() if master else None
        self.required = config.keys_required
        self.metrics = metrics

    def is_master(self, key: str | None) -> bool:
        return bool(key and self._master and hmac.compare_digest(key.encode(), self._master))

    async def authenticate(self, request: Request) -> KeyPrincipal | Response:
        key = bearer_key(request)
        if self.is_master(key):
            return KeyPrincipal(key_hash=hash_key(key), key_alias="master_key", team_id=None, allowed_models=None,
                                metadata={}, admin=True)
        try:
            record = await self.keys.verify(key) if key else None
        except StoreUnavailable:
            if not self.required:
                return _anonymous()
            self.metrics.auth_failures.labels("store_unavailable").inc()
            return unavailable("The gateway cannot verify API keys right now (its key store is unreachable); "
                               "retry shortly.").response()
        failure = self._failure(key, record)
        if failure is None:
            return KeyPrincipal(key_hash=record.token, key_alias=record.key_alias, team_id=record.team_id,
                                allowed_models=record.allowed_models(), metadata=dict(record.metadata), record=record)
        if not self.required:
            return _anonymous()
        self.metrics.auth_failures.labels(failure.code).inc()
        return failure.response()

    def _failure(self, key: str | None, record: KeyRecord | None) -> APIError | None:
        if key is None:
            return unauthorized("No API key provided. Send it as 'Authorization: Bearer sk-...'.", "missing_api_key")
        if record is None:
            return unauthorized("Invalid API key.")
        if record.expired(time.time()):
            return unauthorized(f"The API key{_alias(record)} expired at {iso(record.expires)}.", "expired_api_key")
        if record.blocked:
            return unauthorized(f"The API key{_alias(record)} is blocked.", "blocked_api_key")
        return None

    async def before(self, ctx: RequestContext) -> Response | None:
        principal = await self.authenticate(ctx.request)
        if isinstance(principal, Response):
            return principal
        ctx.principal = principal
        if not principal.may_use(ctx.model):
            self.metrics.auth_failures.labels("model_not_allowed").inc()
            return APIError(403, f"The API key{_alias(principal.record)} may not use model {ctx.model!r}; it may use: "
                                 f"{', '.join(sorted(principal.allowed_models or ()))}.",
                            "permission_error", param="model", code="model_not_allowed").response()
        return None

    async def after(self, ctx: RequestContext) -> None:
        return None


def _anonymous() -> KeyPrincipal:
    return KeyPrincipal(key_hash=None, key_alias=None, team_id=None, allowed_models=None, metadata={})


def _alias(record: KeyRecord | None) -> str:
    return f" '{record.key_alias}'" if record is not None and record.key_alias else ""
