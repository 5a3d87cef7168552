"""Admission ahead of Redis (``gateway/admit_ahead.py``): when it lets a request go on before Redis answers,
that Redis still records every request, and what happens when Redis disagrees or fails."""

from __future__ import annotations

import pytest

from redis_server import redis_server  # noqa: F401  (fixture)
from test_gateway_keys import PolicyServer, make_config
from test_gateway_limits import metric, new_key
from tureen.gateway.admit_ahead import AdmitAhead
from tureen.gateway.policy import _admit_ahead
from tureen.gateway.redis_store import Admission, Budget, Decision, MemoryStore, RedisStore, Slots, Window, WindowState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def rpm(limit: int, name: str = "rl:key:k:rpm", cost: int = 1) -> Window:
    return Window(name, limit, 60.0, cost)


def admitted(*used: int, slots=(), spend=()) -> Decision:
    return Decision(True, None, None, [WindowState(u, 30.0) for u in used], list(spend), list(slots))


# ---- the rule ----------------------------------------------------------------------------------
def test_only_limits_reported_recently_and_far_from_full_go_ahead():
    clock = Clock()
    ahead = AdmitAhead(headroom=0.5, max_age_s=1.0, clock=clock)
    a = Admission("r1", [rpm(10)])
    assert ahead.try_ahead(a) is None  # never reported: Redis first
    ahead.learn(a, admitted(3))
    first = ahead.try_ahead(Admission("r2", [rpm(10)]))
    assert first is not None and first.decision.windows[0].used == 4  # the headers' estimate: 3 + this one
    second = ahead.try_ahead(Admission("r3", [rpm(10)]))
    assert second is not None and second.decision.windows[0].used == 5  # 3 + two ahead = 5 = headroom
    assert ahead.try_ahead(Admission("r4", [rpm(10)])) is None  # a sixth would pass half the limit
    ahead.confirmed(first)
    assert ahead.try_ahead(Admission("r5", [rpm(10)])) is not None  # one fewer pending
    clock.now += 1.5
    assert ahead.try_ahead(Admission("r6", [rpm(10)])) is None  # the report is too old


def test_a_shared_limit_reported_for_one_key_holds_back_another():
    ahead = AdmitAhead(headroom=0.5, max_age_s=1.0, clock=Clock())
    team = rpm(4, "rl:team:t:rpm")
    ahead.learn(Admission("r1", [rpm(100, "rl:key:a:rpm"), team]), admitted(1, 1))
    ahead.learn(Admission("r2", [rpm(100, "rl:key:b:rpm"), team]), admitted(1, 2))
    # key a's own window is far from full, but the team's (reported by key b's request) is at half
    assert ahead.try_ahead(Admission("r3", [rpm(100, "rl:key:a:rpm"), team])) is None


def test_slots_budgets_and_refusals_count():
    ahead = AdmitAhead(headroom=0.5, max_age_s=1.0, clock=Clock())
    slots, budget = Slots("par:key:k", 4, 60.0), Budget("spend:key:k", 1.0)
    a = Admission("r1", [rpm(100)], [slots], [budget])
    ahead.learn(a, admitted(1, slots=[1], spend=[0.2]))
    assert ahead.try_ahead(Admission("r2", [rpm(100)], [slots], [budget])) is not None  # 2 of 4 slots
    assert ahead.try_ahead(Admission("r3", [rpm(100)], [slots], [budget])) is None  # a third: over half
    ahead.learn(a, admitted(1, slots=[0], spend=[0.2]))
    ahead.charged("spend:key:k", 0.4)  # settled here since: 0.6 of 1.0 spent
    assert ahead.try_ahead(Admission("r4", [rpm(100)], [slots], [budget])) is None
    ahead.learn(a, admitted(1, slots=[0], spend=[0.1]))  # a new budget period
    assert ahead.try_ahead(Admission("r5", [rpm(100)], [slots], [budget])) is not None
    ahead.learn(a, Decision(False, rpm(100), 5.0, [WindowState(100, 5.0)], [0.1], [0]))  # refused: full
    assert ahead.try_ahead(Admission("r6", [rpm(100)], [slots], [budget])) is None
    ahead.learn(a, admitted(1, slots=[0], spend=[0.1]))
    ahead.forget_all()  # Redis failed
    assert ahead.try_ahead(Admission("r7", [rpm(100)], [slots], [budget])) is None


def test_an_alert_only_window_never_holds_a_request_back():
    ahead = AdmitAhead(headroom=0.5, max_age_s=1.0, clock=Clock())
    alert = Window("rl:key:k:token_budget", 100, 300.0, 80, enforce=False)
    ahead.learn(Admission("r1", [rpm(100), alert]), admitted(1, 90))
    assert ahead.try_ahead(Admission("r2", [rpm(100), alert])) is not None


