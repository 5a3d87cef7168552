"""Which deployment answers: tiers and availability in the ``Router``, the choice in a strategy.

The router narrows a model's deployments to those it may use now (healthy, breaker not open, not
excluded by an earlier attempt, below ``max_parallel_requests``), primaries first: overflow
deployments are candidates only when no primary can take the request (every primary is at its
``max_parallel_requests``, shedding with 503, unhealthy or open). The strategy picks one of the
candidates. Strategies are small classes behind one interface, chosen by name from the config.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
from collections.abc import Sequence
from typing import Protocol

from tureen.gateway.config import WILDCARD, GatewayConfig
from tureen.gateway.pipeline import RequestContext
from tureen.gateway.upstream import Deployment


class RoutingStrategy(Protocol):
    name: str

    def choose(self, candidates: Sequence[Deployment], ctx: RequestContext) -> Deployment:
        """Pick one of ``candidates`` (never empty) for the request."""
        ...


class LeastBusy:
    """Fewest in-flight requests from this gateway; ties broken by the upstream's scraped queue and KV usage."""

    name = "least-busy"

    def choose(self, candidates: Sequence[Deployment], ctx: RequestContext) -> Deployment:
        best = min(_load(d) for d in candidates)
        tied = [d for d in candidates if _load(d) == best]
        return tied[0] if len(tied) == 1 else random.choice(tied)


def _load(d: Deployment) -> tuple[int, float, float]:
    return d.inflight, d.num_waiting, d.kv_cache_usage


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._counters: dict[str, itertools.count] = {}

    def choose(self, candidates: Sequence[Deployment], ctx: RequestContext) -> Deployment:
        counter = self._counters.setdefault(candidates[0].model_name, itertools.count())
        return candidates[next(counter) % len(candidates)]


class Weighted:
    """Random, in proportion to ``weight`` (LiteLLM's ``simple-shuffle``)."""

    name = "weighted"

    def choose(self, candidates: Sequence[Deployment], ctx: RequestContext) -> Deployment:
        return random.choices(candidates, weights=[d.weight for d in candidates])[0]


class PrefixAware:
    """Consistent hashing with bounded load over a request's prefix (or its ``user``/session).

    Requests sharing the key land on the same replica, so its prefix cache hits. A replica takes a
    request only while its in-flight count stays within ``load_factor`` times the mean (plus one);
    otherwise the walk goes on clockwise to the next replica (Mirrokni et al., "Consistent Hashing
    with Bounded Loads"), so one hot prefix cannot overload a replica.
    """

    name = "prefix-aware"

    def __init__(self, prefix_chars: int, load_factor: float, virtual_nodes: int) -> None:
        self.prefix_chars, self.load_factor, self.virtual_nodes = prefix_chars, load_factor, virtual_nodes
        self._rings: dict[tuple[str, ...], tuple[list[int], list[str]]] = {}

    def choose(self, candidates: Sequence[Deployment], ctx: RequestContext) -> Deployment:
        by_id = {d.id: d for d in candidates}
        points, owners = self._ring(tuple(sorted(by_id)))
        total = sum(d.inflight for d in candidates)
        cap = math.ceil(self.load_factor * (total + 1) / len(candidates))
        start = bisect.bisect(points, _hash(self.route_key(ctx)))
        seen: set[str] = set()
        for i in range(len(points)):
            dep_id = owners[(start + i) % len(points)]
            if dep_id in seen:
                continue
            seen.add(dep_id)
            if by_id[dep_id].inflight + 1 <= cap:
                return by_id[dep_id]
        return min(candidates, key=_load)

    def route_key(self, ctx: RequestContext) -> str:
        body = ctx.body
        session = body.get("user") or ctx.request.headers.get("x-session-id")
        if session:
            return f"user:{session}"
        return "prefix:" + prompt_prefix(body, self.prefix_chars)

    def _ring(self, ids: tuple[str, ...]) -> tuple[list[int], list[str]]:
        ring = self._rings.get(ids)
        if ring is None:
            nodes = sorted((_hash(f"{dep_id}#{v}"), dep_id) for dep_id in ids for v in range(self.virtual_nodes))
            ring = self._rings[ids] = ([p for p, _ in nodes], [o for _, o in nodes])
        return ring


def prompt_prefix(body: dict, chars: int) -> str:
    """The first ``chars`` characters of the prompt as the model sees it (chat messages joined in order)."""
    if "messages" in body:
        parts: list[str] = []
        size = 0
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            text = f"{message.get('role', '') if isinstance(message, dict) else ''}:{content or ''}\n"
            parts.append(text)
            size += len(text)
            if size >= chars:
                break
        return "".join(parts)[:chars]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch of prompts: route by the first
    if isinstance(prompt, list):  # token ids: about four characters per token
        return ",".join(str(t) for t in prompt[: max(1, chars // 4)])
    return str(prompt or "")[:chars]


def _hash(text: str) -> int:
    data = text.encode("utf-8", "surrogatepass")  # a lone surrogate from JSON's \ud800 escape still hashes
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def build_strategy(config: GatewayConfig) -> RoutingStrategy:
    name = config.router_settings.routing_strategy
    if name == "prefix-aware":
        p = config.tureen_settings.prefix_aware
        return PrefixAware(p.prefix_chars, p.load_factor, p.virtual_nodes)
    return {"least-busy": LeastBusy, "round-robin": RoundRobin, "weighted": Weighted}[name]()


class NoDeployment(Exception):
    """No deployment of the model can take a request now."""

    def __init__(self, model: str, retry_after: float, reason: str) -> None:
        super().__init__(reason)
        self.model, self.retry_after, self.reason = model, retry_after, reason


class Router:
    def __init__(self, deployments: Sequence[Deployment], strategy: RoutingStrategy) -> None:
        self.deployments = list(deployments)
        self.strategy = strategy
        self.groups: dict[str, list[Deployment]] = {}
        for d in self.deployments:
            self.groups.setdefault(d.model_name, []).append(d)

    def group(self, model: str) -> list[Deployment] | None:
        return self.groups.get(model) or self.groups.get(WILDCARD)

    def pick(self, model: str, ctx: RequestContext, exclude: set[str]) -> Deployment:
        group = self.group(model) or []
        usable = [d for d in group if d.id not in exclude and d.routable()]
        for tier in ("primary", "overflow"):
            free = [d for d in usable if d.tier == tier and not d.at_capacity() and not d.shedding()]
            if free:
                return self._take(free, ctx)
        # Everyone is shedding or full: a shedding replica may have recovered, a full one has not.
        not_full = [d for d in usable if not d.at_capacity()]
        if not_full:
            return self._take([d for d in not_full if d.tier == "primary"] or not_full, ctx)
        retry_after = min((d.breaker.retry_in() for d in group if d.id not in exclude), default=1.0) or 1.0
        reason = "at max_parallel_requests" if usable else "unhealthy or circuit open"
        raise NoDeployment(model, retry_after, f"every deployment of '{model}' is {reason}")

    def _take(self, candidates: list[Deployment], ctx: RequestContext) -> Deployment:
        choice = self.strategy.choose(candidates, ctx)
        if not choice.breaker.acquire():  # cannot happen for a routable deployment, but never over-admit a trial
            others = [d for d in candidates if d is not choice]
            if not others:
                raise NoDeployment(choice.model_name, 1.0, "half-open trial already in flight")
            return self._take(others, ctx)
        return choice
