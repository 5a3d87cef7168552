"""The limits step: prompt size, RPM / TPM / parallel requests per key and team, budgets, token budget.

``before`` counts the prompt (``tokens.py``), refuses a prompt over the key's ``max_prompt_tokens``
(400), then asks the store to admit the request against every limit that applies, in ONE atomic
call (``redis_store.ADMIT_LUA``):

- RPM and TPM of the key, of the key for this model (``model_rpm_limit`` / ``model_tpm_limit``)
  and of its team (sliding windows of 60 s). TPM admits the prompt tokens
  plus the request's ``max_tokens`` (times ``n``), and ``after`` corrects the entry to the real
  ``usage.total_tokens``;
- ``max_parallel_requests`` of the key and team: a leased slot, renewed while the request runs and
  freed by ``after``, also when the client went away;
- ``max_budget`` of the key and team: refused once the current ``budget_duration`` period's spend
  reached it (429, OpenAI's ``insufficient_quota``; ``Retry-After`` is the time to the period's end);
- the rolling token budget (``tureen_settings.token_budget``) of the key: counted and exported always,
  refused only with ``action: refuse``.

Every admitted response carries OpenAI's six ``x-ratelimit-*`` headers for the tightest request and
token window that applies (none when no window applies: an unlimited key). ``x-ratelimit-reset-*`` is
the time until the oldest counted entry leaves the window, i.e. when "remaining" next rises.

Store outage: ``fail_open`` serves without limits (counted, logged once a minute); ``fail_closed``
answers 503 with ``Retry-After``. Settlement failures are counted and dropped: a slot that could not
be freed expires with its lease.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from typing import Protocol

from starlette.responses import Response

from tureen.gateway.accounting import EveryLog, PolicyMetrics
from tureen.gateway.admit_ahead import Ahead, AdmitAhead
from tureen.gateway.config import GatewayConfig, KeyLimits, parse_duration
from tureen.gateway.keys import KeyPrincipal, spend_name, unavailable
from tureen.gateway.pipeline import RequestContext
from tureen.gateway.redis_store import (
    Admission,
    Budget,
    Decision,
    PolicyStore,
    Settlement,
    Slots,
    SpendCharge,
    StoreUnavailable,
    Window,
)
from tureen.gateway.tokens import TokenCounters, max_tokens_of
from tureen.server.errors import APIError

logger = logging.getLogger("tureen.gateway")

MINUTE = 60.0


class LimitFields(Protocol):
    """What a key record and a team's ``KeyLimits`` both carry."""

    rpm_limit: int | None
    tpm_limit: int | None
    max_parallel_requests: int | None
    max_budget: float | None
    budget_duration: str | None


@dataclass(frozen=True)
class Scope:
    """A key or a team, with the limits that apply to it."""

    kind: str  # "key" | "team"
    ident: str  # key hash or team id
    limits: LimitFields

    def window(self, limit_type: str, limit: int, window_s: float, cost: int, enforce: bool = True) -> Window:
        return Window(f"rl:{self.kind}:{self.ident}:{limit_type}", int(limit), window_s, int(cost), enforce)


@dataclass
class Admitted:
    """What ``before`` admitted, for ``after`` to settle."""

    admission: Admission
    token_windows: list[Window]  # the windows whose cost is corrected with the real usage
    charges: list[tuple[str, float | None]]  # (spend name, budget period) to add the cost to
    settled: bool = False
    confirming: asyncio.Task | None = None  # admitted ahead: Redis' own admission, running beside the request
    plan: "_Plan | None" = None  # admitted ahead: what a refusal names


@dataclass
class _Plan:
    windows: list[Window] = field(default_factory=list)
    kinds: list[tuple[str, str]] = field(default_factory=list)  # (scope kind, limit type) per window
    slots: list[Slots] = field(default_factory=list)
    budgets: list[Budget] = field(default_factory=list)
    charges: list[tuple[str, float | None]] = field(default_factory=list)
    budget_window: Window | None = None

    def add(self, window: Window, scope: str, limit_type: str) -> None:
        self.windows.append(window)
        self.kinds.append((scope, limit_type))


