"""The gateway's configuration: LiteLLM's ``config.yaml`` shape, plus tureen's own ``tureen_settings``.

Everything LiteLLM and tureen share keeps LiteLLM's names (``model_list[].litellm_params``,
``router_settings``, ``general_settings.master_key``...), so a LiteLLM user's file runs unchanged for
those features. Unknown keys anywhere are collected as warnings, never a crash. A bad value raises
``GatewayConfigError`` with one line naming the field. Secrets (``api_key``, ``master_key``) must be
given as ``os.environ/NAME``; they are resolved at load time and held as ``SecretStr``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from tureen.gateway.cache.settings import CacheParams

ENV_PREFIX = "os.environ/"
DEFAULT_UPSTREAM = "http://127.0.0.1:8000"
OPENAI_API_BASE = "https://api.openai.com/v1"
OPENAI_COMPATIBLE_PREFIXES = ("openai/", "hosted_vllm/")
WILDCARD = "*"  # model_name "*" serves any requested name; upstream model "*" forwards it unchanged

STRATEGIES = ("least-busy", "prefix-aware", "round-robin", "weighted")
# LiteLLM's strategy names, mapped to the closest tureen strategy.
STRATEGY_ALIASES = {
    "simple-shuffle": "weighted",
    "usage-based-routing": "least-busy",
    "usage-based-routing-v2": "least-busy",
    "latency-based-routing": "least-busy",
    "cost-based-routing": "least-busy",
}


class GatewayConfigError(ValueError):
    """A config file that cannot be used; the message is one line naming the field."""


class Section(BaseModel):
    """A config section: unknown keys are kept aside (``model_extra``) and reported as warnings."""

    model_config = ConfigDict(extra="allow", validate_default=True)


def parse_duration(text: str | int | float) -> float:
    """LiteLLM's durations: ``30s``, ``10m``, ``1h``, ``7d``, ``1mo`` (30 days), or plain seconds."""
    if isinstance(text, (int, float)):
        if text <= 0:
            raise ValueError("a duration must be positive")
        return float(text)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w|mo)?\s*", str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration like 30s, 10m, 1h, 7d or 1mo")
    unit = {"s": 1, None: 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "mo": 30 * 86400}[match.group(2)]
    return float(match.group(1)) * unit


def resolve_secret(value: Any, *, allow_literal: bool = False) -> SecretStr | None:
    """``os.environ/NAME`` -> the variable's value. Literals are refused unless ``allow_literal``."""
    if value is None or isinstance(value, SecretStr):
        return value
    text = str(value)
    if text.startswith(ENV_PREFIX):
        name = text[len(ENV_PREFIX):]
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set")
        return SecretStr(os.environ[name])
    if not allow_literal:
        raise ValueError("give secrets as os.environ/NAME, never as a literal in the file")
    return SecretStr(text)


class LiteLLMParams(Section):
    """One deployment's upstream, in LiteLLM's names."""

    model: str = Field(description="upstream model name; the openai/ or hosted_vllm/ prefix means OpenAI-compatible")
    api_base: str | None = Field(None, description="upstream URL, e.g. http://127.0.0.1:8001 or .../v1")
    api_key: SecretStr | None = Field(None, description="os.environ/NAME; sent as Bearer to the upstream")
    rpm: int | None = Field(None, ge=1, description="requests per minute this deployment accepts")
    tpm: int | None = Field(None, ge=1, description="tokens per minute this deployment accepts")
    max_parallel_requests: int | None = Field(None, ge=1, description="in-flight cap from this gateway")
    weight: float = Field(1.0, gt=0, description="share of traffic under the weighted strategy")
    input_cost_per_token: float = Field(0.0, ge=0)
    output_cost_per_token: float = Field(0.0, ge=0)
    timeout: float | None = Field(None, gt=0, description="seconds; overrides router_settings.timeout")
    stream_timeout: float | None = Field(None, gt=0, description="seconds to the first byte of a stream")

    @field_validator("api_key", mode="before")
    @classmethod
    def _secret(cls, value: Any) -> SecretStr | None:
        return resolve_secret(value)

    @field_validator("model")
    @classmethod
    def _openai_compatible(cls, value: str) -> str:
        if "/" in value and not value.startswith(OPENAI_COMPATIBLE_PREFIXES):
            raise ValueError(f"{value!r}: tureen talks to OpenAI-compatible upstreams only; use the openai/ or "
                             f"hosted_vllm/ prefix")
        return value

    @field_validator("api_base")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value

    @property
    def upstream_model(self) -> str:
        for prefix in OPENAI_COMPATIBLE_PREFIXES:
            if self.model.startswith(prefix):
                return self.model[len(prefix):]
        return self.model


