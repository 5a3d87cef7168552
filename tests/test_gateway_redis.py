"""The policy stores: the same limit semantics in Redis (Lua) and in-process, on a fake clock; atomicity across
two Redis connections; outages and recovery with a real redis-server."""

from __future__ import annotations

import asyncio

import pytest
import redis

from redis_server import RedisServer, redis_server  # noqa: F401  (fixture)
from tureen.gateway.redis_store import (
    Admission,
    Budget,
    MemoryStore,
    RedisOptions,
    RedisStore,
    Settlement,
    Slots,
    SpendCharge,
    StoreUnavailable,
    Window,
)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Env:
    """One store kind on a fake clock; ``env.run(fn)`` awaits ``fn(store)`` in a fresh event loop."""

    def __init__(self, kind: str, tmp_path) -> None:
        self.kind, self.clock = kind, Clock()
        self.memory = MemoryStore(self.clock)
        self.server = RedisServer(tmp_path / "redis").start() if kind == "redis" else None

    def run(self, fn):
        async def go():
            store = self.memory if self.server is None else RedisStore(self.server.url, clock=self.clock)
            try:
                return await fn(store)
            finally:
                await store.aclose()
        return asyncio.run(go())


@pytest.fixture(params=["memory", "redis"])
def env(request, tmp_path):
    env = Env(request.param, tmp_path)
    yield env
    if env.server:
        env.server.stop()


def run(coro):
    return asyncio.run(coro)


def test_request_window_admits_exactly_the_limit_then_frees_one_entry_at_a_time(env):
    rpm = Window("rl:key:a:rpm", limit=3, window_s=60, cost=1)

    async def scenario(store):
        results = []
        for i in range(4):
            results.append(await store.admit(Admission(f"r{i}", windows=[rpm])))
            env.clock.now += 10
        env.clock.now += 20.001  # now 60.001 s after the first admission: it has left the window
        results.append(await store.admit(Admission("late", windows=[rpm])))
        return results

    results = env.run(scenario)
    assert [d.admitted for d in results] == [True, True, True, False, True]
    refused = results[3]
    assert refused.refused_by == rpm
    # the oldest entry was admitted 30 s before the refusal: it leaves the window in 30 s
    assert refused.retry_after_s == pytest.approx(30, abs=0.01)
    assert [d.windows[0].used for d in results[:4]] == [1, 2, 3, 3]
    assert results[1].windows[0].reset_s == pytest.approx(50, abs=0.01)  # "remaining" rises when r0 leaves


def test_token_window_corrects_the_estimate_with_the_real_usage(env):
    def tpm(cost):
        return Window("rl:key:a:tpm", limit=150, window_s=60, cost=cost)

    async def scenario(store):
        first = await store.admit(Admission("a", windows=[tpm(100)]))
        second = await store.admit(Admission("b", windows=[tpm(100)]))  # 200 > 150: refused
        await store.settle(Settlement("a", windows=[(tpm(100), 20)]))  # it really used 20
        third = await store.admit(Admission("c", windows=[tpm(100)]))  # 20 + 100 <= 150
        return first, second, third

    first, second, third = env.run(scenario)
    assert first.admitted and not second.admitted and third.admitted
    assert third.windows[0].used == 120


def test_entries_settled_to_zero_tokens_leave_the_window_without_an_error(env):
    # A failed request is settled to 0 tokens; when only such entries left the window, the Lua script used to
    # run HINCRBY with -0, which Redis refuses ("value is not an integer"): the next admission failed (the
    # gateway served it without limits, fail_open) in the soak run.
    def tpm(cost):
        return Window("rl:key:z:tpm", limit=150, window_s=60, cost=cost)

    async def scenario(store):
        await store.admit(Admission("a", windows=[tpm(40)]))
        await store.settle(Settlement("a", windows=[(tpm(40), 0)]))  # it failed: counts 0
        env.clock.now += 61  # "a" leaves the window
        later = await store.admit(Admission("b", windows=[tpm(100)]))
        again = await store.admit(Admission("c", windows=[tpm(100)]))
        return later, again

    later, again = env.run(scenario)
    assert later.admitted and later.windows[0].used == 100
    assert not again.admitted  # the window still counts right: 200 > 150


