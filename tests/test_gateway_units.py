"""Gateway pieces without processes: config schema, breaker, routing strategies, the SSE relay's usage handling."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tureen.gateway.breaker import BreakerPolicy, BreakerState, CircuitBreaker
from tureen.gateway.config import GatewayConfigError, load_config, parse_config, parse_duration
from tureen.gateway.pipeline import RequestContext
from tureen.gateway.relay import UsageStripper, UsageTail
from tureen.gateway.routing import LeastBusy, NoDeployment, PrefixAware, RoundRobin, Router, Weighted
from tureen.gateway.upstream import build_deployments

ROOT = Path(__file__).resolve().parents[1]


def _config(*entries, **sections):
    return parse_config({"model_list": list(entries), **sections})[0]


def _entry(name="m", base="http://127.0.0.1:1", **params):
    tureen = {k: params.pop(k) for k in ("tier",) if k in params}
    return {"model_name": name, "litellm_params": {"model": "hosted_vllm/x", "api_base": base, **params},
            "tureen_params": tureen}


class FakeRequest:
    headers: dict = {}


def _ctx(body: dict | None = None) -> RequestContext:
    return RequestContext(request=FakeRequest(), endpoint="chat", body=body or {"messages": []}, model="m",
                          stream=False)


# ---- config ----------------------------------------------------------------------------------
def test_litellm_config_parses_with_secrets_from_env(monkeypatch):
    monkeypatch.setenv("UP_KEY", "sk-upstream")
    monkeypatch.setenv("MASTER", "sk-master")
    config, warnings = parse_config({
        "model_list": [{"model_name": "gpt", "litellm_params": {
            "model": "openai/gpt-4o", "api_key": "os.environ/UP_KEY", "rpm": 10, "tpm": 1000, "weight": 2,
            "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}, "tureen_params": {"tier": "overflow"}}],
        "router_settings": {"routing_strategy": "simple-shuffle", "num_retries": 3, "allowed_fails": 2,
                            "cooldown_time": 7, "redis_host": "localhost", "redis_port": 6390},
        "general_settings": {"master_key": "os.environ/MASTER"},
        "litellm_settings": {"drop_params": True},
    })
    d = build_deployments(config)[0]
    assert d.api_base == "https://api.openai.com/v1" and d.upstream_model == "gpt-4o" and d.tier == "overflow"
    assert d.headers["authorization"] == "Bearer sk-upstream"
    assert config.router_settings.routing_strategy == "weighted"
    assert config.breaker_failures == 3 and config.breaker_cooldown_s == 7 and config.keys_required
    assert config.router_settings.redis_connection_url() == "redis://localhost:6390/0"
    assert warnings == ["config: unknown key 'litellm_settings.drop_params' is ignored"]
    assert "sk-upstream" not in repr(config) and "sk-master" not in repr(config)


@pytest.mark.parametrize("data, field", [
    ({"model_list": [_entry(rpm="many")]}, "model_list.0.litellm_params.rpm"),
    ({"model_list": [{"model_name": "m", "litellm_params": {"model": "x", "api_key": "sk-literal"}}]}, "api_key"),
    ({"model_list": [{"model_name": "m", "litellm_params": {"model": "x", "api_key": "os.environ/NOPE_X"}}]},
     "NOPE_X"),
    ({"model_list": [_entry()], "router_settings": {"routing_strategy": "fastest"}}, "routing_strategy"),
    ({"model_list": [_entry()], "router_settings": {"fallbacks": [{"m": ["ghost"]}]}}, "ghost"),
    ({"model_list": [_entry(tier="spare")]}, "tier"),
    ({"model_list": [_entry()], "tureen_settings": {"redis_failure_mode": "maybe"}}, "redis_failure_mode"),
    ({"model_list": []}, "model_list"),
])
def test_bad_values_are_one_line_errors_naming_the_field(data, field):
    with pytest.raises(GatewayConfigError) as info:
        parse_config(data, "g.yaml")
    message = str(info.value)
    assert message.startswith("g.yaml: ") and field in message and "\n" not in message


def test_os_environ_references_resolve_in_any_value_as_in_litellm(monkeypatch):
    monkeypatch.setenv("REDIS_HOST", "10.0.0.7")
    monkeypatch.setenv("REDIS_PORT", "6380")
    monkeypatch.setenv("AZURE_BASE", "http://10.0.0.8:8000/v1")
    monkeypatch.setenv("UP_KEY", "sk-up")
    config, warnings = parse_config({
        "model_list": [{"model_name": "m", "litellm_params": {"model": "openai/x", "api_base": "os.environ/AZURE_BASE",
                                                               "api_key": "os.environ/UP_KEY"}}],
        "router_settings": {"redis_host": "os.environ/REDIS_HOST", "redis_port": "os.environ/REDIS_PORT"}})
    assert warnings == [] and config.model_list[0].litellm_params.api_base == "http://10.0.0.8:8000/v1"
    assert config.router_settings.redis_connection_url() == "redis://10.0.0.7:6380/0"
    assert config.model_list[0].litellm_params.api_key.get_secret_value() == "sk-up"
    with pytest.raises(GatewayConfigError, match=r"^f.yaml: router_settings.redis_host: environment variable "
                                                 r"NOT_SET_ANYWHERE is not set$"):
        parse_config({"model_list": [{"model_name": "m", "litellm_params": {"model": "x"}}],
                      "router_settings": {"redis_host": "os.environ/NOT_SET_ANYWHERE"}}, "f.yaml")


def test_unknown_keys_warn_everywhere():
    _, warnings = parse_config({"model_list": [_entry(extra_param=1)], "environment_variables": {},
                                "tureen_settings": {"circuit_breaker": {"half_life": 3}}})
    assert {w.split("'")[1] for w in warnings} == {"environment_variables", "model_list.0.litellm_params.extra_param",
                                                   "tureen_settings.circuit_breaker.half_life"}


def test_durations():
    assert parse_duration("30s") == 30 and parse_duration("10m") == 600 and parse_duration("1mo") == 30 * 86400
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_cli_bad_file_exits_nonzero_with_one_line_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_list:\n  - model_name: m\n    litellm_params: {model: x, max_parallel_requests: -3}\n")
    res = subprocess.run([sys.executable, "-m", "tureen.cli", "gateway", "--config", str(bad), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and "model_list.0.litellm_params.max_parallel_requests" in res.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("model_list: [\n")
    res = subprocess.run([sys.executable, "-m", "tureen.cli", "gateway", "--config", str(broken)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "not valid YAML" in res.stderr and "Traceback" not in res.stderr


def test_example_config_is_valid_and_complete(monkeypatch):
    monkeypatch.setenv("TUREEN_MASTER_KEY", "sk-master-example")
    config, warnings = load_config(ROOT / "examples" / "gateway.yaml")
    assert warnings == []
    assert len(config.model_list) >= 2 and config.keys_required


def test_gateway_imports_nothing_from_engine_or_executor():
    code = ("import sys, pkgutil, importlib, tureen.gateway as g\n"
            "for m in pkgutil.iter_modules(g.__path__): importlib.import_module('tureen.gateway.' + m.name)\n"
            "import tureen.bench.fake_upstream\n"
            "bad = [m for m in sys.modules if m.startswith(('tureen.engine', 'tureen.executor', 'torch'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- breaker ---------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_then_half_open_trial_closes_it():
    clock, changes = Clock(), []
    b = CircuitBreaker(BreakerPolicy(consecutive_failures=3, cooldown_s=10), clock, changes.append)
    for _ in range(2):
        assert b.acquire()
        b.record_failure()
    b.record_success()  # the streak resets
    for _ in range(3):
        b.record_failure()
    assert b.state is BreakerState.OPEN and not b.available() and b.retry_in() == 10
    clock.now = 9.9
    assert not b.acquire()
    clock.now = 10.0
    assert b.state is BreakerState.HALF_OPEN
    assert b.acquire() and not b.acquire()  # exactly one trial
    b.record_failure()
    assert b.state is BreakerState.OPEN  # failed trial: open again, fresh cooldown
    clock.now = 20.0
    assert b.acquire()
    b.release()  # a trial without a verdict frees the slot
    assert b.acquire()
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.acquire() and b.acquire()
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.OPEN, BreakerState.HALF_OPEN,
                       BreakerState.CLOSED]


def test_breaker_opens_on_failure_rate_over_the_window():
    clock = Clock()
    b = CircuitBreaker(BreakerPolicy(consecutive_failures=100, failure_rate=0.5, window_s=30, min_requests=10), clock)
    for i in range(9):
        (b.record_failure if i % 2 else b.record_success)()
    assert b.state is BreakerState.CLOSED  # 4 of 9, and fewer than min_requests
    b.record_failure()
    assert b.state is BreakerState.OPEN  # 5 of 10
    clock.now = 100  # old outcomes leave the window
    b2 = CircuitBreaker(BreakerPolicy(consecutive_failures=100, window_s=30, min_requests=4), clock)
    for _ in range(3):
        b2.record_failure()
        b2.record_success()
    clock.now = 200
    b2.record_success()
    assert b2.state is BreakerState.CLOSED


# ---- routing ---------------------------------------------------------------------------------
def _router(strategy, *entries):
    return Router(build_deployments(_config(*entries)), strategy)


def test_least_busy_takes_fewest_inflight_and_breaks_ties_on_scraped_load():
    router = _router(LeastBusy(), _entry(base="http://a:1"), _entry(base="http://b:1"), _entry(base="http://c:1"))
    a, b, c = router.deployments
    a.inflight, b.inflight, c.inflight = 2, 1, 1
    b.num_waiting, c.num_waiting = 3, 0
    assert router.pick("m", _ctx(), set()) is c
    c.kv_cache_usage, c.num_waiting = 0.9, 3
    b.kv_cache_usage = 0.1
    assert router.pick("m", _ctx(), set()) is b
    counts = Counter()
    for d in router.deployments:
        d.inflight = d.num_waiting = d.kv_cache_usage = 0
    for _ in range(30):  # concurrent arrivals: each pick raises the chosen one's in-flight count
        d = router.pick("m", _ctx(), set())
        d.inflight += 1
        counts[d.id] += 1
    assert sorted(counts.values()) == [10, 10, 10]


def test_round_robin_and_weighted():
    router = _router(RoundRobin(), _entry(base="http://a:1"), _entry(base="http://b:1"))
    assert [router.pick("m", _ctx(), set()).id for _ in range(4)] == ["m@a:1", "m@b:1"] * 2
    random.seed(7)
    router = _router(Weighted(), _entry(base="http://a:1", weight=3), _entry(base="http://b:1", weight=1))
    counts = Counter(router.pick("m", _ctx(), set()).id for _ in range(4000))
    assert 2.6 < counts["m@a:1"] / counts["m@b:1"] < 3.4


def _chat(prefix: str, question: str) -> dict:
    return {"messages": [{"role": "system", "content": prefix}, {"role": "user", "content": question}]}


def test_prefix_aware_sticks_per_prefix_and_spreads_prefixes():
    entries = [_entry(base=f"http://r{i}:1") for i in range(4)]
    router = _router(PrefixAware(prefix_chars=64, load_factor=1.25, virtual_nodes=64), *entries)
    homes = {}
    for p in range(40):
        prefix = f"system prompt number {p} " * 4
        picked = {router.pick("m", _ctx(_chat(prefix, f"question {q}")), set()).id for q in range(5)}
        assert len(picked) == 1  # same prefix, different questions: one replica
        homes[p] = picked.pop()
    assert len(set(homes.values())) == 4  # different prefixes spread over every replica
    session = {router.pick("m", _ctx({"messages": [], "user": "alice"}), set()).id for _ in range(5)}
    assert len(session) == 1


def test_prefix_aware_bounded_load_moves_a_hot_prefix_off_a_full_replica():
    entries = [_entry(base=f"http://r{i}:1") for i in range(3)]
    router = _router(PrefixAware(prefix_chars=64, load_factor=1.25, virtual_nodes=64), *entries)
    ctx = _ctx(_chat("one hot prefix " * 8, "q"))
    placed = Counter()
    for _ in range(30):  # 30 concurrent requests for one prefix
        d = router.pick("m", ctx, set())
        d.inflight += 1
        placed[d.id] += 1
    mean = 30 / 3
    assert max(placed.values()) <= 1.25 * mean + 1 and len(placed) >= 2


def test_overflow_only_when_every_primary_is_full_or_shedding():
    router = _router(LeastBusy(), _entry(base="http://p:1", max_parallel_requests=2),
                     _entry(base="http://o:1", tier="overflow"))
    primary, overflow = router.deployments
    assert router.pick("m", _ctx(), set()) is primary
    primary.inflight = 2
    assert router.pick("m", _ctx(), set()) is overflow
    primary.inflight = 0
    primary.shedding_until = float("inf")
    assert router.pick("m", _ctx(), set()) is overflow
    primary.shedding_until = 0
    overflow.max_parallel = 1
    overflow.inflight = 1
    primary.inflight = 2
    with pytest.raises(NoDeployment):
        router.pick("m", _ctx(), set())


def test_router_skips_unhealthy_and_open_deployments():
    router = _router(LeastBusy(), _entry(base="http://a:1"), _entry(base="http://b:1"))
    a, b = router.deployments
    a.healthy = False
    assert {router.pick("m", _ctx(), set()).id for _ in range(10)} == {b.id}
    for _ in range(10):
        b.breaker.record_failure()
    with pytest.raises(NoDeployment) as info:
        router.pick("m", _ctx(), set())
    assert info.value.retry_after > 0


# ---- the relay's usage handling ---------------------------------------------------------------
def _event(payload) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def test_usage_stripper_drops_only_the_usage_chunk_even_when_split_across_reads():
    content = _event({"choices": [{"delta": {"content": "hi"}}], "usage": None})
    usage = _event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
    stream = content + content + usage + b"data: [DONE]\n\n"
    for cut in range(1, len(stream), 7):
        s = UsageStripper()
        out = s.feed(stream[:cut]) + s.feed(stream[cut:]) + s.flush()
        assert out == content + content + b"data: [DONE]\n\n"
        assert s.usage() == {"prompt_tokens": 3, "completion_tokens": 1}
    tail = UsageTail()
    assert tail.feed(stream) == stream and tail.usage() == {"prompt_tokens": 3, "completion_tokens": 1}


def test_deployment_rpm_and_tpm_cap_it_and_weights_default_to_rpm():
    router = _router(LeastBusy(), _entry(base="http://a:1", rpm=2), _entry(base="http://b:1", tpm=100, tier="overflow"))
    a, b = router.deployments
    assert (a.weight, b.weight) == (2.0, 2.0)  # rpm is the basis (a sets it); b, without one, gets the mean
    for _ in range(2):
        assert router.pick("m", _ctx(), set()) is a
        a.count_request(10)
    assert a.at_capacity() and router.pick("m", _ctx(), set()) is b  # a's two requests this minute are spent
    entry = b.count_request(60)
    assert not b.at_capacity()
    entry[1] = 100  # corrected to the real usage
    assert b.at_capacity()
    with pytest.raises(NoDeployment):
        router.pick("m", _ctx(), set())


def test_weights_take_one_basis_per_model_so_units_never_mix():
    def weights(*entries):
        return [d.weight for d in build_deployments(_config(*entries))]

    # LiteLLM's order: weight, else rpm, else tpm; chosen for the whole model, missing values get the mean
    assert weights(_entry(base="http://a:1", weight=2), _entry(base="http://b:1", rpm=300)) == [2.0, 2.0]
    assert weights(_entry(base="http://a:1", rpm=100, tpm=9), _entry(base="http://b:1", rpm=300)) == [100.0, 300.0]
    assert weights(_entry(base="http://a:1", tpm=10), _entry(base="http://b:1", tpm=30)) == [10.0, 30.0]
    assert weights(_entry(base="http://a:1"), _entry(base="http://b:1")) == [1.0, 1.0]
    # each public model has its own basis
    assert weights(_entry("m", base="http://a:1", weight=3), _entry("n", base="http://b:1", rpm=50)) == [3.0, 50.0]


def test_scraped_load_reads_vllm_gauges_summed_over_labels():
    from tureen.gateway.health import parse_load

    text = ('# HELP vllm:num_requests_waiting Requests waiting.\n# TYPE vllm:num_requests_waiting gauge\n'
            'vllm:num_requests_waiting{model_name="a"} 3.0\nvllm:num_requests_waiting{model_name="b"} 1.0\n'
            '# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name="a"} 0.25\n'
            '# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="a"} 7.0\n')
    assert parse_load(text) == {"num_waiting": 4.0, "kv_cache_usage": 0.25}
    assert parse_load("") == {}


def test_prompt_prefix_of_text_token_ids_and_batches():
    from tureen.gateway.routing import prompt_prefix

    assert prompt_prefix({"prompt": "abcdef"}, 3) == "abc"
    assert prompt_prefix({"prompt": ["first prompt", "second"]}, 5) == "first"
    ids = prompt_prefix({"prompt": list(range(100))}, 40)
    assert ids == ",".join(str(i) for i in range(10)) and prompt_prefix({"prompt": [[1, 2]]}, 8) == "1,2"
    assert prompt_prefix({"messages": [{"role": "system", "content": "S" * 10}, {"role": "user", "content": "q"}]},
                         8) == "system:S"