class TureenParams(Section):
    """tureen's own per-deployment settings."""

    tier: Literal["primary", "overflow"] = Field(
        "primary", description="overflow deployments get traffic only when every primary is full or shedding")
    tokenizer: str | None = Field(None, description="checkpoint dir or hub id used to count prompt tokens")
    cache_salt: bool | None = Field(
        None, description="send the tenant's cache_salt to this deployment (default: yes, except to OpenAI's own "
                          "API, which refuses unknown fields)")


class ModelInfo(Section):
    id: str | None = Field(None, description="the deployment id used in metrics and logs")
    revision: str | None = Field(None, description="the served checkpoint's revision; part of cache keys")


class ModelEntry(Section):
    """One deployment of a public model name."""

    model_name: str = Field(min_length=1)
    litellm_params: LiteLLMParams
    tureen_params: TureenParams = Field(default_factory=TureenParams)
    model_info: ModelInfo = Field(default_factory=ModelInfo)


class RouterSettings(Section):
    routing_strategy: str = Field("least-busy", description="least-busy | prefix-aware | round-robin | weighted")
    num_retries: int = Field(2, ge=0, description="retries after the first attempt, on another deployment if any")
    timeout: float = Field(600.0, gt=0, description="seconds per upstream attempt")
    allowed_fails: int | None = Field(None, ge=0, description="failures tolerated before the breaker opens")
    cooldown_time: float | None = Field(None, gt=0, description="seconds a tripped deployment stays out")
    fallbacks: list[dict[str, list[str]]] = Field(default_factory=list)
    context_window_fallbacks: list[dict[str, list[str]]] = Field(default_factory=list)
    redis_url: str | None = None
    redis_host: str | None = None
    redis_port: int = Field(6379, ge=1, le=65535)
    redis_password: SecretStr | None = None

    @field_validator("redis_password", mode="before")
    @classmethod
    def _secret(cls, value: Any) -> SecretStr | None:
        return resolve_secret(value, allow_literal=True)

    @field_validator("routing_strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        value = STRATEGY_ALIASES.get(value, value)
        if value not in STRATEGIES:
            raise ValueError(f"{value!r} is not one of {', '.join(STRATEGIES)}")
        return value

    def redis_connection_url(self) -> str | None:
        """One Redis URL from either ``redis_url`` or host/port/password; None when Redis is not configured."""
        if self.redis_url:
            return self.redis_url
        if not self.redis_host:
            return None
        auth = f":{self.redis_password.get_secret_value()}@" if self.redis_password else ""
        return f"redis://{auth}{self.redis_host}:{self.redis_port}/0"


class GeneralSettings(Section):
    master_key: SecretStr | None = Field(None, description="os.environ/NAME; protects the admin API")

    @field_validator("master_key", mode="before")
    @classmethod
    def _secret(cls, value: Any) -> SecretStr | None:
        return resolve_secret(value)


class LiteLLMSettings(Section):
    """``num_retries`` and ``request_timeout`` are defaults for router_settings; ``cache`` turns the caches on."""

    num_retries: int | None = Field(None, ge=0)
    request_timeout: float | None = Field(None, gt=0)
    cache: bool = Field(False, description="answer repeated requests from the caches in cache_params")
    cache_params: CacheParams = Field(default_factory=CacheParams)


class KeyLimits(Section):
    """Per-key limits; the defaults for keys created without their own."""

    rpm_limit: int | None = Field(None, ge=1)
    tpm_limit: int | None = Field(None, ge=1)
    max_parallel_requests: int | None = Field(None, ge=1)
    max_prompt_tokens: int | None = Field(None, ge=1)
    max_budget: float | None = Field(None, ge=0)
    budget_duration: str | None = Field(None, description="30s, 10m, 1h, 7d, 1mo")

    @field_validator("budget_duration")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value


class TokenBudget(Section):
    """The runaway-agent guard: tokens per key over a rolling window."""

    tokens: int = Field(50_000, ge=1)
    window_s: float = Field(300.0, gt=0)
    action: Literal["alert", "refuse"] = "alert"


class CircuitBreakerSettings(Section):
    consecutive_failures: int | None = Field(
        None, ge=1, description="open after this many failures in a row (default: allowed_fails + 1, else 5)")
    failure_rate: float = Field(0.5, gt=0, le=1, description="open when this share of the window's requests failed")
    window_s: float = Field(30.0, gt=0)
    min_requests: int = Field(10, ge=1, description="the failure rate counts only with this many requests")
    cooldown_s: float | None = Field(None, gt=0,
                                     description="open -> half-open after (default: cooldown_time, else 30)")


class HealthCheckSettings(Section):
    interval_s: float = Field(5.0, gt=0, description="GET /health on each deployment this often")
    timeout_s: float = Field(2.0, gt=0)
    metrics_scrape_interval_s: float = Field(5.0, gt=0, description="scrape each upstream's /metrics this often")
    path: str = "/health"


class PrefixAwareSettings(Section):
    prefix_chars: int = Field(512, ge=1, description="characters of the prompt hashed to pick a replica")
    load_factor: float = Field(1.25, ge=1.0, description="a replica takes at most this times the mean load")
    virtual_nodes: int = Field(64, ge=1, description="points per replica on the hash ring")


class RetrySettings(Section):
    backoff_base_s: float = Field(0.05, ge=0)
    backoff_max_s: float = Field(2.0, ge=0)
    max_total_s: float = Field(30.0, gt=0, description="no retry starts after this many seconds")


class PromptRegistrySettings(Section):
    """``tureen_settings.prompts``: the prompt registry the gateway renders from (``tureen.prompts``)."""

    registry_path: str | None = Field(None, description="registry directory (in a git work tree); unset: off")
    reload_interval_s: float = Field(1.0, gt=0, description="poll tags.yaml's mtime and git HEAD this often")
    allow_uncertified: Literal["refuse", "warn"] | None = Field(None, description="overrides each prompt.yaml")


class CacheSaltSettings(Section):
    """``tureen_settings.cache_salt``: a per-tenant ``cache_salt`` on every request (``gateway/tenant_salt.py``)."""

    enabled: bool = Field(True, description="salt each tenant's requests so tenants never share prefix-cache blocks")
    scope: Literal["team", "key"] = Field("team", description="a tenant is the key's team_id (else the key), or "
                                                              "every key on its own")
    secret: SecretStr | None = Field(None, description="os.environ/NAME: the HMAC key (default: derived from the "
                                                       "master key); the same on every gateway process")

    @field_validator("secret", mode="before")
    @classmethod
    def _secret(cls, value: Any) -> SecretStr | None:
        return resolve_secret(value)


class AdmitAheadSettings(Section):
    enabled: bool = Field(True, description="admit a key far from its limits before Redis answers (gateway/admit_ahead.py); "
                                            "never with redis_failure_mode: fail_closed")
    headroom: float = Field(0.5, gt=0, le=1, description="only while every limit would stay within this share")
    max_age_s: float = Field(1.0, gt=0, description="only when Redis admitted the same limits this recently")


class TureenSettings(Section):
    require_virtual_keys: bool | None = Field(None, description="default: true when a master_key is set")
    redis_failure_mode: Literal["fail_open", "fail_closed"] = "fail_open"
    key_cache_ttl_s: float = Field(30.0, ge=0, description="recently verified key hashes keep working this long "
                                                           "through a Redis outage")
    key_lookup_ttl_s: float = Field(2.0, ge=0, description="reuse a verified key's record this long without asking "
                                    "Redis; changes made through another gateway take effect within it (0: look "
                                    "every key up)")
    default_key_limits: KeyLimits = Field(default_factory=KeyLimits)
    token_budget: TokenBudget = Field(default_factory=TokenBudget)
    token_estimate_chars_per_token: float = Field(4.0, gt=0)
    circuit_breaker: CircuitBreakerSettings = Field(default_factory=CircuitBreakerSettings)
    health_check: HealthCheckSettings = Field(default_factory=HealthCheckSettings)
    prefix_aware: PrefixAwareSettings = Field(default_factory=PrefixAwareSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    metrics_label_by: Literal["none", "team", "key_alias"] = "none"
    log_prompts: bool = False
    teams: dict[str, KeyLimits] = Field(
        default_factory=dict, description="per-team limits by team_id (rpm_limit, tpm_limit, max_parallel_requests, "
                                          "max_budget, budget_duration); a key's team must also stay within these")
    parallel_lease_s: float = Field(60.0, gt=0, description="a parallel-request slot is leased for this long and "
                                    "renewed while the request runs, so a crashed gateway frees its slots")
    drain_timeout_s: float = Field(30.0, ge=0, description="SIGTERM: wait this long for in-flight requests")
    admit_ahead: AdmitAheadSettings = Field(default_factory=AdmitAheadSettings)
    max_connections: int = Field(1000, ge=1, description="pooled connections to all upstreams together")
    prompts: PromptRegistrySettings = Field(default_factory=PromptRegistrySettings)
    cache_salt: CacheSaltSettings = Field(default_factory=CacheSaltSettings)


class GatewayConfig(Section):
    model_list: list[ModelEntry] = Field(min_length=1)
    router_settings: RouterSettings = Field(default_factory=RouterSettings)
    general_settings: GeneralSettings = Field(default_factory=GeneralSettings)
    litellm_settings: LiteLLMSettings = Field(default_factory=LiteLLMSettings)
    tureen_settings: TureenSettings = Field(default_factory=TureenSettings)

    @model_validator(mode="after")
    def _check_references(self) -> GatewayConfig:
        names = {entry.model_name for entry in self.model_list}
        for field_name in ("fallbacks", "context_window_fallbacks"):
            for i, mapping in enumerate(getattr(self.router_settings, field_name)):
                for source, targets in mapping.items():
                    for target in [source, *targets]:
                        if target not in names and WILDCARD not in names:
                            raise ValueError(f"router_settings.{field_name}.{i}: {target!r} is not a model_name "
                                             f"in model_list")
        return self

    # ---- derived values ---------------------------------------------------------------------
    @property
    def keys_required(self) -> bool:
        explicit = self.tureen_settings.require_virtual_keys
        return explicit if explicit is not None else self.general_settings.master_key is not None

    @property
    def num_retries(self) -> int:
        fallback = self.litellm_settings.num_retries
        if "num_retries" not in self.router_settings.model_fields_set and fallback is not None:
            return fallback
        return self.router_settings.num_retries

    @property
    def timeout(self) -> float:
        if "timeout" not in self.router_settings.model_fields_set and self.litellm_settings.request_timeout:
            return self.litellm_settings.request_timeout
        return self.router_settings.timeout

    @property
    def breaker_failures(self) -> int:
        explicit = self.tureen_settings.circuit_breaker.consecutive_failures
        allowed = self.router_settings.allowed_fails
        return explicit or (allowed + 1 if allowed is not None else 5)

    @property
    def breaker_cooldown_s(self) -> float:
        return self.tureen_settings.circuit_breaker.cooldown_s or self.router_settings.cooldown_time or 30.0

    def fallbacks_for(self, model: str, *, context_window: bool = False) -> list[str]:
        mappings = self.router_settings.context_window_fallbacks if context_window else self.router_settings.fallbacks
        return [target for mapping in mappings for target in mapping.get(model, [])]

    def public_models(self) -> list[str]:
        """The public names, without the wildcard."""
        return list(dict.fromkeys(e.model_name for e in self.model_list if e.model_name != WILDCARD))


def unknown_keys(section: BaseModel, path: str = "") -> list[str]:
    """Dotted paths of every key the schema does not know, depth first."""
    found = [f"{path}{key}" for key in (section.model_extra or {})]
    for name in type(section).model_fields:
        value = getattr(section, name)
        children = value if isinstance(value, list) else [value]
        for i, child in enumerate(children):
            if isinstance(child, BaseModel):
                suffix = f"{name}.{i}." if isinstance(value, list) else f"{name}."
                found += unknown_keys(child, path + suffix)
    return found


def _one_line(exc: ValidationError, source: str) -> str:
    first = exc.errors()[0]
    where = "".join(f"{part}: " for part in [".".join(str(p) for p in first["loc"])] if part)
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{source}: {where}{message}{more}"


SECRET_FIELDS = frozenset({"api_key", "master_key", "redis_password", "secret"})  # resolved by their validators


def resolve_env_refs(value: Any, path: str = "") -> Any:
    """LiteLLM resolves ``os.environ/NAME`` in any value (``api_base``, ``redis_host``, ``redis_port``...), so
    this does too, before validation. Secrets are left to their own validators, which hold them as SecretStr."""
    if isinstance(value, dict):
        return {k: v if k in SECRET_FIELDS else resolve_env_refs(v, f"{path}{k}.") for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_env_refs(v, f"{path}{i}.") for i, v in enumerate(value)]
    if isinstance(value, str) and value.startswith(ENV_PREFIX):
        name = value[len(ENV_PREFIX):]
        if name not in os.environ:
            raise GatewayConfigError(f"{path.rstrip('.')}: environment variable {name} is not set")
        return os.environ[name]
    return value


def parse_config(data: Any, source: str = "config") -> tuple[GatewayConfig, list[str]]:
    """Validate a parsed YAML document; return the config and warnings about unknown keys."""
    if not isinstance(data, dict):
        raise GatewayConfigError(f"{source}: the file must be a YAML mapping with a model_list")
    try:
        data = resolve_env_refs(data)
    except GatewayConfigError as exc:
        raise GatewayConfigError(f"{source}: {exc}") from None
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise GatewayConfigError(_one_line(exc, source)) from None
    warnings = [f"{source}: unknown key {key!r} is ignored" for key in unknown_keys(config)]
    return config, warnings


def load_config(path: str | Path) -> tuple[GatewayConfig, list[str]]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise GatewayConfigError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise GatewayConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_config(data, str(path))


def default_config(api_base: str = DEFAULT_UPSTREAM) -> GatewayConfig:
    """No ``--config``: one local ``tureen serve`` upstream, no keys required, an in-process limiter.

    The wildcard entry (LiteLLM's ``model_name: "*"``) forwards any model name unchanged.
    """
    entry = {"model_name": WILDCARD, "litellm_params": {"model": f"hosted_vllm/{WILDCARD}", "api_base": api_base}}
    config, _ = parse_config({"model_list": [entry]}, "default config")
    return config