def test_a_request_larger_than_the_limit_is_refused_even_when_the_window_is_empty(env):
    decision = env.run(lambda store: store.admit(Admission("big", windows=[Window("rl:key:a:tpm", 100, 60, 101)])))
    assert not decision.admitted and decision.retry_after_s == pytest.approx(60)


def test_all_or_nothing_a_refusal_by_one_limit_takes_nothing_from_the_others(env):
    key_rpm = Window("rl:key:a:rpm", 10, 60, 1)
    team_rpm = Window("rl:team:t:rpm", 1, 60, 1)

    async def scenario(store):
        await store.admit(Admission("a", windows=[key_rpm, team_rpm]))
        refused = await store.admit(Admission("b", windows=[key_rpm, team_rpm]))
        alone = await store.admit(Admission("c", windows=[key_rpm]))
        return refused, alone

    refused, alone = env.run(scenario)
    assert not refused.admitted and refused.refused_by == team_rpm
    assert alone.windows[0].used == 2  # "b" took nothing from the key's window


def test_unenforced_window_counts_past_its_limit(env):
    budget = Window("rl:key:a:token_budget", 100, 300, 80, enforce=False)

    async def scenario(store):
        return [await store.admit(Admission(f"r{i}", windows=[budget])) for i in range(2)]

    decisions = env.run(scenario)
    assert all(d.admitted for d in decisions)
    assert decisions[1].windows[0].used == 160


def test_parallel_slots_are_freed_by_settlement_and_by_lease_expiry(env):
    slots = Slots("par:key:a", limit=2, lease_s=30)

    async def scenario(store):
        a = await store.admit(Admission("a", slots=[slots]))
        b = await store.admit(Admission("b", slots=[slots]))
        c = await store.admit(Admission("c", slots=[slots]))
        await store.settle(Settlement("a", slots=[slots]))
        d = await store.admit(Admission("d", slots=[slots]))
        env.clock.now += 20
        await store.renew({"d": [slots]})  # d is still running: its lease is extended, b's is not
        env.clock.now += 10.5  # b's lease (30 s) has run out: a crashed gateway's slot comes back
        e = await store.admit(Admission("e", slots=[slots]))
        f = await store.admit(Admission("f", slots=[slots]))
        return a, b, c, d, e, f

    a, b, c, d, e, f = env.run(scenario)
    assert a.admitted and b.admitted and not c.admitted and d.admitted
    assert e.admitted and not f.admitted  # b expired, d renewed: d + e hold the two slots


def test_budget_refuses_once_spend_reaches_it_and_resets_each_period(env):
    budget = Budget("spend:key:a", max_budget=1.0)
    charge = SpendCharge("spend:key:a", 0.6, period_s=3600)

    async def scenario(store):
        out = [await store.admit(Admission("a", budgets=[budget]))]
        await store.settle(Settlement("a", charges=[charge]))
        out.append(await store.admit(Admission("b", budgets=[budget])))
        await store.settle(Settlement("b", charges=[charge]))  # 1.2 >= 1.0
        out.append(await store.admit(Admission("c", budgets=[budget])))
        state = await store.spend("spend:key:a")
        env.clock.now += 3600.5  # the period ends
        out.append(await store.admit(Admission("d", budgets=[budget])))
        await store.settle(Settlement("d", charges=[charge]))
        return out, state, await store.spend("spend:key:a")

    (a, b, c, d), state, after_reset = env.run(scenario)
    assert a.admitted and b.admitted and not c.admitted and d.admitted
    assert c.refused_by == budget and c.spend == [pytest.approx(1.2)]
    assert c.retry_after_s == pytest.approx(3600, abs=1)
    assert state.spend == pytest.approx(1.2) and state.total_spend == pytest.approx(1.2)
    assert after_reset.spend == pytest.approx(0.6) and after_reset.total_spend == pytest.approx(1.8)


