"""Deployments (one upstream each, with its live state) and the one pooled HTTP client to reach them."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from tureen.gateway.breaker import BreakerPolicy, BreakerState, CircuitBreaker
from tureen.gateway.config import OPENAI_API_BASE, WILDCARD, GatewayConfig, ModelEntry

CONNECT_TIMEOUT_S = 5.0


@dataclass
class Deployment:
    """One entry of ``model_list``: where it is, what it costs, and how it is doing right now."""

    id: str
    model_name: str  # the public name
    upstream_model: str  # the name sent upstream ("*" forwards the requested name)
    api_base: str  # ends in /v1: the OpenAI routes hang below it
    root: str  # the server root: /health and /metrics hang below it
    headers: dict[str, str]
    tier: str
    weight: float
    max_parallel: int | None
    input_cost_per_token: float
    output_cost_per_token: float
    timeout: float
    stream_timeout: float
    breaker: CircuitBreaker
    tokenizer: str | None = None
    accepts_cache_salt: bool = True  # vLLM's cache_salt field may be sent (not to OpenAI's own API)
    inflight: int = 0
    healthy: bool = True
    num_waiting: float = 0.0  # scraped vllm:num_requests_waiting
    kv_cache_usage: float = 0.0  # scraped vllm:kv_cache_usage_perc
    shedding_until: float = 0.0  # monotonic time until which a 503 from it counts as "shedding"
    requests: int = 0  # sent by this gateway, for tests and logs
    rpm: int | None = None
    tpm: int | None = None
    window: deque = field(default_factory=deque)  # (monotonic time, tokens) of requests sent in the last minute

    def at_capacity(self) -> bool:
        """At ``max_parallel_requests``, or over its ``rpm``/``tpm`` from this gateway in the last 60 s."""
        if self.max_parallel is not None and self.inflight >= self.max_parallel:
            return True
        if self.rpm is None and self.tpm is None:
            return False
        self._prune()
        if self.rpm is not None and len(self.window) >= self.rpm:
            return True
        return self.tpm is not None and sum(tokens for _, tokens in self.window) >= self.tpm

    def count_request(self, tokens: int) -> list:
        """Record a request sent now; returns its window entry, whose token count is corrected later."""
        entry = [time.monotonic(), tokens]
        if self.rpm is not None or self.tpm is not None:
            self.window.append(entry)
        return entry

    def _prune(self) -> None:
        cutoff = time.monotonic() - 60.0
        while self.window and self.window[0][0] < cutoff:
            self.window.popleft()

    def shedding(self) -> bool:
        return time.monotonic() < self.shedding_until

    def routable(self) -> bool:
        return self.healthy and self.breaker.available()

    def model_for(self, requested: str) -> str:
        return requested if self.upstream_model == WILDCARD else self.upstream_model

    def cost(self, usage: dict | None) -> float | None:
        if not usage:
            return None
        prompt = usage.get("prompt_tokens") or 0
        completion = usage.get("completion_tokens") or 0
        return prompt * self.input_cost_per_token + completion * self.output_cost_per_token


def split_api_base(api_base: str | None, model: str) -> tuple[str, str]:
    """``(api_base ending in /v1, server root)``. ``openai/`` without a base means OpenAI itself."""
    base = (api_base or (OPENAI_API_BASE if model.startswith("openai/") else "http://127.0.0.1:8000")).rstrip("/")
    if base.endswith("/v1"):
        return base, base[: -len("/v1")]
    return base + "/v1", base


def build_deployments(config: GatewayConfig, on_breaker_change=None) -> list[Deployment]:
    breaker_policy = BreakerPolicy(
        consecutive_failures=config.breaker_failures, failure_rate=config.tureen_settings.circuit_breaker.failure_rate,
        window_s=config.tureen_settings.circuit_breaker.window_s,
        min_requests=config.tureen_settings.circuit_breaker.min_requests, cooldown_s=config.breaker_cooldown_s)
    deployments: list[Deployment] = []
    taken: set[str] = set()
    for entry in config.model_list:
        dep_id = _deployment_id(entry, taken)
        taken.add(dep_id)
        deployments.append(_deployment(entry, dep_id, config, breaker_policy, on_breaker_change))
    _set_weights(config.model_list, deployments)
    return deployments


def _set_weights(entries: list[ModelEntry], deployments: list[Deployment]) -> None:
    """LiteLLM's ``simple-shuffle`` basis, chosen per public model so units never mix: ``weight`` when any of
    its deployments sets one, else ``rpm``, else ``tpm``, else equal. A deployment that lacks the chosen field
    gets the mean of those that have it (an even share, where LiteLLM would never pick it)."""
    groups: dict[str, list[tuple[ModelEntry, Deployment]]] = {}
    for entry, d in zip(entries, deployments):
        groups.setdefault(entry.model_name, []).append((entry, d))
    for members in groups.values():
        values = [_basis_values(members, basis) for basis in ("weight", "rpm", "tpm")]
        chosen = next((v for v in values if any(x is not None for x in v)), [1.0] * len(members))
        given = [x for x in chosen if x is not None]
        for (_, d), value in zip(members, chosen):
            d.weight = float(value if value is not None else sum(given) / len(given))


def _basis_values(members: list[tuple[ModelEntry, Deployment]], basis: str) -> list[float | None]:
    params = [entry.litellm_params for entry, _ in members]
    if basis == "weight":
        return [p.weight if "weight" in p.model_fields_set else None for p in params]
    return [getattr(p, basis) for p in params]


def _deployment(entry: ModelEntry, dep_id: str, config: GatewayConfig, policy: BreakerPolicy,
                on_breaker_change) -> Deployment:
    params = entry.litellm_params
    api_base, root = split_api_base(params.api_base, params.model)
    headers = {"content-type": "application/json", "accept-encoding": "identity"}
    if params.api_key is not None:
        headers["authorization"] = f"Bearer {params.api_key.get_secret_value()}"
    timeout = params.timeout or config.timeout
    callback = (lambda state, d=dep_id: on_breaker_change(d, state)) if on_breaker_change else None
    return Deployment(
        id=dep_id, model_name=entry.model_name, upstream_model=params.upstream_model, api_base=api_base, root=root,
        headers=headers, tier=entry.tureen_params.tier, weight=1.0,  # _set_weights: per model
        max_parallel=params.max_parallel_requests, rpm=params.rpm, tpm=params.tpm,
        input_cost_per_token=params.input_cost_per_token, output_cost_per_token=params.output_cost_per_token,
        timeout=timeout, stream_timeout=params.stream_timeout or timeout, tokenizer=entry.tureen_params.tokenizer,
        accepts_cache_salt=_accepts_cache_salt(entry, api_base),
        breaker=CircuitBreaker(policy, on_change=callback))


def _accepts_cache_salt(entry: ModelEntry, api_base: str) -> bool:
    """``tureen_params.cache_salt`` when set; else every upstream but OpenAI's API (it refuses unknown fields)."""
    explicit = entry.tureen_params.cache_salt
    if explicit is not None:
        return explicit
    return urlsplit(api_base).hostname != urlsplit(OPENAI_API_BASE).hostname


