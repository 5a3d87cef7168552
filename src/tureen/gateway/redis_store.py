"""Where the gateway keeps keys, rate-limit windows, parallel-request slots and spend.

Two stores behind one interface, ``PolicyStore``:

- ``RedisStore``: shared by every gateway process pointed at one Redis. Each admission and each
  settlement is ONE Lua script (registered, called by EVALSHA), so two gateways can never both take
  the last unit of a limit. Time comes from Redis' own clock (``TIME``), so gateways on hosts with
  skewed clocks still agree on the windows.
- ``MemoryStore``: the same semantics in-process, for a gateway started without Redis.

The limit algorithm is a sliding-window log: a window keeps one entry per admitted request (a
sorted set of request ids by admission time, and a hash of each entry's cost plus their running
total). An entry leaves the window exactly ``window`` after its admission, so "N per minute" means
N in any 60-second span, to the request; the entry's cost can be corrected later (TPM admits the
prompt plus ``max_tokens`` and settles on the real usage). Parallel-request slots are a sorted set of
request ids scored by lease expiry, so a gateway that dies never leaks a slot past the lease.

Redis errors become ``StoreUnavailable``; after one, the store answers ``StoreUnavailable`` at once
for ``probe_interval_s`` instead of waiting on a dead socket per request, then tries again.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError, TimeoutError

from tureen.gateway.accounting import EveryLog

logger = logging.getLogger("tureen.gateway")

PREFIX = "tureen:"
TOTAL_FIELD = "__total"  # the running sum of a window's costs, kept in the window's hash


class StoreUnavailable(Exception):
    """The store cannot be reached (or answered with an error); the message never holds a key."""


# ----------------------------------------------------------------------------- typed requests


@dataclass(frozen=True)
class Window:
    """One sliding-window limit on one scope (a key's RPM, a team's TPM, a key's token budget...)."""

    name: str  # redis key stem, e.g. "rl:key:<hash>:tpm"
    limit: int
    window_s: float
    cost: int  # units this request takes (1 for requests, tokens for tokens)
    enforce: bool = True  # False: record and report, never refuse (the alert-only token budget)


@dataclass(frozen=True)
class Slots:
    """At most ``limit`` requests in flight on one scope; each holds a slot for at most ``lease_s``."""

    name: str
    limit: int
    lease_s: float


@dataclass(frozen=True)
class Budget:
    """Spend on one scope must stay below ``max_budget`` (the current budget period's spend)."""

    name: str  # redis key stem, e.g. "spend:key:<hash>"
    max_budget: float


@dataclass(frozen=True)
class Admission:
    request_id: str
    windows: Sequence[Window] = ()
    slots: Sequence[Slots] = ()
    budgets: Sequence[Budget] = ()


@dataclass(frozen=True)
class WindowState:
    used: int  # units counted in the window after this decision
    reset_s: float  # until the oldest counted entry leaves the window (when "remaining" next rises)


@dataclass(frozen=True)
class Decision:
    admitted: bool
    refused_by: Window | Slots | Budget | None = None
    retry_after_s: float | None = None  # None: waiting will not help (a budget that never resets)
    windows: Sequence[WindowState] = ()
    spend: Sequence[float] = ()  # the current period's spend of each budget, as checked
    slots: Sequence[int] = ()  # requests holding a slot of each slot set after this decision


@dataclass(frozen=True)
class SpendCharge:
    """Add ``cost`` to a scope's spend; a budget period of ``period_s`` resets it (None: never)."""

    name: str
    cost: float
    period_s: float | None = None


@dataclass(frozen=True)
class Settlement:
    """What a finished request really used: correct its window entries, free its slots, add spend."""

    request_id: str
    windows: Sequence[tuple[Window, int]] = ()  # (window, real cost)
    slots: Sequence[Slots] = ()
    charges: Sequence[SpendCharge] = ()


@dataclass
class SpendState:
    spend: float = 0.0  # in the current budget period
    total_spend: float = 0.0  # since the scope was created
    reset_at: float | None = None  # unix seconds; None when the budget never resets


class PolicyStore(Protocol):
    async def get_key(self, key_hash: str) -> dict | None: ...
    async def get_keys(self, key_hashes: Sequence[str]) -> list[dict | None]: ...
    async def put_key(self, key_hash: str, record: dict, *, created: float) -> None: ...
    async def delete_key(self, key_hash: str) -> bool: ...
    async def list_keys(self, offset: int, count: int) -> tuple[list[str], int]: ...
    async def claim_alias(self, alias: str, key_hash: str) -> str | None: ...
    async def release_alias(self, alias: str, key_hash: str) -> None: ...
    async def admit(self, admission: Admission) -> Decision: ...
    async def settle(self, settlement: Settlement) -> None: ...
    async def renew(self, held: dict[str, Sequence[Slots]]) -> None: ...
    async def spend(self, name: str) -> SpendState: ...
    async def spends(self, names: Sequence[str]) -> list[SpendState]: ...
    async def start_budget_period(self, name: str, period_s: float | None) -> None: ...
    async def ping(self) -> bool: ...
    async def aclose(self) -> None: ...


# ----------------------------------------------------------------------------- Lua

_LUA_COMMON = """
local function now_ms()
  if ARGV[1] ~= '' then return tonumber(ARGV[1]) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- unpack() has a stack limit: run `cmd key members...` in chunks
local function chunked(cmd, key, list)
  for i = 1, #list, 1000 do
    redis.call(cmd, key, unpack(list, i, math.min(i + 999, #list)))
  end
end
"""

# KEYS: per window (zset, hash); per slot set (zset); per budget (hash)
# ARGV: now_ms|'', request_id, n_windows, n_slots, n_budgets,
#       per window: limit, window_ms, cost, enforce; per slot set: limit, lease_ms; per budget: max_budget
# -> {admitted, refused_index (1-based over windows, slots, budgets; 0 = none), retry_ms (-1 = never),
#     per window: used, reset_ms; per budget: spend (string); per slot set: requests holding a slot}
ADMIT_LUA = _LUA_COMMON + """
local now = now_ms()
local id = ARGV[2]
local nw, ns, nb = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local refused, retry = 0, 0
local function evict(z, h, cutoff)
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', cutoff)
  if #old > 0 then
    local freed = 0
    for i = 1, #old, 1000 do
      local costs = redis.call('HMGET', h, unpack(old, i, math.min(i + 999, #old)))
      for j = 1, #costs do freed = freed + (tonumber(costs[j]) or 0) end
    end
    redis.call('ZREMRANGEBYSCORE', z, '-inf', cutoff)
    chunked('HDEL', h, old)
    -- never -0 (entries settled to 0 tokens): Redis refuses "-0" as an integer, and the script would fail
    if freed ~= 0 then redis.call('HINCRBY', h, '__total', -freed) end
  end
  return tonumber(redis.call('HGET', h, '__total') or '0')
end
local function wait_ms(z, h, need, window)  -- until `need` units have left the window, oldest first
  local freed, start = 0, 0
  while true do
    local entries = redis.call('ZRANGE', z, start, start + 99, 'WITHSCORES')  -- pages: usually one suffices
    if #entries == 0 then return window end
    for i = 1, #entries, 2 do
      freed = freed + (tonumber(redis.call('HGET', h, entries[i])) or 0)
      if freed >= need then return tonumber(entries[i + 1]) + window - now end
    end
    start = start + 100
  end
end
local used, params = {}, {}
for i = 1, nw do
  local a = 6 + (i - 1) * 4
  local p = {limit = tonumber(ARGV[a]), window = tonumber(ARGV[a + 1]), cost = tonumber(ARGV[a + 2]),
             enforce = ARGV[a + 3] == '1', z = KEYS[2 * i - 1], h = KEYS[2 * i]}
  params[i] = p
  used[i] = evict(p.z, p.h, now - p.window)
  if refused == 0 and p.enforce and used[i] + p.cost > p.limit then
    refused = i
    if p.cost > p.limit then retry = p.window else retry = wait_ms(p.z, p.h, used[i] + p.cost - p.limit, p.window) end
  end
end
local a = 6 + nw * 4
for i = 1, ns do
  local z = KEYS[2 * nw + i]
  local limit, lease = tonumber(ARGV[a + 2 * (i - 1)]), tonumber(ARGV[a + 2 * (i - 1) + 1])
  redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
  if refused == 0 and redis.call('ZCARD', z) + 1 > limit then
    refused = nw + i
    local first = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
    retry = 1000
    if #first > 0 then retry = math.min(1000, tonumber(first[2]) - now) end
  end
end
a = a + ns * 2
local spends = {}
for i = 1, nb do
  local h = KEYS[2 * nw + ns + i]
  local vals = redis.call('HMGET', h, 'spend', 'reset_at')
  local spend, reset_at = tonumber(vals[1]) or 0, tonumber(vals[2]) or 0
  if reset_at > 0 and reset_at <= now then spend = 0 end
  spends[i] = tostring(spend)
  if refused == 0 and spend >= tonumber(ARGV[a + i - 1]) then
    refused = nw + ns + i
    if reset_at > 0 then retry = reset_at - now else retry = -1 end
  end
end
local out = {refused == 0 and 1 or 0, refused, retry}
for i = 1, nw do
  local p = params[i]
  if refused == 0 then
    redis.call('ZADD', p.z, now, id)
    redis.call('HSET', p.h, id, p.cost)
    redis.call('HINCRBY', p.h, '__total', p.cost)
    redis.call('PEXPIRE', p.z, p.window + 1000)
    redis.call('PEXPIRE', p.h, p.window + 1000)
    used[i] = used[i] + p.cost
  end
  local first = redis.call('ZRANGE', p.z, 0, 0, 'WITHSCORES')
  local reset = 0
  if #first > 0 then reset = tonumber(first[2]) + p.window - now end
  table.insert(out, used[i])
  table.insert(out, reset)
end
if refused == 0 then
  local b = 6 + nw * 4
  for i = 1, ns do
    local z = KEYS[2 * nw + i]
    local lease = tonumber(ARGV[b + 2 * (i - 1) + 1])
    redis.call('ZADD', z, now + lease, id)
    redis.call('PEXPIRE', z, lease + 1000)
  end
end
for i = 1, nb do table.insert(out, spends[i]) end
for i = 1, ns do table.insert(out, redis.call('ZCARD', KEYS[2 * nw + i])) end
return out
"""

# KEYS: per window (zset, hash); per slot set (zset); per charge (hash)
# ARGV: now_ms|'', request_id, n_windows, n_slots, n_charges,
#       per window: real cost; per charge: cost, period_ms (0: never resets)
SETTLE_LUA = _LUA_COMMON + """
local now = now_ms()
local id = ARGV[2]
local nw, ns, nc = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
for i = 1, nw do
  local h = KEYS[2 * i]
  local old = redis.call('HGET', h, id)
  if old then
    local delta = tonumber(ARGV[5 + i]) - tonumber(old)
    if delta ~= 0 then
      redis.call('HSET', h, id, ARGV[5 + i])
      redis.call('HINCRBY', h, '__total', delta)
    end
  end
end
for i = 1, ns do redis.call('ZREM', KEYS[2 * nw + i], id) end
for i = 1, nc do
  local h = KEYS[2 * nw + ns + i]
  local a = 6 + nw + (i - 1) * 2
  local cost, period = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  if period > 0 then
    local reset_at = tonumber(redis.call('HGET', h, 'reset_at') or '0')
    if reset_at == 0 then
      redis.call('HSET', h, 'reset_at', now + period)
    elseif reset_at <= now then
      local periods = math.floor((now - reset_at) / period) + 1
      redis.call('HSET', h, 'reset_at', reset_at + periods * period, 'spend', 0)
    end
  end
  if cost > 0 then
    redis.call('HINCRBYFLOAT', h, 'spend', ARGV[a])
    redis.call('HINCRBYFLOAT', h, 'total_spend', ARGV[a])
  end
end
return 1
"""

# KEYS: slot sets; ARGV: now_ms|'', then per key: request_id, lease_ms. Extends leases that still exist.
RENEW_LUA = _LUA_COMMON + """
local now = now_ms()
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + tonumber(ARGV[2 * i + 1]), ARGV[2 * i])
  redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[2 * i + 1]) + 1000)
end
return 1
"""


def _ms(seconds: float) -> int:
    return max(1, int(round(seconds * 1000)))


def _admit_args(admission: Admission) -> tuple[list[str], list]:
    keys: list[str] = []
    args: list = [admission.request_id, len(admission.windows), len(admission.slots), len(admission.budgets)]
    for w in admission.windows:
        keys += [f"{PREFIX}{w.name}:z", f"{PREFIX}{w.name}:h"]
        args += [w.limit, _ms(w.window_s), int(w.cost), 1 if w.enforce else 0]
    for s in admission.slots:
        keys.append(f"{PREFIX}{s.name}")
        args += [s.limit, _ms(s.lease_s)]
    for b in admission.budgets:
        keys.append(f"{PREFIX}{b.name}")
        args.append(repr(float(b.max_budget)))
    return keys, args


def _settle_args(settlement: Settlement) -> tuple[list[str], list]:
    keys: list[str] = []
    args: list = [settlement.request_id, len(settlement.windows), len(settlement.slots), len(settlement.charges)]
    for w, cost in settlement.windows:
        keys += [f"{PREFIX}{w.name}:z", f"{PREFIX}{w.name}:h"]
        args.append(int(cost))
    for s in settlement.slots:
        keys.append(f"{PREFIX}{s.name}")
    for c in settlement.charges:
        keys.append(f"{PREFIX}{c.name}")
        args += [repr(float(c.cost)), _ms(c.period_s) if c.period_s else 0]
    return keys, args


def _decision(admission: Admission, raw: list) -> Decision:
    admitted, refused, retry_ms = int(raw[0]), int(raw[1]), int(raw[2])
    nw = len(admission.windows)
    states = [WindowState(int(raw[3 + 2 * i]), max(0, int(raw[4 + 2 * i])) / 1000) for i in range(nw)]
    nb = len(admission.budgets)
    spends = [float(v) for v in raw[3 + 2 * nw:3 + 2 * nw + nb]]
    held = [int(v) for v in raw[3 + 2 * nw + nb:]]
    limits = [*admission.windows, *admission.slots, *admission.budgets]
    refused_by = limits[refused - 1] if refused else None
    retry = None if retry_ms < 0 else max(0, retry_ms) / 1000
    return Decision(bool(admitted), refused_by, retry if refused else None, states, spends, held)


# ----------------------------------------------------------------------------- Redis


@dataclass
class RedisOptions:
    socket_timeout_s: float = 2.0  # a hung Redis costs a request at most this, then the failure mode applies
    connect_timeout_s: float = 1.0
    probe_interval_s: float = 1.0  # after an error, skip Redis for this long before trying again
    max_connections: int = 64


class RedisStore:
    """``PolicyStore`` on one Redis shared by every gateway replica."""

    def __init__(self, url: str, options: RedisOptions | None = None, *, clock: Callable[[], float] | None = None,
                 on_error: Callable[[str], None] | None = None, on_state: Callable[[bool], None] | None = None) -> None:
        self.options = options or RedisOptions()
        # A blocking pool: a burst beyond max_connections waits for a free connection (up to the socket
        # timeout) instead of failing as if Redis were down.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=self.options.max_connections, timeout=self.options.socket_timeout_s,
            socket_timeout=self.options.socket_timeout_s, socket_connect_timeout=self.options.connect_timeout_s,
            retry=Retry(NoBackoff(), 0), decode_responses=True)
        self._client = aioredis.Redis(connection_pool=pool)
        self._admit = self._client.register_script(ADMIT_LUA)
        self._settle = self._client.register_script(SETTLE_LUA)
        self._renew = self._client.register_script(RENEW_LUA)
        self._clock = clock  # None: Redis' own clock (production); tests pass a fake one
        self._on_error = on_error or (lambda operation: None)
        self._on_state = on_state or (lambda up: None)
        self._down_until = 0.0
        self._refusal_log = EveryLog(60.0)
        self.up = True

    def _now_arg(self) -> str:
        return "" if self._clock is None else str(int(self._clock() * 1000))

    async def _call(self, operation: str, fn):
        if time.monotonic() < self._down_until:
            raise StoreUnavailable(f"redis is unavailable (retrying in {self.options.probe_interval_s:g} s)")
        try:
            result = await fn()
        except (ConnectionError, TimeoutError, OSError) as exc:  # unreachable: skip it for a while
            if _pool_exhausted(exc):  # every connection busy: overload, not an outage
                self._on_error(operation)
                raise StoreUnavailable(f"redis {operation}: no free connection in the pool") from None
            self._down_until = time.monotonic() + self.options.probe_interval_s
            self._on_error(operation)
            self._set_up(False)
            raise StoreUnavailable(f"redis {operation} failed: {type(exc).__name__}") from None
        except RedisError as exc:  # reachable, but it refused the command (OOM, READONLY replica, a script error)
            self._on_error(operation)
            self._refusal_log.error("redis refused %s: %s", operation, str(exc)[:200])
            raise StoreUnavailable(f"redis {operation} failed: {type(exc).__name__}") from None
        self._set_up(True)
        return result

    def _set_up(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            logger.warning("redis is %s", "reachable again" if up else "unreachable")
            self._on_state(up)

    async def get_key(self, key_hash: str) -> dict | None:
        raw = await self._call("get_key", lambda: self._client.get(f"{PREFIX}key:{key_hash}"))
        return json.loads(raw) if raw else None

    async def get_keys(self, key_hashes: Sequence[str]) -> list[dict | None]:
        """Many records in a few round trips (MGET in chunks): the admin API's listings."""
        async def get_all():
            out: list[dict | None] = []
            for i in range(0, len(key_hashes), 500):
                chunk = [f"{PREFIX}key:{h}" for h in key_hashes[i:i + 500]]
                out += [_json_or_none(raw) for raw in await self._client.mget(chunk)]
            return out
        return await self._call("get_keys", get_all) if key_hashes else []

    async def put_key(self, key_hash: str, record: dict, *, created: float) -> None:
        async def put():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(f"{PREFIX}key:{key_hash}", json.dumps(record))
                pipe.zadd(f"{PREFIX}keys", {key_hash: created}, nx=True)
                await pipe.execute()
        await self._call("put_key", put)

    async def delete_key(self, key_hash: str) -> bool:
        async def delete():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(f"{PREFIX}key:{key_hash}")
                pipe.zrem(f"{PREFIX}keys", key_hash)
                removed, _ = await pipe.execute()
            return bool(removed)
        return await self._call("delete_key", delete)

    async def list_keys(self, offset: int, count: int) -> tuple[list[str], int]:
        async def listing():
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zrange(f"{PREFIX}keys", offset, offset + count - 1)
                pipe.zcard(f"{PREFIX}keys")
                hashes, total = await pipe.execute()
            return list(hashes), int(total)
        return await self._call("list_keys", listing)

    async def claim_alias(self, alias: str, key_hash: str) -> str | None:
        """Bind ``alias`` to ``key_hash`` unless another key holds it; returns the holder's hash, or None."""
        async def claim():
            if await self._client.hsetnx(f"{PREFIX}key_alias", alias, key_hash):
                return None
            holder = await self._client.hget(f"{PREFIX}key_alias", alias)
            return None if holder == key_hash else holder
        return await self._call("claim_alias", claim)

    async def release_alias(self, alias: str, key_hash: str) -> None:
        async def release():
            if await self._client.hget(f"{PREFIX}key_alias", alias) == key_hash:
                await self._client.hdel(f"{PREFIX}key_alias", alias)
        await self._call("release_alias", release)

    async def admit(self, admission: Admission) -> Decision:
        keys, args = _admit_args(admission)
        raw = await self._call("admit", lambda: self._admit(keys=keys, args=[self._now_arg(), *args]))
        return _decision(admission, raw)

    async def settle(self, settlement: Settlement) -> None:
        if not (settlement.windows or settlement.slots or settlement.charges):
            return
        keys, args = _settle_args(settlement)
        await self._call("settle", lambda: self._settle(keys=keys, args=[self._now_arg(), *args]))

    async def renew(self, held: dict[str, Sequence[Slots]]) -> None:
        keys, args = [], []
        for request_id, slots in held.items():
            for s in slots:
                keys.append(f"{PREFIX}{s.name}")
                args += [request_id, _ms(s.lease_s)]
        if keys:
            await self._call("renew", lambda: self._renew(keys=keys, args=[self._now_arg(), *args]))

    async def spend(self, name: str) -> SpendState:
        raw = await self._call("spend", lambda: self._client.hgetall(f"{PREFIX}{name}"))
        return _spend_state(raw, self._clock() if self._clock else time.time())

    async def spends(self, names: Sequence[str]) -> list[SpendState]:
        async def read_all():
            async with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(f"{PREFIX}{name}")
                return await pipe.execute()
        raws = await self._call("spends", read_all) if names else []
        now = self._clock() if self._clock else time.time()
        return [_spend_state(raw, now) for raw in raws]

    async def start_budget_period(self, name: str, period_s: float | None) -> None:
        async def start():
            key = f"{PREFIX}{name}"
            if period_s:
                now = self._clock() if self._clock else time.time()
                await self._client.hset(key, "reset_at", int((now + period_s) * 1000))
            else:
                await self._client.hdel(key, "reset_at")
        await self._call("start_budget_period", start)

    async def ping(self) -> bool:
        try:
            return bool(await self._call("ping", self._client.ping))
        except StoreUnavailable:
            return False

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._client.connection_pool.disconnect()


def _pool_exhausted(exc: BaseException) -> bool:
    """The blocking pool's wait timed out (redis-py raises ConnectionError("No connection available."))."""
    return isinstance(exc, ConnectionError) and "No connection available" in str(exc)


def _json_or_none(raw: str | None) -> dict | None:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None  # unreadable records are skipped by listings; get_key reports them


def _spend_state(raw: dict, now: float) -> SpendState:
    reset_ms = float(raw.get("reset_at") or 0)
    spend = float(raw.get("spend") or 0)
    if reset_ms and reset_ms / 1000 <= now:
        spend = 0.0  # the period ended; the next settlement writes the reset
    return SpendState(spend, float(raw.get("total_spend") or 0), reset_ms / 1000 if reset_ms else None)


# ----------------------------------------------------------------------------- in-process


@dataclass
class _WindowLog:
    entries: dict[str, tuple[float, int]] = field(default_factory=dict)  # id -> (admitted at, cost), oldest first
    total: int = 0

    def evict(self, cutoff: float) -> None:
        while self.entries:
            rid, (at, cost) = next(iter(self.entries.items()))
            if at > cutoff:
                break
            del self.entries[rid]
            self.total -= cost

    def wait_s(self, need: int, window_s: float, now: float) -> float:
        freed = 0
        for at, cost in self.entries.values():
            freed += cost
            if freed >= need:
                return at + window_s - now
        return window_s

    def reset_s(self, window_s: float, now: float) -> float:
        if not self.entries:
            return 0.0
        return max(0.0, next(iter(self.entries.values()))[0] + window_s - now)


class MemoryStore:
    """``PolicyStore`` in this process only: the same rules as ``RedisStore``, for a gateway without Redis."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._keys: dict[str, tuple[float, dict]] = {}
        self._aliases: dict[str, str] = {}
        self._windows: dict[str, _WindowLog] = {}
        self._slots: dict[str, dict[str, float]] = {}
        self._spend: dict[str, SpendState] = {}
        self.up = True

    async def get_key(self, key_hash: str) -> dict | None:
        entry = self._keys.get(key_hash)
        return json.loads(json.dumps(entry[1])) if entry else None  # a copy, as Redis would give

    async def get_keys(self, key_hashes: Sequence[str]) -> list[dict | None]:
        return [await self.get_key(h) for h in key_hashes]

    async def put_key(self, key_hash: str, record: dict, *, created: float) -> None:
        old = self._keys.get(key_hash)
        self._keys[key_hash] = (old[0] if old else created, json.loads(json.dumps(record)))

    async def delete_key(self, key_hash: str) -> bool:
        return self._keys.pop(key_hash, None) is not None

    async def list_keys(self, offset: int, count: int) -> tuple[list[str], int]:
        ordered = sorted(self._keys, key=lambda h: (self._keys[h][0], h))
        return ordered[offset:offset + count], len(ordered)

    async def claim_alias(self, alias: str, key_hash: str) -> str | None:
        holder = self._aliases.setdefault(alias, key_hash)
        return None if holder == key_hash else holder

    async def release_alias(self, alias: str, key_hash: str) -> None:
        if self._aliases.get(alias) == key_hash:
            del self._aliases[alias]

    def _spend_now(self, name: str, now: float) -> float:
        state = self._spend.get(name)
        if state is None or (state.reset_at is not None and state.reset_at <= now):
            return 0.0
        return state.spend

    def _refusal(self, admission: Admission, logs: list[_WindowLog], now: float):
        for w, log in zip(admission.windows, logs):
            if w.enforce and log.total + w.cost > w.limit:
                wait = w.window_s if w.cost > w.limit else log.wait_s(log.total + w.cost - w.limit, w.window_s, now)
                return w, wait
        for s in admission.slots:
            held = self._slots.setdefault(s.name, {})
            for rid in [rid for rid, expiry in held.items() if expiry <= now]:
                del held[rid]
            if len(held) + 1 > s.limit:
                return s, min(1.0, min(held.values(), default=now + 1.0) - now)
        for b in admission.budgets:
            if self._spend_now(b.name, now) >= b.max_budget:
                state = self._spend.get(b.name)
                return b, (state.reset_at - now) if state and state.reset_at else None
        return None, None

    async def admit(self, admission: Admission) -> Decision:
        now = self._clock()
        logs = [self._windows.setdefault(w.name, _WindowLog()) for w in admission.windows]
        for w, log in zip(admission.windows, logs):
            log.evict(now - w.window_s)
        refused_by, retry = self._refusal(admission, logs, now)
        if refused_by is None:
            for w, log in zip(admission.windows, logs):
                log.entries[admission.request_id] = (now, int(w.cost))
                log.total += int(w.cost)
            for s in admission.slots:
                self._slots[s.name][admission.request_id] = now + s.lease_s
        states = [WindowState(log.total, log.reset_s(w.window_s, now)) for w, log in zip(admission.windows, logs)]
        spends = [self._spend_now(b.name, now) for b in admission.budgets]
        held = [len(self._slots.get(s.name, {})) for s in admission.slots]
        return Decision(refused_by is None, refused_by, retry, states, spends, held)

    async def settle(self, settlement: Settlement) -> None:
        now = self._clock()
        for w, cost in settlement.windows:
            log = self._windows.get(w.name)
            if log and settlement.request_id in log.entries:
                at, old = log.entries[settlement.request_id]
                log.entries[settlement.request_id] = (at, int(cost))
                log.total += int(cost) - old
        for s in settlement.slots:
            self._slots.get(s.name, {}).pop(settlement.request_id, None)
        for c in settlement.charges:
            self._charge(c, now)

    def _charge(self, charge: SpendCharge, now: float) -> None:
        state = self._spend.setdefault(charge.name, SpendState())
        if charge.period_s:
            if state.reset_at is None:
                state.reset_at = now + charge.period_s
            elif state.reset_at <= now:
                periods = math.floor((now - state.reset_at) / charge.period_s) + 1
                state.reset_at += periods * charge.period_s
                state.spend = 0.0
        state.spend += charge.cost
        state.total_spend += charge.cost

    async def renew(self, held: dict[str, Sequence[Slots]]) -> None:
        now = self._clock()
        for request_id, slots in held.items():
            for s in slots:
                leases = self._slots.get(s.name, {})
                if request_id in leases:
                    leases[request_id] = now + s.lease_s

    async def spend(self, name: str) -> SpendState:
        state = self._spend.get(name, SpendState())
        return SpendState(self._spend_now(name, self._clock()), state.total_spend, state.reset_at)

    async def spends(self, names: Sequence[str]) -> list[SpendState]:
        return [await self.spend(name) for name in names]

    async def start_budget_period(self, name: str, period_s: float | None) -> None:
        state = self._spend.setdefault(name, SpendState())
        state.reset_at = self._clock() + period_s if period_s else None

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None