def test_budget_without_a_period_never_resets_and_says_so(env):
    async def scenario(store):
        await store.settle(Settlement("a", charges=[SpendCharge("spend:key:b", 2.0)]))
        return await store.admit(Admission("b", budgets=[Budget("spend:key:b", 1.0)]))

    decision = env.run(scenario)
    assert not decision.admitted and decision.retry_after_s is None


def test_retry_after_counts_the_oldest_entries_that_must_leave(env):
    def tpm(cost):
        return Window("rl:key:a:tpm", limit=250, window_s=60, cost=cost)

    async def scenario(store):
        start = env.clock.now
        for i in range(250):  # one token each, 0.1 s apart
            assert (await store.admit(Admission(f"r{i}", windows=[tpm(1)]))).admitted
            env.clock.now += 0.1
        refused = await store.admit(Admission("big", windows=[tpm(150)]))
        return refused, env.clock.now - start

    refused, elapsed = env.run(scenario)
    # 150 tokens must leave: the 150th entry (admitted at 14.9 s) leaves at 74.9 s
    assert not refused.admitted and refused.retry_after_s == pytest.approx(74.9 - elapsed, abs=0.01)


def test_keys_aliases_and_listing(env):
    async def scenario(store):
        await store.put_key("h1", {"token": "h1"}, created=2.0)
        await store.put_key("h0", {"token": "h0"}, created=1.0)
        claimed = [await store.claim_alias("app", "h1"), await store.claim_alias("app", "h0"),
                   await store.claim_alias("app", "h1")]
        listing = await store.list_keys(0, 10)
        await store.release_alias("app", "h1")
        free_again = await store.claim_alias("app", "h0")
        deleted = [await store.delete_key("h1"), await store.delete_key("h1")]
        return claimed, listing, free_again, deleted, await store.get_key("h0"), await store.list_keys(0, 10)

    claimed, listing, free_again, deleted, h0, after = env.run(scenario)
    assert claimed == [None, "h1", None]
    assert listing == (["h0", "h1"], 2)  # oldest first
    assert free_again is None and deleted == [True, False]
    assert h0 == {"token": "h0"} and after == (["h0"], 1)


def test_two_connections_racing_on_one_redis_admit_exactly_the_limit(redis_server):  # noqa: F811
    async def scenario():
        options = RedisOptions(socket_timeout_s=20)  # exactness is the point here, not a loaded machine's latency
        stores = [RedisStore(redis_server.url, options), RedisStore(redis_server.url, options)]
        rpm = Window("rl:key:race:rpm", 25, 60, 1)
        tpm = Window("rl:key:race:tpm", 1000, 60, 30)  # 33 requests' worth of tokens
        decisions = await asyncio.gather(*[stores[i % 2].admit(Admission(f"r{i}", windows=[rpm, tpm]))
                                           for i in range(120)])
        slots = Slots("par:key:race", 7, 60)
        held = await asyncio.gather(*[stores[i % 2].admit(Admission(f"s{i}", slots=[slots])) for i in range(50)])
        budget = Budget("spend:key:race", 1.0)
        await stores[0].settle(Settlement("x", charges=[SpendCharge("spend:key:race", 0.5)]))
        charged = await asyncio.gather(*[stores[i % 2].settle(Settlement(f"c{i}", charges=[
            SpendCharge("spend:key:race", 0.01)])) for i in range(40)])
        spend = await stores[1].spend("spend:key:race")
        after_budget = await stores[0].admit(Admission("b", budgets=[budget]))
        for s in stores:
            await s.aclose()
        return decisions, held, charged, spend, after_budget

    decisions, held, charged, spend, after_budget = run(scenario())
    assert sum(d.admitted for d in decisions) == 25  # exact: one atomic script per admission
    assert sum(d.admitted for d in held) == 7
    assert len(charged) == 40 and spend.spend == pytest.approx(0.9)  # no lost update between the two clients
    assert after_budget.admitted