def _deployment_id(entry: ModelEntry, taken: set[str]) -> str:
    if entry.model_info.id:
        base = entry.model_info.id
    else:
        params = entry.litellm_params
        netloc = urlsplit(split_api_base(params.api_base, params.model)[0]).netloc
        base = f"{entry.model_name}@{netloc}"
    dep_id, n = base, 1
    while dep_id in taken:
        n += 1
        dep_id = f"{base}#{n}"
    return dep_id


class UpstreamError(Exception):
    """The upstream could not be reached or dropped the connection."""


class UpstreamTimeout(UpstreamError):
    """No byte from the upstream within the deployment's timeout."""


class UpstreamResponse:
    """An upstream answer whose status and headers arrived; the body is read by the caller."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status_code = response.status
        self.headers = response.headers  # case-insensitive

    async def aread(self) -> bytes:
        try:
            return await self._response.read()
        except (TimeoutError, asyncio.TimeoutError):
            raise UpstreamTimeout() from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamError() from None

    async def next_chunk(self) -> bytes:
        """The next piece of the body as it arrived (de-chunked, not re-framed); b"" at its end."""
        try:
            return await self._response.content.readany()
        except (TimeoutError, asyncio.TimeoutError):
            raise UpstreamTimeout() from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamError() from None

    async def aclose(self) -> None:
        """Return the connection to the pool when the body was read, else close it (the upstream aborts)."""
        if self._response.content.is_eof():
            self._response.release()
        else:
            self._response.close()


class UpstreamClient:
    """The one pooled async HTTP client every upstream call goes through (aiohttp: its C HTTP parser and
    simple pool cost a fraction of httpx's per chunk, which is most of the gateway's work)."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # created inside the running loop
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0, keepalive_timeout=30,
                                             ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False,
                                                  skip_auto_headers=("User-Agent",))
        return self._session

    async def open(self, deployment: Deployment, path: str, content: bytes, stream: bool) -> UpstreamResponse:
        """POST and return once the status and headers arrived."""
        read = deployment.stream_timeout if stream else deployment.timeout
        timeout = aiohttp.ClientTimeout(total=None, connect=min(CONNECT_TIMEOUT_S, read), sock_read=read)
        try:
            response = await self.session.post(deployment.api_base + path, data=content, headers=deployment.headers,
                                               timeout=timeout, allow_redirects=False)
        except (TimeoutError, asyncio.TimeoutError):
            raise UpstreamTimeout() from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamError() from None
        return UpstreamResponse(response)

    async def get(self, url: str, timeout: float, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """A small GET (health, metrics, models): ``(status, body)``; raises UpstreamError."""
        try:
            async with self.session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                return r.status, await r.read()
        except (TimeoutError, asyncio.TimeoutError):
            raise UpstreamTimeout() from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamError() from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


__all__ = ["BreakerState", "Deployment", "UpstreamClient", "UpstreamError", "UpstreamResponse", "UpstreamTimeout",
           "build_deployments", "split_api_base"]