def test_only_in_front_of_redis_and_never_with_fail_closed(redis_server, monkeypatch):  # noqa: F811
    store = RedisStore(redis_server.url)
    assert isinstance(_admit_ahead(make_config(redis_server.url, monkeypatch=monkeypatch), store), AdmitAhead)
    closed = make_config(redis_server.url, monkeypatch=monkeypatch, settings={"redis_failure_mode": "fail_closed"})
    assert _admit_ahead(closed, store) is None
    off = make_config(redis_server.url, monkeypatch=monkeypatch, settings={"admit_ahead": {"enabled": False}})
    assert _admit_ahead(off, store) is None
    assert _admit_ahead(make_config(None, monkeypatch=monkeypatch), MemoryStore()) is None


# ---- through the limits step, on a real Redis ---------------------------------------------------
def remaining(response) -> int:
    assert response.status_code == 200, response.text
    return int(response.headers["x-ratelimit-remaining-requests"])


def test_requests_sent_ahead_are_all_recorded_by_redis(redis_server, monkeypatch):  # noqa: F811
    config = make_config(redis_server.url, monkeypatch=monkeypatch)
    with PolicyServer(config) as a:
        key = new_key(a, rpm_limit=1000, tpm_limit=10_000_000, max_parallel_requests=100)
        assert [remaining(a.chat(key)) for _ in range(10)] == list(range(999, 989, -1))
        assert metric(a, 'tureen_gateway_admitted_ahead_total{outcome="confirmed"}') == 9  # all but the first
    with PolicyServer(config) as b:  # a second replica asks Redis first: it saw all ten
        assert remaining(b.chat(key)) == 989


def test_near_a_limit_requests_wait_for_redis(redis_server, monkeypatch):  # noqa: F811
    with PolicyServer(make_config(redis_server.url, monkeypatch=monkeypatch)) as s:
        key = new_key(s, rpm_limit=4)
        assert [s.chat(key).status_code for _ in range(6)] == [200, 200, 200, 200, 429, 429]
        # only the second went ahead (1 counted + 1 = half of 4); from the third on, Redis answered first
        assert metric(s, 'tureen_gateway_admitted_ahead_total{outcome="confirmed"}') == 1
        assert metric(s, 'tureen_gateway_admitted_ahead_total{outcome="refused"}') == 0


def test_a_request_sent_ahead_that_redis_refuses_gets_the_429_and_not_the_answer(
        redis_server, monkeypatch):  # noqa: F811
    # a long max_age_s, so that replica a's report is still "fresh" however slowly b's requests run
    config = make_config(redis_server.url, monkeypatch=monkeypatch, settings={"admit_ahead": {"max_age_s": 600}})
    with PolicyServer(config) as a, PolicyServer(config) as b:
        key = new_key(a, rpm_limit=10)
        assert a.chat(key).status_code == 200  # a learns: 1 of 10 used
        assert [b.chat(key).status_code for _ in range(9)] == [200] * 9  # Redis: 10 of 10
        refused = a.chat(key)  # a still believes 1 of 10: sent ahead, then refused by Redis before its first byte
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert "retry-after" in refused.headers and refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert metric(a, 'tureen_gateway_admitted_ahead_total{outcome="refused"}') == 1
        assert metric(a, 'tureen_gateway_rate_limited_requests_total{limit_type="rpm",scope="key"}') == 1
        assert a.chat(key).status_code == 429  # a has now heard that the window is full
        assert b.chat(key).status_code == 429


def test_a_redis_failure_beside_a_request_sent_ahead_serves_it_and_then_asks_redis_first(
        redis_server, monkeypatch):  # noqa: F811
    with PolicyServer(make_config(redis_server.url, monkeypatch=monkeypatch)) as s:
        key = new_key(s, rpm_limit=1000)
        assert s.chat(key).status_code == 200
        redis_server.stop()
        try:
            # went ahead: served; Redis' own admission then failed (fail_open, the default)
            assert s.chat(key).status_code == 200
            assert metric(s, 'tureen_gateway_admitted_ahead_total{outcome="unconfirmed"}') == 1
            assert s.chat(key).status_code == 200  # asked Redis first: fail_open
            assert metric(s, "tureen_gateway_redis_fail_open_requests_total") >= 1
        finally:
            redis_server.start()


@pytest.mark.parametrize("enabled", [True, False])
def test_the_headers_are_the_same_with_and_without_admitting_ahead(redis_server, monkeypatch, enabled):  # noqa: F811
    config = make_config(redis_server.url, monkeypatch=monkeypatch, settings={"admit_ahead": {"enabled": enabled}})
    with PolicyServer(config) as s:
        key = new_key(s, rpm_limit=100, tpm_limit=100_000)
        answers = [s.chat(key) for _ in range(3)]
        assert [remaining(r) for r in answers] == [99, 98, 97]
        assert [int(r.headers["x-ratelimit-limit-tokens"]) for r in answers] == [100_000] * 3
