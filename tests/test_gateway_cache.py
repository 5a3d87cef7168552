"""The exact response cache, end to end: ``tureen gateway`` with a real redis-server in front of fake
upstreams that count their calls."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from gateway_procs import FakeProc, GatewayProc, deployment, metric
from redis_server import RedisServer
from tureen.gateway.cache.keys import CacheRequest, Controls, canonical_body, is_deterministic

MASTER = "sk-master-cache-0123456789"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "temperature": 0, "max_tokens": 8}
_ID = re.compile(r'"id":\s*"[^"]*"')
_CREATED = re.compile(r'"created":\s*\d+')


def _scrub(text: str) -> str:
    return _CREATED.sub('"created":0', _ID.sub('"id":""', text))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gw-cache")
    redis = RedisServer(tmp / "redis").start()
    fake, other = FakeProc(tmp, tokens=5), FakeProc(tmp, tokens=5)
    config = {"model_list": [deployment("m", fake, input_cost_per_token=1e-6, output_cost_per_token=2e-6),
                             deployment("m2", other)],
              "router_settings": {"num_retries": 0, "redis_url": redis.url},
              "general_settings": {"master_key": "os.environ/CACHE_TEST_MASTER"},
              "litellm_settings": {"cache": True, "cache_params": {"type": "redis", "ttl": 600}}}
    gw = GatewayProc(tmp, config, env={"CACHE_TEST_MASTER": MASTER})
    keys = {}
    for name, team in (("a", "team-a"), ("b", "team-b"), ("solo", None)):
        body = {"key_alias": name, **({"team_id": team} if team else {})}
        r = httpx.post(gw.url + "/key/generate", json=body, headers={"Authorization": f"Bearer {MASTER}"})
        assert r.status_code == 200, r.text
        keys[name] = r.json()["key"]
    try:
        yield gw, fake, other, redis, keys
    finally:
        gw.stop()
        fake.stop()
        other.stop()
        redis.stop()


def _post(gw, key, body, path="/v1/chat/completions", **headers) -> httpx.Response:
    with gw.client(headers={"Authorization": f"Bearer {key}", **headers}) as c:
        return c.post(path, json=body)


def _calls(fake) -> int:
    return fake.stats()["requests"]


def _unique(text: str) -> dict:
    return {**CHAT, "messages": [{"role": "user", "content": text}]}


def test_a_repeated_deterministic_request_is_answered_from_the_cache(stack):
    gw, fake, _, _, keys = stack
    body = _unique("repeat me")
    first = _post(gw, keys["a"], body)
    assert first.status_code == 200 and first.headers["x-tureen-cache"] == "miss"
    calls = _calls(fake)
    second = _post(gw, keys["a"], body)
    assert second.status_code == 200 and second.headers["x-tureen-cache"] == "hit"
    assert _calls(fake) == calls  # no upstream call
    assert _scrub(second.text) == _scrub(first.text)  # byte-identical apart from id/created
    assert second.json()["id"] != first.json()["id"]
    text = gw.metrics()
    assert metric(text, "tureen_gateway_cache_hits_total", tier="exact", model="m") >= 1
    assert metric(text, "tureen_gateway_cache_stores_total", tier="exact", model="m") >= 1
    saved = metric(text, "tureen_gateway_cache_saved_tokens_total", tier="exact", model="m", kind="completion")
    assert saved >= 5
    assert metric(text, "tureen_gateway_cache_saved_cost_total", tier="exact", model="m") > 0


def _events(text: str) -> list[str]:
    return [line[6:] for line in text.split("\n") if line.startswith("data: ")]


def test_streams_are_cached_and_replayed_as_sse_with_usage(stack):
    gw, fake, _, _, keys = stack
    body = {**_unique("stream me"), "stream": True}
    first = _post(gw, keys["a"], body)
    assert first.headers["x-tureen-cache"] == "miss"
    calls = _calls(fake)
    second = _post(gw, keys["a"], body)
    assert second.headers["x-tureen-cache"] == "hit" and _calls(fake) == calls
    assert second.headers["content-type"].startswith("text/event-stream")
    assert [_scrub(e) for e in _events(second.text)] == [_scrub(e) for e in _events(first.text)]
    with_usage = _post(gw, keys["a"], {**body, "stream_options": {"include_usage": True}})
    events = _events(with_usage.text)
    assert with_usage.headers["x-tureen-cache"] == "hit" and events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 5 and json.loads(events[-2])["choices"] == []
    whole = _post(gw, keys["a"], _unique("stream me"))  # the non-streaming form of the same request
    assert whole.headers["x-tureen-cache"] == "hit" and _calls(fake) == calls
    assert whole.json()["choices"][0]["message"]["content"] == " t0 t1 t2 t3 t4"
    assert whole.json()["usage"]["completion_tokens"] == 5


def test_a_stored_body_replays_as_a_stream(stack):
    gw, fake, _, _, keys = stack
    body = _unique("body first")
    text = _post(gw, keys["a"], body).json()["choices"][0]["message"]["content"]
    calls = _calls(fake)
    streamed = _post(gw, keys["a"], {**body, "stream": True})
    assert streamed.headers["x-tureen-cache"] == "hit" and _calls(fake) == calls
    chunks = [json.loads(e) for e in _events(streamed.text)[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_sampled_requests_without_a_seed_are_not_cached(stack):
    gw, fake, _, _, keys = stack
    body = {**_unique("sampled"), "temperature": 0.8}
    _post(gw, keys["a"], body)
    calls = _calls(fake)
    again = _post(gw, keys["a"], body)
    assert again.headers["x-tureen-cache"] == "miss" and _calls(fake) == calls + 1
    seeded = {**body, "seed": 7}
    _post(gw, keys["a"], seeded)
    calls = _calls(fake)
    assert _post(gw, keys["a"], seeded).headers["x-tureen-cache"] == "hit" and _calls(fake) == calls


@pytest.mark.parametrize("change", ["tenant", "model", "sampling", "max_tokens", "endpoint"])
def test_different_tenants_models_and_parameters_never_share_an_entry(stack, change):
    gw, fake, other, _, keys = stack
    body = _unique(f"isolation {change}")
    assert _post(gw, keys["a"], body).status_code == 200
    assert _post(gw, keys["a"], body).headers["x-tureen-cache"] == "hit"
    key, path = keys["a"], "/v1/chat/completions"
    if change == "tenant":
        key = keys["b"]
    elif change == "model":
        body = {**body, "model": "m2"}
    elif change == "sampling":
        body = {**body, "top_p": 0.5}
    elif change == "max_tokens":
        body = {**body, "max_tokens": 9}
    else:
        body, path = {"model": "m", "prompt": f"isolation {change}", "temperature": 0, "max_tokens": 8}, \
            "/v1/completions"
    assert _post(gw, key, body, path).headers["x-tureen-cache"] == "miss"
    for name in ("solo",) if change == "tenant" else ():  # a key without a team is its own tenant
        assert _post(gw, keys[name], _unique(f"isolation {change}")).headers["x-tureen-cache"] == "miss"


def test_equivalent_spellings_share_an_entry_and_user_and_stream_are_not_keyed(stack):
    gw, fake, _, _, keys = stack
    body = _unique("spellings")
    _post(gw, keys["a"], body)
    calls = _calls(fake)
    same = {**body, "max_completion_tokens": 8, "temperature": 0.0, "top_p": 1, "user": "someone"}
    same.pop("max_tokens")
    assert _post(gw, keys["a"], same).headers["x-tureen-cache"] == "hit" and _calls(fake) == calls


def test_ttl_no_cache_and_no_store(stack):
    gw, fake, _, _, keys = stack
    ttl = 2
    short = {**_unique("short-lived"), "cache": {"ttl": ttl}}
    sent = time.monotonic()
    _post(gw, keys["a"], short)  # stored after `sent`, so alive until at least sent + ttl
    again = _post(gw, keys["a"], short)
    if time.monotonic() - sent < ttl:  # no wall-clock assert: on a slow machine the window may have passed
        assert again.headers["x-tureen-cache"] == "hit"
    time.sleep(ttl + 0.3)  # stored before `again` was sent, so gone by now
    assert _post(gw, keys["a"], short).headers["x-tureen-cache"] == "miss"
    # no-store: answered, not stored
    body = _unique("never stored")
    assert _post(gw, keys["a"], {**body, "cache": {"no-store": True}}).status_code == 200
    assert _post(gw, keys["a"], body, **{"Cache-Control": "no-store"}).headers["x-tureen-cache"] == "miss"
    assert _post(gw, keys["a"], body).headers["x-tureen-cache"] == "miss"
    assert _post(gw, keys["a"], body).headers["x-tureen-cache"] == "hit"
    # no-cache: the lookup is skipped (the upstream answers), and the fresh answer is stored
    calls = _calls(fake)
    skipped = _post(gw, keys["a"], {**body, "cache": {"no-cache": True}})
    assert skipped.headers["x-tureen-cache"] == "miss" and _calls(fake) == calls + 1
    assert _post(gw, keys["a"], body, **{"Cache-Control": "no-cache"}).headers["x-tureen-cache"] == "miss"
    assert "cache" not in fake.stats()["last_bodies"][-1]  # the control field never reaches the upstream


def test_errors_and_aborted_streams_are_never_stored(stack):
    gw, fake, _, _, keys = stack
    body = _unique("error once")
    fake.control(fail_status=500, fail_count=1)
    assert _post(gw, keys["a"], body).status_code >= 500
    assert _post(gw, keys["a"], body).headers["x-tureen-cache"] == "miss"  # the error was not stored
    streamed = {**_unique("dies mid-stream"), "stream": True}
    fake.control(die_after_chunks=2)
    try:
        broken = _post(gw, keys["a"], streamed)
        assert "upstream_stream_error" in broken.text
    finally:
        fake.control(die_after_chunks=None)
    calls = _calls(fake)
    assert _post(gw, keys["a"], streamed).headers["x-tureen-cache"] == "miss" and _calls(fake) == calls + 1


def test_admin_flush_by_tenant_and_model(stack):
    gw, _, _, _, keys = stack
    body = _unique("flush me")
    for key in (keys["a"], keys["b"]):
        _post(gw, key, body)
        assert _post(gw, key, body).headers["x-tureen-cache"] == "hit"
    denied = httpx.post(gw.url + "/cache/flush", json={"team_id": "team-a"},
                        headers={"Authorization": f"Bearer {keys['a']}"})
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(gw.url + "/cache/flush", json={}, headers={"Authorization": f"Bearer {MASTER}"}
                      ).status_code == 400
    r = httpx.post(gw.url + "/cache/flush", json={"team_id": "team-a"}, headers={"Authorization": f"Bearer {MASTER}"})
    assert r.status_code == 200 and r.json()["removed"]["exact"] >= 1
    assert _post(gw, keys["a"], body).headers["x-tureen-cache"] == "miss"
    assert _post(gw, keys["b"], body).headers["x-tureen-cache"] == "hit"
    r = httpx.post(gw.url + "/cache/flush", json={"model": "m"}, headers={"Authorization": f"Bearer {MASTER}"})
    assert r.json()["removed"]["exact"] >= 1
    assert _post(gw, keys["b"], body).headers["x-tureen-cache"] == "miss"


def test_redis_stopped_mid_run_requests_still_succeed(stack):
    gw, fake, _, redis, keys = stack
    body = _unique("redis outage")
    _post(gw, keys["a"], body)
    redis.stop()
    try:
        # keys fall back to the policy's key cache; the cache tier is skipped
        for _ in range(3):
            r = _post(gw, keys["a"], body)
            assert r.status_code == 200 and r.headers["x-tureen-cache"] == "miss"
        assert metric(gw.metrics(), "tureen_gateway_cache_errors_total", tier="exact") >= 1
        assert gw.log_text().count("the exact cache is unavailable") == 1  # logged once per minute
    finally:
        redis.restart()
    deadline = time.time() + 20
    while _post(gw, keys["a"], body).headers["x-tureen-cache"] != "hit":
        assert time.time() < deadline, "the cache did not come back after Redis did"
        time.sleep(0.3)


# ---- keys, without a process ---------------------------------------------------------------------


def _req(**changes) -> CacheRequest:
    base = dict(endpoint="chat", tenant="team:a", model="m", identity=["fake@"], prompt_version=None,
                canonical=canonical_body(CHAT, "chat"), controls=Controls(), stream=False, include_usage=False)
    return CacheRequest(**{**base, **changes})


def test_the_key_covers_tenant_model_identity_prompt_version_and_body():
    base = _req().key
    assert _req(stream=True, include_usage=True, controls=Controls(no_store=True)).key == base
    for change in ({"tenant": "team:b"}, {"model": "m2"}, {"identity": ["fake@rev2"]},
                   {"prompt_version": "support@v2"}, {"canonical": canonical_body({**CHAT, "seed": 1}, "chat")}):
        assert _req(**change).key != base, change
    assert _req(prompt_version="support@v1").key != _req(prompt_version="support@v2").key


def test_canonical_body_fills_defaults_and_drops_non_semantic_fields():
    a = canonical_body({**CHAT, "user": "u", "stream": True, "stream_options": {"include_usage": True},
                        "stop": "x"}, "chat")
    b = canonical_body({**CHAT, "temperature": 0.0, "n": 1, "stop": ["x"], "top_p": 1}, "chat")
    assert a == b and a["top_p"] == 1.0 and "user" not in a and "stream" not in a
    assert is_deterministic(a)
    assert not is_deterministic(canonical_body({"messages": []}, "chat"))  # default temperature is 1
    assert is_deterministic(canonical_body({"messages": [], "seed": 3}, "chat"))
    assert not is_deterministic(canonical_body({"messages": [], "seed": 3, "n": 2}, "chat"))


# ---- entries and config, without a process -------------------------------------------------------

def _sse(*payloads: str) -> bytes:
    return b"".join(b"data: " + p.encode() + b"\n\n" for p in payloads)


CHUNK = '{"id":"c1","object":"chat.completion.chunk","created":5,"model":"x","choices":[{"index":0,"delta":%s,"finish_reason":%s}]}'


def test_only_complete_responses_make_entries():
    from tureen.gateway.cache.entry import from_response

    whole = {"id": "c1", "created": 5, "model": "x", "choices": [{"index": 0, "message": {"content": "hi"},
                                                                  "finish_reason": "stop"}]}
    assert from_response("chat", False, json.dumps(whole).encode(), None, None) is not None
    for reason in (None, "tool_calls", "abort"):
        cut = {**whole, "choices": [{**whole["choices"][0], "finish_reason": reason}]}
        assert from_response("chat", False, json.dumps(cut).encode(), None, None) is None, reason
    assert from_response("chat", False, b"not json", None, None) is None
    done = _sse(CHUNK % ('{"content":"hi"}', "null"), CHUNK % ("{}", '"length"'), "[DONE]")
    assert from_response("chat", True, done, {"completion_tokens": 1}, None) is not None
    unfinished = _sse(CHUNK % ('{"content":"hi"}', "null"), "[DONE]")
    assert from_response("chat", True, unfinished, None, None) is None
    errored = _sse(CHUNK % ('{"content":"hi"}', "null"), '{"error":{"message":"boom"}}', "[DONE]")
    assert from_response("chat", True, errored, None, None) is None


def test_entries_convert_between_stream_and_body():
    import asyncio

    from tureen.gateway.cache.entry import from_response, respond

    raw = _sse(CHUNK % ('{"role":"assistant","content":"a"}', "null"), CHUNK % ('{"content":"b"}', '"stop"'),
               '{"id":"u","object":"chat.completion.chunk","choices":[],"usage":{"completion_tokens":2}}', "[DONE]")
    entry = from_response("chat", True, raw, None, 0.5)
    assert entry.usage == {"completion_tokens": 2} and len(entry.events) == 2  # the usage chunk is kept aside
    body = json.loads(respond(entry, False, False).body)
    assert body["choices"][0]["message"]["content"] == "ab" and body["usage"] == {"completion_tokens": 2}
    assert body["id"] != "c1" and body["id"].startswith("chatcmpl-")

    async def collect(response) -> bytes:
        return b"".join([chunk async for chunk in response.body_iterator])
    replay = asyncio.run(collect(respond(entry, True, True))).decode()
    events = _events(replay)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"] == {"completion_tokens": 2}
    assert len({json.loads(e)["id"] for e in events[:-1]}) == 1  # one fresh id across the replayed chunks


def test_bad_cache_config_names_the_field():
    from tureen.gateway.config import GatewayConfigError, parse_config

    base = {"model_list": [{"model_name": "m", "litellm_params": {"model": "hosted_vllm/m"}}]}
    for params, field in (({"type": "s3"}, "type"), ({"ttl": 0}, "ttl"), ({"similarity_threshold": 1.5},
                                                                          "similarity_threshold"),
                          ({"supported_call_types": ["nope"]}, "supported_call_types")):
        with pytest.raises(GatewayConfigError, match=f"cache_params.{field}"):
            parse_config({**base, "litellm_settings": {"cache": True, "cache_params": params}})
    config, warnings = parse_config({**base, "litellm_settings": {"cache": True, "cache_params": {
        "type": ["qdrant-semantic", "redis"], "bogus": 1}}})
    assert config.litellm_settings.cache_params.tiers == ["exact", "semantic"]
    assert any("cache_params.bogus" in w for w in warnings)


def test_ttl_levels_and_request_controls():
    from tureen.gateway.cache.settings import CacheParams

    params = CacheParams(ttl=100, model_ttl={"m": 5})
    assert params.ttl_for("m") == 5 and params.ttl_for("other") == 100
    c = Controls.parse({"no-store": True, "ttl": 7, "s-maxage": 30}, "max-age=0, No-Cache")
    assert (c.no_cache, c.no_store, c.ttl, c.s_maxage) == (True, True, 7.0, 30.0)
    assert Controls.parse({"ttl": -1, "s-maxage": "x"}, None) == Controls()  # nonsense is ignored, not an error
    assert Controls.parse("not a dict", "no-store").no_store


def test_bench_serve_cache_dataset_reports_hit_rates_through_the_gateway(stack):
    from rich.console import Console

    from tureen.bench.serve import bench_serve
    from tureen.bench.serve_config import ServeBenchConfig

    gw, fake, _, _, keys = stack
    config = ServeBenchConfig.from_kwargs(base_url=gw.url, model="m", endpoint="chat", dataset="cache",
                                          num_prompts=30, output_len=4, max_concurrency=1, api_key=keys["solo"],
                                          seed=3)
    calls = _calls(fake)
    code, doc = bench_serve(config, Console(file=open("/dev/null", "w")))
    cache = doc["cache"]
    assert code == 0 and doc["completed"] == 30
    kinds = {r["kind"] for r in doc["requests"]}
    assert kinds == {"fresh", "repeat", "paraphrase"}
    assert set(cache["by_kind"]["repeat"]) == {"hit"}  # one at a time: every word-for-word repeat is a hit
    assert cache["by_kind"]["fresh"] == {"miss": sum(1 for r in doc["requests"] if r["kind"] == "fresh")}
    assert cache["hit"]["count"] + cache["miss"]["count"] == 30 and cache["semantic-hit"]["count"] == 0
    assert _calls(fake) - calls == cache["miss"]["count"]  # only misses reached the upstream
    assert cache["hit"]["p50_ttft_ms"] is not None and cache["miss"]["p50_ttft_ms"] is not None