def format_reset(seconds: float) -> str:
    """OpenAI's style for ``x-ratelimit-reset-*``: ``20ms``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{secs}s"


class FailOpen:
    """Redis unreachable: serve without limits or budgets, counted and logged once a minute."""

    def __init__(self, metrics: PolicyMetrics) -> None:
        self.metrics = metrics
        self._log = EveryLog(60.0)

    def on_outage(self) -> Response | None:
        self.metrics.fail_open.inc()
        self._log.warning("policy store unreachable: serving WITHOUT rate limits or budgets "
                          "(redis_failure_mode: fail_open)")
        return None


class FailClosed:
    """Redis unreachable: refuse with 503 and ``Retry-After``, counted and logged once a minute."""

    def __init__(self, metrics: PolicyMetrics) -> None:
        self.metrics = metrics
        self._log = EveryLog(60.0)

    def on_outage(self) -> Response | None:
        self.metrics.fail_closed.inc()
        self._log.warning("policy store unreachable: refusing requests with 503 (redis_failure_mode: fail_closed)")
        return unavailable("Rate limits cannot be checked right now (the gateway's Redis is unreachable); "
                           "retry shortly.").response()


FAILURE_MODES = {"fail_open": FailOpen, "fail_closed": FailClosed}


class LimitsStep:
    name = "limits"

    def __init__(self, store: PolicyStore, config: GatewayConfig, counters: TokenCounters,
                 metrics: PolicyMetrics, ahead: AdmitAhead | None = None) -> None:
        settings = config.tureen_settings
        self.store = store
        self.ahead = ahead  # None: every admission waits for the store
        self.counters = counters
        self.metrics = metrics
        self.failure_mode = FAILURE_MODES[settings.redis_failure_mode](metrics)
        self.token_budget = settings.token_budget
        self.teams: dict[str, KeyLimits] = dict(settings.teams)
        self.lease_s = settings.parallel_lease_s
        self._settle_log = EveryLog(60.0)  # one throttle per kind of line: one must not silence another
        self._budget_log = EveryLog(60.0)
        self._inflight: dict[str, list[Slots]] = {}
        self._renewer: asyncio.Task | None = None

    # ---- before ----------------------------------------------------------------------------
    async def before(self, ctx: RequestContext) -> Response | None:
        ctx.max_tokens = max_tokens_of(ctx.body)
        ctx.prompt_tokens = await self.counters.count(ctx.model, ctx.endpoint, ctx.body)
        principal = ctx.principal
        if not isinstance(principal, KeyPrincipal) or principal.admin or principal.record is None:
            return None  # the master key and anonymous callers (keys not required) are not limited
        record = principal.record
        if record.max_prompt_tokens is not None and ctx.prompt_tokens > record.max_prompt_tokens:
            self.metrics.rate_limited.labels("key", "max_prompt_tokens").inc()
            return APIError(400, f"The prompt has {ctx.prompt_tokens} tokens; this API key allows at most "
                                 f"{record.max_prompt_tokens} (max_prompt_tokens).", param="messages",
                            code="max_prompt_tokens_exceeded").response()
        plan = self._plan(principal, ctx)
        admission = Admission(ctx.request_id, plan.windows, plan.slots, plan.budgets)
        if not (plan.windows or plan.slots or plan.budgets):
            return None
        ahead = self.ahead.try_ahead(admission) if self.ahead is not None else None
        if ahead is not None:
            return self._admit_ahead(ctx, plan, admission, ahead)
        try:
            decision = await self.store.admit(admission)
        except StoreUnavailable:
            if self.ahead is not None:
                self.ahead.forget_all()
            return self.failure_mode.on_outage()
        if self.ahead is not None:
            self.ahead.learn(admission, decision)
        if decision.admitted:  # recorded at once: whatever happens next, the slot is renewed and settled
            ctx.state[self.name] = Admitted(admission, self._token_windows(plan), plan.charges)
            if plan.slots:
                self._hold(ctx.request_id, plan.slots)
        try:
            ctx.response_headers.update(self._headers(plan, decision))
            if not decision.admitted:
                return self._refusal(plan, decision, ctx)
            self._watch_budget(plan, decision, principal)
        except BaseException:  # the pipeline will not run after() for a step that raised: settle here
            await self._settle(ctx)
            raise
        return None

    def _admit_ahead(self, ctx: RequestContext, plan: _Plan, admission: Admission, ahead: Ahead) -> Response | None:
        """Send the request on now; Redis admits it beside it (``admit_ahead.py``), and ``after`` waits for that."""
        admitted = Admitted(admission, self._token_windows(plan), plan.charges, plan=plan)
        admitted.confirming = asyncio.get_running_loop().create_task(self._confirm(admitted, plan, ahead, ctx))
        ctx.state[self.name] = admitted
        ctx.response_headers.update(self._headers(plan, ahead.decision))
        return None

    async def before_response(self, ctx: RequestContext) -> Response | None:
        """A request sent ahead waits here, once the upstream has answered and before the client sees a
        byte, for Redis' own admission (usually long done): refused there, the client gets the 429 and
        the answer is dropped, so clients never see a limit exceeded, only the upstream's wasted work."""
        admitted = ctx.state.get(self.name)
        if not isinstance(admitted, Admitted) or admitted.confirming is None or admitted.plan is None:
            return None
        decision = await asyncio.shield(admitted.confirming)
        if decision is None or decision.admitted:  # admitted, or Redis failed (served as fail_open would)
            return None
        ctx.response_headers.update(self._headers(admitted.plan, decision))
        return self._refusal(admitted.plan, decision, ctx)

    async def _confirm(self, admitted: Admitted, plan: _Plan, ahead: Ahead, ctx: RequestContext) -> Decision | None:
        """Redis' decision on a request admitted ahead; None when Redis failed (it recorded nothing)."""
        assert self.ahead is not None
        try:
            decision = await self.store.admit(admitted.admission)
        except StoreUnavailable:
            self.ahead.forget_all()
            self.metrics.admitted_ahead.labels("unconfirmed").inc()
            return None
        finally:
            self.ahead.confirmed(ahead)
        self.ahead.learn(admitted.admission, decision)
        if not decision.admitted:  # other replicas used the headroom up: before_response answers the 429
            self.metrics.admitted_ahead.labels("refused").inc()
            return decision
        self.metrics.admitted_ahead.labels("confirmed").inc()
        if plan.slots and not admitted.settled:
            self._hold(admitted.admission.request_id, plan.slots)
        if isinstance(ctx.principal, KeyPrincipal):
            self._watch_budget(plan, decision, ctx.principal)
        return decision

    @staticmethod
    def _token_windows(plan: _Plan) -> list[Window]:
        return [w for w, (_, t) in zip(plan.windows, plan.kinds) if t in ("tpm", "token_budget")]

    def _scopes(self, principal: KeyPrincipal) -> list[Scope]:
        scopes = [Scope("key", principal.record.token, principal.record)]
        if principal.team_id and principal.team_id in self.teams:
            scopes.append(Scope("team", principal.team_id, self.teams[principal.team_id]))
        elif principal.team_id:
            scopes.append(Scope("team", principal.team_id, KeyLimits()))  # spend is tracked per team regardless
        return scopes

    def _plan(self, principal: KeyPrincipal, ctx: RequestContext) -> _Plan:
        plan = _Plan()
        tokens = (ctx.prompt_tokens or 0) + (ctx.max_tokens or 0)
        record = principal.record
        for scope in self._scopes(principal):
            limits = scope.limits
            if limits.rpm_limit is not None:
                plan.add(scope.window("rpm", limits.rpm_limit, MINUTE, 1), scope.kind, "rpm")
            if limits.tpm_limit is not None:
                plan.add(scope.window("tpm", limits.tpm_limit, MINUTE, tokens), scope.kind, "tpm")
            if limits.max_parallel_requests is not None:
                plan.slots.append(Slots(f"par:{scope.kind}:{scope.ident}", limits.max_parallel_requests, self.lease_s))
            name = spend_name(scope.kind, scope.ident)
            if limits.max_budget is not None:
                plan.budgets.append(Budget(name, limits.max_budget))
            period = parse_duration(limits.budget_duration) if limits.budget_duration else None
            plan.charges.append((name, period))
        key_scope = Scope("key", record.token, record)
        if ctx.model in record.model_rpm_limit:  # LiteLLM's per-model limits of a key
            plan.add(key_scope.window(f"rpm:{ctx.model}", record.model_rpm_limit[ctx.model], MINUTE, 1), "key", "rpm")
        if ctx.model in record.model_tpm_limit:
            plan.add(key_scope.window(f"tpm:{ctx.model}", record.model_tpm_limit[ctx.model], MINUTE, tokens), "key",
                     "tpm")
        budget = self.token_budget
        plan.budget_window = key_scope.window("token_budget", budget.tokens, budget.window_s, tokens,
                                              enforce=budget.action == "refuse")
        plan.add(plan.budget_window, "key", "token_budget")
        return plan

    # ---- headers and refusals ----------------------------------------------------------------
    def _headers(self, plan: _Plan, decision: Decision) -> dict[str, str]:
        headers: dict[str, str] = {}
        for suffix, limit_type in (("requests", "rpm"), ("tokens", "tpm")):
            candidates = [(w.limit - state.used, w, state) for w, (_, t), state in
                          zip(plan.windows, plan.kinds, decision.windows) if t == limit_type]
            if not candidates:
                continue
            remaining, window, state = min(candidates, key=lambda c: c[0])
            headers[f"x-ratelimit-limit-{suffix}"] = str(window.limit)
            headers[f"x-ratelimit-remaining-{suffix}"] = str(max(0, remaining))
            headers[f"x-ratelimit-reset-{suffix}"] = format_reset(state.reset_s)
        return headers

    def _refusal(self, plan: _Plan, decision: Decision, ctx: RequestContext) -> Response:
        limit = decision.refused_by
        if isinstance(limit, Budget):
            scope = limit.name.split(":")[1]
            self.metrics.rate_limited.labels(scope, "budget").inc()
            i = plan.budgets.index(limit)
            error = APIError(429, f"The {scope}'s budget is exhausted: spend {decision.spend[i]:.6g} of max_budget "
                                  f"{limit.max_budget:g}" + (" until the budget period ends." if
                                                             decision.retry_after_s is not None else "."),
                             "insufficient_quota", code="insufficient_quota", retry_after=decision.retry_after_s)
        elif isinstance(limit, Slots):
            scope = limit.name.split(":")[1]
            self.metrics.rate_limited.labels(scope, "max_parallel_requests").inc()
            error = APIError(429, f"Too many parallel requests for this {scope}: max_parallel_requests is "
                                  f"{limit.limit}.", "requests", code="rate_limit_exceeded",
                             retry_after=decision.retry_after_s or 1)
        else:
            scope, limit_type = plan.kinds[plan.windows.index(limit)]
            self.metrics.rate_limited.labels(scope, limit_type).inc()
            if limit_type == "token_budget":
                self.metrics.breach(ctx.principal, "refuse")
            error = self._window_error(limit, limit_type, scope, decision)
        return Response(content=_json(error), status_code=error.status, media_type="application/json",
                        headers={**ctx.response_headers, **error.headers()})

    def _window_error(self, window: Window, limit_type: str, scope: str, decision: Decision) -> APIError:
        unit = {"rpm": "requests per min (RPM)", "tpm": "tokens per min (TPM)",
                "token_budget": f"tokens per {window.window_s:g} s (token budget)"}[limit_type]
        wait = decision.retry_after_s or 0
        too_big = window.cost > window.limit
        parts = window.name.split(":", 4)  # rl:<scope>:<id>:<type>[:<model>]
        model = f" of model {parts[4]!r}" if len(parts) == 5 else ""
        message = (f"Rate limit reached for this {scope} on {unit}{model}: Limit {window.limit}, "
                   f"Requested {window.cost}. "
                   + ("The request alone exceeds the limit." if too_big else f"Please try again in {wait:.3g}s."))
        return APIError(429, message, "tokens" if limit_type != "rpm" else "requests", code="rate_limit_exceeded",
                        retry_after=wait)

    def _watch_budget(self, plan: _Plan, decision: Decision, principal: KeyPrincipal) -> None:
        window = plan.budget_window
        state = decision.windows[plan.windows.index(window)]
        self.metrics.token_budget_usage.observe(self.metrics.tenant(principal), principal.record.token,
                                                state.used / window.limit)
        if state.used > window.limit:
            self.metrics.breach(principal, "alert")
            self._budget_log.warning("key %s is over its token budget: %d tokens in %g s (budget %d)",
                                     principal.key_alias or "(no alias)", state.used, window.window_s, window.limit)

    # ---- after -------------------------------------------------------------------------------
    async def after(self, ctx: RequestContext) -> None:
        try:
            await self._settle(ctx)
        finally:
            self.metrics.record_usage(ctx.principal, ctx.usage, ctx.cost)

    async def _settle(self, ctx: RequestContext) -> None:
        admitted: Admitted | None = ctx.state.get(self.name)
        if admitted is None or admitted.settled:
            return
        admitted.settled = True
        if admitted.confirming is not None:  # settle after Redis' admission; when it recorded nothing (refused,
            await asyncio.shield(admitted.confirming)  # or failed) the script skips the absent entries
        self._release(ctx.request_id)
        real = _real_tokens(ctx)
        windows = [(w, real) for w in admitted.token_windows] if real is not None else []
        cost = float(ctx.cost or 0.0)
        charges = [SpendCharge(name, cost, period) for name, period in admitted.charges]
        if self.ahead is not None:
            for charge in charges:
                self.ahead.charged(charge.name, charge.cost)
        try:
            await self.store.settle(Settlement(ctx.request_id, windows, admitted.admission.slots, charges))
        except StoreUnavailable:
            self._settle_log.warning("policy store unreachable: a finished request's usage and spend were not "
                                     "recorded; its parallel slot frees when its lease ends")

    # ---- parallel-slot leases ------------------------------------------------------------------
    def _hold(self, request_id: str, slots: list[Slots]) -> None:
        self._inflight[request_id] = slots
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    def _release(self, request_id: str) -> None:
        self._inflight.pop(request_id, None)

    async def _renew_forever(self) -> None:
        while self._inflight:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.store.renew(dict(self._inflight))
            except StoreUnavailable:
                pass
            except Exception:  # never let the renewer die silently on a bug
                logger.exception("renewing parallel-request leases failed")

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()


def _real_tokens(ctx: RequestContext) -> int | None:
    """The tokens a finished request really used; None keeps the admitted estimate (an aborted stream)."""
    usage = ctx.usage or {}
    total = usage.get("total_tokens")
    if isinstance(total, int) and total >= 0:
        return total
    parts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
    if all(isinstance(p, int) for p in parts):
        return sum(parts)
    if ctx.status is not None and ctx.status >= 400 and ctx.status != 499:
        return 0  # refused or failed upstream: nothing was generated
    return None


def _json(error: APIError) -> bytes:
    return error.sse_payload().encode()