def test_a_burst_beyond_the_connection_pool_waits_instead_of_failing(redis_server):  # noqa: F811
    async def scenario():
        # a generous timeout: the point is that callers wait for a connection, however loaded the machine
        store = RedisStore(redis_server.url, RedisOptions(max_connections=4, socket_timeout_s=20))
        rpm = Window("rl:key:burst:rpm", 10_000, 60, 1)
        decisions = await asyncio.gather(*[store.admit(Admission(f"r{i}", windows=[rpm])) for i in range(200)])
        await store.aclose()
        return decisions

    assert all(d.admitted for d in run(scenario()))


def test_redis_outage_raises_store_unavailable_then_recovers_by_itself(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    errors, states = [], []
    store = RedisStore(server.url, RedisOptions(probe_interval_s=1.0), on_error=errors.append,
                       on_state=states.append)
    rpm = Window("rl:key:o:rpm", 100, 60, 1)

    async def scenario():
        assert (await store.admit(Admission("a", windows=[rpm]))).admitted
        server.stop()
        with pytest.raises(StoreUnavailable):
            await store.admit(Admission("b", windows=[rpm]))
        with pytest.raises(StoreUnavailable):  # inside the probe interval: refused at once, no new error
            await store.get_key("0" * 64)
        n_errors = len(errors)
        server.start()
        await asyncio.sleep(1.05)
        decision = await store.admit(Admission("c", windows=[rpm]))  # the script cache was lost: EVALSHA reloads
        await store.aclose()
        return n_errors, decision

    try:
        n_errors, decision = run(scenario())
    finally:
        server.stop()
    assert n_errors == 1 and errors == ["admit"]
    assert states == [False, True]
    assert decision.admitted and decision.windows[0].used == 2  # RDB snapshot on stop kept "a"


def test_a_hung_redis_times_out_instead_of_hanging_the_request(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    store = RedisStore(server.url, RedisOptions(socket_timeout_s=0.2, probe_interval_s=0.05))

    async def scenario():
        await store.ping()
        server.pause()
        try:
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(store.admit(Admission("a", windows=[Window("rl:x", 5, 60, 1)])), 5)
        finally:
            server.resume()
        await store.aclose()

    try:
        run(scenario())
    finally:
        server.stop()


def test_nothing_but_tureen_keys_is_written(redis_server):  # noqa: F811
    async def scenario():
        store = RedisStore(redis_server.url)
        await store.admit(Admission("a", windows=[Window("rl:key:z:rpm", 5, 60, 1)], slots=[Slots("par:key:z", 2, 9)],
                                    budgets=[Budget("spend:key:z", 1)]))
        await store.aclose()

    run(scenario())
    keys = redis.Redis.from_url(redis_server.url).keys("*")
    assert keys and all(k.startswith(b"tureen:") for k in keys)
    ttls = [redis.Redis.from_url(redis_server.url).pttl(k) for k in keys]
    assert all(t > 0 for t in ttls)  # every window and slot set expires when idle


def test_an_exhausted_pool_is_overload_not_an_outage(redis_server):  # noqa: F811
    from redis.exceptions import ConnectionError as RedisConnectionError

    states, errors = [], []

    async def scenario():
        store = RedisStore(redis_server.url, on_state=states.append, on_error=errors.append)

        async def no_connection():  # what redis-py's BlockingConnectionPool raises when its wait times out
            raise RedisConnectionError("No connection available.")

        with pytest.raises(StoreUnavailable):
            await store._call("admit", no_connection)
        ok = await store.ping()  # not skipped: the store was not marked down
        await store.aclose()
        return ok

    assert run(scenario()) is True
    assert states == [] and errors == ["admit"]
