"""Admission ahead of Redis for keys far from every limit (``tureen_settings.admit_ahead``).

Asking Redis to admit a request is one round trip on the request's path: on a quiet machine about
0.3-0.7 ms of a gateway's ~1.5 ms, before the upstream sees a byte. For a key that is nowhere near
its limits the answer is known in advance, so the limits step can send the request on at once and
let the same atomic admission script run beside it.

- **What this gateway knows:** each limit (a window, a parallel-request set, a budget) as Redis last
  reported it in any admission that included it, plus what this gateway admitted ahead since then
  and has not heard back about, plus the spend it settled since.
- **When a request goes ahead:** every limit it is subject to was reported at most ``max_age_s``
  ago, and would stay within ``headroom`` (a share) of its limit with this request added. Anything
  closer, a limit not seen recently (a key's first request), and everything after a Redis error go
  to Redis first, exactly as without this.
- **What is the same:** Redis records every request through the same script, and the settlement,
  which waits for that admission, corrects the usage and frees the slot as before.
- **What can differ:** other gateway replicas' traffic since the last report is not seen here. Redis
  can then refuse a request that was already sent (``tureen_gateway_admitted_ahead_total
  {outcome="refused"}``). The client still gets the 429: the limits step's ``before_response`` waits
  for Redis' answer once the upstream has answered, before the client sees a byte, and the answer is
  dropped; only the upstream's work is wasted. Redis failing beside a request admitted ahead counts
  as ``outcome="unconfirmed"``; that request is served as ``fail_open`` would serve it, which is
  why nothing is admitted ahead with ``redis_failure_mode: fail_closed``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from tureen.gateway.redis_store import Admission, Decision, WindowState


@dataclass
class _Seen:
    """One limit as Redis last reported it, and what was admitted ahead against it since."""

    used: float  # window units, slot holders, or spend
    at: float
    reset_s: float = 0.0  # windows: until the oldest entry leaves
    ahead: float = 0.0  # admitted ahead and not confirmed yet (units or requests)


@dataclass
class Ahead:
    """One request admitted ahead: the decision it is assumed to get (for its headers), and its costs."""

    decision: Decision
    costs: list[tuple[str, float]] = field(default_factory=list)  # (limit, units) counted ahead


class AdmitAhead:
    def __init__(self, headroom: float, max_age_s: float, max_entries: int = 100_000, clock=time.monotonic) -> None:
        self.headroom = headroom
        self.max_age_s = max_age_s
        self.max_entries = max_entries
        self._clock = clock
        self._seen: OrderedDict[str, _Seen] = OrderedDict()

    def try_ahead(self, admission: Admission) -> Ahead | None:
        """An ``Ahead`` when ``admission`` may go on before Redis answers (it is then counted); else None."""
        now = self._clock()
        windows = [self._fresh("w:" + w.name, now) for w in admission.windows]
        slots = [self._fresh("s:" + s.name, now) for s in admission.slots]
        budgets = [self._fresh("b:" + b.name, now) for b in admission.budgets]
        limits = [(w.limit, w.cost, seen) for w, seen in zip(admission.windows, windows) if w.enforce]
        limits += [(s.limit, 1, seen) for s, seen in zip(admission.slots, slots)]
        limits += [(b.max_budget, 0, seen) for b, seen in zip(admission.budgets, budgets)]
        for limit, cost, seen in limits:
            if seen is None or seen.used + seen.ahead + cost > self.headroom * limit:
                return None
        estimate = self._estimate(admission, windows, slots, budgets)
        costs = [("w:" + w.name, float(w.cost)) for w in admission.windows] + \
                [("s:" + s.name, 1.0) for s in admission.slots]
        for name, cost in costs:
            seen = self._seen.get(name)
            if seen is not None:
                seen.ahead += cost
        return Ahead(estimate, costs)

    def _fresh(self, name: str, now: float) -> _Seen | None:
        seen = self._seen.get(name)
        return seen if seen is not None and now - seen.at <= self.max_age_s else None

    @staticmethod
    def _estimate(admission: Admission, windows, slots, budgets) -> Decision:
        states = [WindowState(int(s.used + s.ahead + w.cost), s.reset_s) if s is not None else WindowState(int(w.cost), 0.0)
                  for w, s in zip(admission.windows, windows)]
        return Decision(True, None, None, states, [s.used for s in budgets], [int(s.used + s.ahead + 1) for s in slots])

    def learn(self, admission: Admission, decision: Decision) -> None:
        """What Redis reported in a decision on ``admission`` (admitted or refused)."""
        now = self._clock()
        for w, state in zip(admission.windows, decision.windows):
            self._put("w:" + w.name, state.used, now, state.reset_s)
        for s, held in zip(admission.slots, decision.slots):
            self._put("s:" + s.name, held, now)
        for b, spend in zip(admission.budgets, decision.spend):
            self._put("b:" + b.name, spend, now)

    def _put(self, name: str, used: float, now: float, reset_s: float = 0.0) -> None:
        seen = self._seen.get(name)
        if seen is None:
            self._seen[name] = _Seen(used, now, reset_s)
            while len(self._seen) > self.max_entries:
                self._seen.popitem(last=False)
        else:
            seen.used, seen.at, seen.reset_s = used, now, reset_s
            self._seen.move_to_end(name)

    def confirmed(self, ahead: Ahead) -> None:
        """Redis answered (either way) for a request admitted ahead: it is no longer pending here."""
        for name, cost in ahead.costs:
            seen = self._seen.get(name)
            if seen is not None:
                seen.ahead = max(0.0, seen.ahead - cost)

    def charged(self, budget: str, cost: float) -> None:
        """This gateway settled ``cost`` on the spend ``budget``: count it before Redis next reports it."""
        seen = self._seen.get("b:" + budget)
        if seen is not None:
            seen.used += cost

    def forget_all(self) -> None:
        """Redis failed: every request goes to Redis first again (and meets the failure mode there)."""
        self._seen.clear()
