"""Limits through HTTP: RPM / TPM with correction, parallel requests, budgets from real usage,
max_prompt_tokens, the rolling token budget, the x-ratelimit-* headers, Redis outages in both modes,
and prompt-token counting with the model's own tokenizer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import httpx
import openai
import pytest

from redis_server import redis_server  # noqa: F401  (fixture)
from test_gateway_keys import PolicyServer, error_of, make_config
from tureen.gateway.config import parse_config
from tureen.gateway.limits import format_reset
from tureen.gateway.tokens import EstimateCounter, TokenCounters, max_tokens_of

RATE_HEADERS = [f"x-ratelimit-{what}-{unit}" for unit in ("requests", "tokens")
                for what in ("limit", "remaining", "reset")]


def new_key(server: PolicyServer, **fields) -> str:
    r = server.admin("POST", "/key/generate", json=fields)
    assert r.status_code == 200, r.text
    return r.json()["key"]


def metric(server: PolicyServer, line_start: str) -> float:
    for line in server.metrics().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def server(redis_server, monkeypatch):  # noqa: F811
    with PolicyServer(make_config(redis_server.url, monkeypatch=monkeypatch)) as s:
        yield s


def test_rpm_limit_refuses_the_next_request_with_retry_after_and_headers(server):
    key = new_key(server, rpm_limit=3, tpm_limit=1000)
    answers = [server.chat(key) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    for i, ok in enumerate(answers[:3]):
        assert all(h in ok.headers for h in RATE_HEADERS)
        assert ok.headers["x-ratelimit-limit-requests"] == "3"
        assert ok.headers["x-ratelimit-remaining-requests"] == str(2 - i)
        assert ok.headers["x-ratelimit-limit-tokens"] == "1000"
        assert ok.headers["x-ratelimit-reset-requests"].endswith("s")
    refused = answers[3]
    error = error_of(refused)
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert "requests per min" in error["message"] and key not in refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert metric(server, 'tureen_gateway_rate_limited_requests_total{limit_type="rpm",scope="key"}') == 1
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])


def test_tpm_admits_prompt_plus_max_tokens_and_is_corrected_by_real_usage(server):
    key = new_key(server, tpm_limit=100)
    # "hello there": 11 chars -> 3 prompt tokens (estimate); admitted at 3 + 40, settled at 3 + 5 = 8.
    # Without the correction 2 requests fit; with it, 8 do (7 * 8 + 43 <= 100 < 8 * 8 + 43).
    codes = [server.chat(key, max_tokens=40).status_code for _ in range(10)]
    assert codes == [200] * 8 + [429] * 2
    refused = server.chat(key, max_tokens=40)
    assert error_of(refused)["type"] == "tokens" and refused.headers["x-ratelimit-remaining-tokens"] == "36"
    assert server.chat(key, max_tokens=30).status_code == 200  # 64 + 33 fits
    assert server.chat(key, max_tokens=200).status_code == 429
    alone = error_of(server.chat(key, max_tokens=200))
    assert "Requested 203" in alone["message"] and "alone exceeds" in alone["message"]


def test_per_model_limits_of_a_key(redis_server, monkeypatch):  # noqa: F811
    entries = [{"model_name": m, "litellm_params": {"model": f"openai/{m}", "api_base": "http://127.0.0.1:9"}}
               for m in ("tiny", "big")]
    config = make_config(redis_server.url, monkeypatch=monkeypatch, entry=entries[0])
    config.model_list.append(type(config.model_list[0]).model_validate(entries[1]))
    with PolicyServer(config) as s:
        key = new_key(s, rpm_limit=10, model_rpm_limit={"big": 2}, model_tpm_limit={"tiny": 1000})
        assert [s.chat(key, model="big").status_code for _ in range(3)] == [200, 200, 429]
        refused = s.chat(key, model="big")
        assert "of model 'big'" in error_of(refused)["message"]
        assert refused.headers["x-ratelimit-limit-requests"] == "2"
        ok = s.chat(key, model="tiny")  # the key's other model still has room under rpm_limit
        assert ok.status_code == 200 and ok.headers["x-ratelimit-limit-tokens"] == "1000"
        assert ok.headers["x-ratelimit-remaining-requests"] == "7"
        cleared = s.admin("POST", "/key/update", json={"key": key, "model_rpm_limit": None}).json()
        assert cleared["model_rpm_limit"] == {} and s.chat(key, model="big").status_code == 200


def test_max_prompt_tokens_refuses_long_prompts_only(server):
    key = new_key(server, max_prompt_tokens=10)
    assert server.chat(key).status_code == 200
    long = server.chat(key, messages=[{"role": "user", "content": "word " * 20}])
    assert long.status_code == 400
    error = error_of(long)
    assert error["code"] == "max_prompt_tokens_exceeded" and "25 tokens" in error["message"]
    assert metric(server, 'tureen_gateway_rate_limited_requests_total{limit_type="max_prompt_tokens",scope="key"}') == 1


def test_budget_is_exhausted_by_real_usage_then_429_insufficient_quota(server):
    key = new_key(server, max_budget=0.05, budget_duration="1h")
    # each request costs 3 * 0.001 + 5 * 0.002 = 0.013: spend before the 5th is 0.052 >= 0.05
    codes = [server.chat(key).status_code for _ in range(6)]
    assert codes == [200, 200, 200, 200, 429, 429]
    refused = server.chat(key)
    error = error_of(refused)
    assert error["code"] == "insufficient_quota" and "budget" in error["message"]
    assert 3000 < int(refused.headers["retry-after"]) <= 3600  # the budget period's end
    info = server.admin("GET", "/key/info", params={"key": key}).json()["info"]
    assert info["spend"] == pytest.approx(0.052) and info["max_budget"] == 0.05
    assert metric(server, "tureen_gateway_spend_total") == pytest.approx(0.052)
    assert metric(server, 'tureen_gateway_tokens_total{kind="completion"}') == 20
    raised = server.admin("POST", "/key/update", json={"key": key, "max_budget": 1.0})
    assert raised.status_code == 200 and server.chat(key).status_code == 200


def test_team_limits_and_budget_are_shared_by_the_teams_keys(redis_server, monkeypatch):  # noqa: F811
    config = make_config(redis_server.url, monkeypatch=monkeypatch, settings={
        "teams": {"search": {"rpm_limit": 3}, "ads": {"max_budget": 0.02}}})
    with PolicyServer(config) as s:
        a, b = new_key(s, team_id="search", rpm_limit=10), new_key(s, team_id="search")
        codes = [s.chat(k).status_code for k in (a, b, a, b)]
        assert codes == [200, 200, 200, 429]
        refused = s.chat(a)
        assert "for this team" in error_of(refused)["message"]
        assert refused.headers["x-ratelimit-limit-requests"] == "3"  # the tightest window: the team's
        assert s.chat(new_key(s, team_id="other")).status_code == 200  # another team is not affected
        ads1, ads2 = new_key(s, team_id="ads"), new_key(s, team_id="ads")
        # 0.013 per request: after two the team has spent 0.026 >= 0.02, whichever key asks
        assert [s.chat(k).status_code for k in (ads1, ads2, ads2, ads1)] == [200, 200, 429, 429]
        assert error_of(s.chat(ads2))["code"] == "insufficient_quota"
        assert metric(s, 'tureen_gateway_rate_limited_requests_total{limit_type="budget",scope="team"}') == 3
        assert metric(s, 'tureen_gateway_rate_limited_requests_total{limit_type="rpm",scope="team"}') == 2
        ads = s.admin("GET", "/team/info", params={"team_id": "ads"}).json()
        assert ads["team_info"]["spend"] == pytest.approx(0.026) and ads["team_info"]["max_budget"] == 0.02
        assert len(ads["keys"]) == 2
        search = s.admin("GET", "/team/info", params={"team_id": "search"}).json()
        assert search["team_info"]["rpm_limit"] == 3 and search["team_info"]["spend"] == pytest.approx(0.039)
        assert s.admin("GET", "/team/info", params={"team_id": "nobody"}).status_code == 404


def test_max_parallel_requests_refuses_while_full_and_frees_slots_when_done(server):
    key = new_key(server, max_parallel_requests=2)
    async def make_hold():
        server.hold = asyncio.Event()

    asyncio.run_coroutine_threadsafe(make_hold(), server.loop).result(10)  # in place before any request
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        held = [pool.submit(server.chat, key) for _ in range(2)]
        deadline = time.monotonic() + 10
        while len(server.policy.limits._inflight) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        third = server.chat(key)
        assert third.status_code == 429 and "max_parallel_requests is 2" in error_of(third)["message"]
        server.loop.call_soon_threadsafe(server.hold.set)
        assert [f.result(10).status_code for f in held] == [200, 200]
    server.hold = None
    assert server.chat(key).status_code == 200  # the slots were freed
    assert metric(server, 'tureen_gateway_rate_limited_requests_total{limit_type="max_parallel_requests",'
                          'scope="key"}') == 1


def test_token_budget_refuses_when_configured(redis_server, monkeypatch):  # noqa: F811
    config = make_config(redis_server.url, monkeypatch=monkeypatch,
                         settings={"token_budget": {"tokens": 30, "window_s": 300, "action": "refuse"}})
    with PolicyServer(config) as s:
        key = new_key(s)
        # admitted at 3 tokens each, settled at 8: 3 * 8 + 3 <= 30 < 4 * 8 + 3
        codes = [s.chat(key).status_code for _ in range(6)]
        assert codes == [200] * 4 + [429] * 2
        assert "token budget" in error_of(s.chat(key))["message"]
        assert metric(s, 'tureen_gateway_token_budget_breaches_total{action="refuse"}') == 3
        assert metric(s, 'tureen_gateway_rate_limited_requests_total{limit_type="token_budget",scope="key"}') == 3


def test_token_budget_alerts_without_refusing_and_exports_the_usage(redis_server, monkeypatch):  # noqa: F811
    config = make_config(redis_server.url, monkeypatch=monkeypatch,
                         settings={"token_budget": {"tokens": 20, "window_s": 300, "action": "alert"},
                                   "metrics_label_by": "team"})
    with PolicyServer(config) as s:
        key = new_key(s, team_id="agents")
        codes = [s.chat(key).status_code for _ in range(5)]
        assert codes == [200] * 5
        # usage seen at admission: 3, 11, 19, 27, 35 tokens -> the last two are over 20
        assert metric(s, 'tureen_gateway_token_budget_breaches_total{action="alert",team="agents"}') == 2
        assert metric(s, 'tureen_gateway_token_budget_usage_ratio{team="agents"}') == pytest.approx(35 / 20)
        assert metric(s, 'tureen_gateway_tokens_total{kind="prompt",team="agents"}') == 15


def test_unlimited_keys_and_the_master_key_pass_without_rate_headers(server):
    key = new_key(server)
    ok = server.chat(key)
    assert ok.status_code == 200 and "x-ratelimit-limit-requests" not in ok.headers
    from test_gateway_keys import MASTER
    assert server.chat(MASTER).status_code == 200


@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
def test_redis_stopped_mid_run_then_restarted(redis_server, monkeypatch, mode):  # noqa: F811
    config = make_config(redis_server.url, monkeypatch=monkeypatch,
                         settings={"redis_failure_mode": mode, "key_cache_ttl_s": 60})
    with PolicyServer(config) as s:
        s.policy.store.options.probe_interval_s = 0.05
        key = new_key(s, rpm_limit=3)
        assert s.chat(key).status_code == 200  # verified: now in the in-process key cache
        redis_server.stop()
        during = [s.chat(key) for _ in range(5)]
        unknown = s.chat("sk-never-seen-by-this-gateway-000")
        admin = s.admin("GET", "/key/list")
        redis_server.start()
        time.sleep(0.1)  # past the store's probe interval: the next request tries Redis again
        after = [s.chat(key).status_code for _ in range(3)]
        metrics = s.metrics()
    assert all(r.status_code != 500 for r in [*during, unknown, admin])
    assert unknown.status_code == 503 and "retry-after" in unknown.headers  # never let an unverified key in
    assert admin.status_code == 503
    if mode == "fail_open":
        assert [r.status_code for r in during] == [200] * 5  # more than rpm_limit: served without limits
        assert "tureen_gateway_redis_fail_open_requests_total 5.0" in metrics
    else:
        assert [r.status_code for r in during] == [503] * 5
        assert all(int(r.headers["retry-after"]) >= 1 for r in during)
        assert error_of(during[0])["type"] == "service_unavailable_error"
        assert "tureen_gateway_redis_fail_closed_requests_total 5.0" in metrics
    # recovered by itself, enforcing again: the rpm window (kept by Redis' snapshot) still holds the first request
    assert after == [200, 200, 429]
    assert "tureen_gateway_redis_up 1.0" in metrics
    errors = [line for line in metrics.splitlines() if line.startswith("tureen_gateway_redis_errors_total{")]
    assert errors and all(float(line.rsplit(" ", 1)[1]) >= 1 for line in errors)


def test_without_redis_the_in_process_store_enforces_the_same_limits(monkeypatch):
    with PolicyServer(make_config(None, monkeypatch=monkeypatch)) as s:
        key = new_key(s, rpm_limit=2)
        assert [s.chat(key).status_code for _ in range(3)] == [200, 200, 429]
        assert httpx.get(s.url + "/key/list", headers={"Authorization": "Bearer x"}).status_code == 401


# ---- token counting ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from checkpoints import build_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


def test_prompt_tokens_are_counted_with_the_models_own_tokenizer_and_chat_template(tokenizer_dir):
    from transformers import AutoTokenizer

    tmp_path = tokenizer_dir
    config, _ = parse_config({"model_list": [
        {"model_name": "tiny", "litellm_params": {"model": "openai/tiny", "api_base": "http://127.0.0.1:9"},
         "tureen_params": {"tokenizer": str(tmp_path)}},
        {"model_name": "other", "litellm_params": {"model": "openai/other", "api_base": "http://127.0.0.1:9"},
         "tureen_params": {"tokenizer": str(tmp_path / "missing")}}]})
    counters = TokenCounters.from_config(config)
    reference = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "the quick brown fox 東京 🚀"}]

    def hf_count(messages):
        text = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(reference(text, add_special_tokens=False)["input_ids"])

    expected = hf_count(messages)
    assert expected > 10
    assert asyncio.run(counters.count("tiny", "chat", {"messages": messages})) == expected
    prompt = "paged attention keeps every block busy"
    assert asyncio.run(counters.count("tiny", "completions", {"prompt": prompt})) == len(reference(prompt)["input_ids"])
    assert asyncio.run(counters.count("tiny", "completions", {"prompt": [1, 2, 3]})) == 3
    long = {"messages": [{"role": "user", "content": "the quick brown fox " * 2000}]}  # tokenized off the loop
    assert asyncio.run(counters.count("tiny", "chat", long)) == hf_count(long["messages"])
    wildcard, _ = parse_config({"model_list": [{"model_name": "*", "litellm_params": {
        "model": "openai/*", "api_base": "http://127.0.0.1:9"}, "tureen_params": {"tokenizer": str(tmp_path)}}]})
    served_by_wildcard = TokenCounters.from_config(wildcard).count("any-name", "chat", {"messages": messages})
    assert asyncio.run(served_by_wildcard) == expected
    # a tokenizer that cannot be loaded falls back to the documented estimate
    assert counters.for_model("other").source == "estimate"
    assert asyncio.run(counters.count("other", "chat", {"messages": messages})) == -(-len("be brief\nthe quick brown "
                                                                                          "fox 東京 🚀") // 4)


def test_estimate_and_max_tokens():
    estimate = EstimateCounter(4)
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "12345678"}]}]}
    assert estimate.count("chat", body) == 2
    assert estimate.count("completions", {"prompt": "123456789"}) == 3
    assert max_tokens_of({"max_tokens": 10}) == 10
    assert max_tokens_of({"max_tokens": 10, "max_completion_tokens": 4, "n": 3}) == 12
    assert max_tokens_of({}) is None and max_tokens_of({"max_tokens": True}) is None


def test_reset_header_format():
    assert [format_reset(s) for s in (0.0123, 1, 17.44, 60, 359.2, 3723)] == ["13ms", "1s", "17.5s", "1m0s",
                                                                             "6m0s", "1h2m3s"]


def test_a_hub_id_tokenizer_is_read_from_the_local_cache_without_network(tmp_path, tokenizer_dir, monkeypatch):
    import shutil

    from tureen.gateway.tokens import TokenizerCounter

    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-chat" / "snapshots" / "0123abc"
    shutil.copytree(tokenizer_dir, snapshot)
    (cache / "models--acme--tiny-chat" / "refs").mkdir()
    (cache / "models--acme--tiny-chat" / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hf_constants
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    config, _ = parse_config({"model_list": [
        {"model_name": m, "litellm_params": {"model": f"openai/{m}", "api_base": "http://127.0.0.1:9"},
         "tureen_params": {"tokenizer": hub_id}} for m, hub_id in (("tiny", "acme/tiny-chat"),
                                                                   ("gone", "acme/not-cached"))]})
    counters = TokenCounters.from_config(config)
    assert isinstance(counters.for_model("tiny"), TokenizerCounter)
    assert counters.for_model("gone").source == "estimate"


def test_a_redis_that_refuses_writes_degrades_by_the_failure_mode_never_500(redis_server, monkeypatch):  # noqa: F811
    import redis as redis_client

    config = make_config(redis_server.url, monkeypatch=monkeypatch, settings={"redis_failure_mode": "fail_closed"})
    with PolicyServer(config) as s:
        key = new_key(s, rpm_limit=100)
        assert s.chat(key).status_code == 200
        admin = redis_client.Redis.from_url(redis_server.url)
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")  # every write is now refused with OOM; reads still work
        try:
            refused = s.chat(key)
        finally:
            admin.config_set("maxmemory", "0")
        assert s.chat(key).status_code == 200  # not marked down: the next request goes to Redis at once
        metrics = s.metrics()
    assert refused.status_code == 503 and error_of(refused)["code"] == "policy_store_unavailable"
    assert 'tureen_gateway_redis_errors_total{operation="admit"} 1.0' in metrics


def test_token_budget_gauge_forgets_keys_idle_for_a_window_and_log_lines_are_throttled(caplog):
    from prometheus_client import CollectorRegistry, generate_latest

    from tureen.gateway.accounting import EveryLog, TokenBudgetUsage

    now = [0.0]
    usage = TokenBudgetUsage("team", window_s=300, clock=lambda: now[0])
    registry = CollectorRegistry()
    registry.register(usage)
    usage.observe("a", "k1", 0.5)
    usage.observe("a", "k2", 1.5)
    usage.observe("b", "k3", 0.2)
    text = generate_latest(registry).decode()
    assert 'tureen_gateway_token_budget_usage_ratio{team="a"} 1.5' in text and '{team="b"} 0.2' in text
    now[0] = 200
    usage.observe("a", "k1", 0.7)
    now[0] = 400  # k2 and k3 were last seen 400 s ago: out of the 300 s window
    text = generate_latest(registry).decode()
    assert 'tureen_gateway_token_budget_usage_ratio{team="a"} 0.7' in text and 'team="b"' not in text

    log = EveryLog(60, clock=lambda: now[0])
    assert log.warning("redis down") and not log.warning("redis down") and not log.warning("redis down")
    now[0] += 61
    assert log.warning("redis down")
    assert [r.getMessage() for r in caplog.records][-2:] == ["redis down",
                                                             "redis down (2 more since the last such line)"]


def test_odd_prompts_are_counted_never_a_500(server):
    key = new_key(server, tpm_limit=10_000)
    counters = server.policy.limits.counters
    assert asyncio.run(counters.count("tiny", "completions", {"prompt": [1, 2, 3]})) == 3
    assert asyncio.run(counters.count("tiny", "completions", {"prompt": [[1, 2], [3]]})) == 3
    assert asyncio.run(counters.count("tiny", "completions", {"prompt": [None, {"a": 1}, "abcd"]})) == 1
    assert server.chat(key, messages=[{"role": "user", "content": None}]).status_code == 200
    assert server.chat(key, messages="not a list").status_code == 200  # the upstream judges the shape


def test_a_slot_is_settled_when_the_step_fails_after_admission(server, monkeypatch):
    key = new_key(server, max_parallel_requests=1)
    limits = server.policy.limits

    def broken(*args):
        raise RuntimeError("a bug after admission")

    monkeypatch.setattr(limits, "_watch_budget", broken)
    assert server.chat(key).status_code == 500  # this bare harness has no error handler: uvicorn answers 500
    monkeypatch.undo()
    assert server.chat(key).status_code == 200  # the one slot was freed, not leaked for the lease
