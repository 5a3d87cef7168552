"""The gateway in front of two real ``tureen serve`` replicas on a tiny checkpoint, with the official client."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway_procs import GatewayProc
from serve_process import ServerProcess

NAME = "tiny-llama"
KEY = "sk-replica"
TOKENS = 12
PREFIX = "You are a support agent for the tureen project. Answer briefly and politely. " * 4


@pytest.fixture(scope="module")
def replicas(llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gw-real")
    servers = [ServerProcess(llama_dir, tmp / f"replica{i}.log", "--block-size", "16", name=NAME, key=KEY)
               for i in range(2)]
    try:
        yield [s.wait_healthy() for s in servers]
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def gateway(replicas, llama_dir, tmp_path_factory):
    entries = [{"model_name": "tiny", "litellm_params": {"model": f"hosted_vllm/{NAME}", "api_base": s.url + "/v1",
                                                          "api_key": "os.environ/REPLICA_KEY"},
                "tureen_params": {"tokenizer": str(llama_dir)}, "model_info": {"id": f"replica{i}"}}
               for i, s in enumerate(replicas)]
    gw = GatewayProc(tmp_path_factory.mktemp("gw-real-gw"),
                     {"model_list": entries, "router_settings": {"routing_strategy": "prefix-aware"},
                      "tureen_settings": {"prefix_aware": {"prefix_chars": 256}}},
                     env={"REPLICA_KEY": KEY})
    try:
        yield gw
    finally:
        gw.stop()


MASTER = "sk-master-real-salt-0123456789abcdef"


@pytest.fixture(scope="module")
def keyed_gateway(replicas, tmp_path_factory):
    """A gateway with virtual keys (and so per-tenant cache salts, on by default) in front of replica 0."""
    entry = {"model_name": "tiny", "litellm_params": {"model": f"hosted_vllm/{NAME}", "api_base": replicas[0].url,
                                                       "api_key": "os.environ/REPLICA_KEY"}}
    gw = GatewayProc(tmp_path_factory.mktemp("gw-real-keyed"),
                     {"model_list": [entry], "general_settings": {"master_key": "os.environ/GW_MASTER"}},
                     env={"REPLICA_KEY": KEY, "GW_MASTER": MASTER})
    try:
        yield gw
    finally:
        gw.stop()


def test_two_tenants_never_share_prefix_cache_blocks(keyed_gateway, replicas):
    def key(team: str) -> openai.OpenAI:
        r = httpx.post(keyed_gateway.url + "/key/generate", json={"team_id": team},
                       headers={"Authorization": f"Bearer {MASTER}"}, timeout=30)
        return openai.OpenAI(base_url=keyed_gateway.url + "/v1", api_key=r.json()["key"], max_retries=0)

    alpha, alpha_too, beta = key("alpha"), key("alpha"), key("beta")
    prompt = "Tenant isolation check: " + "the paged KV cache shares blocks between equal prefixes. " * 6

    def cached(client: openai.OpenAI) -> tuple[int, float]:
        before = _hits(replicas[0].url)
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0)
        return r.usage.prompt_tokens_details.cached_tokens, _hits(replicas[0].url) - before

    assert cached(alpha)[0] == 0
    alpha_again, alpha_hits = cached(alpha)
    assert alpha_again >= 48 and alpha_hits >= 48  # the tenant's own prefix cache works
    assert cached(alpha_too)[0] >= 48  # a team's keys share it (scope: team, the default)
    beta_first, beta_hits = cached(beta)
    assert beta_first == 0 and beta_hits == 0  # same prompt, same replica, another tenant: no hit
    assert cached(beta)[0] >= 48


def _clients(gateway, replicas):
    return (openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0),
            openai.OpenAI(base_url=replicas[0].url + "/v1", api_key=KEY, max_retries=0))


def test_greedy_through_the_gateway_equals_direct(gateway, replicas):
    via, direct = _clients(gateway, replicas)
    greedy = {"max_tokens": TOKENS, "temperature": 0, "extra_body": {"ignore_eos": True}}
    for prompt in ("the quick brown fox", "paged attention keeps every block"):
        expected = direct.completions.create(model=NAME, prompt=prompt, **greedy).choices[0].text
        assert via.completions.create(model="tiny", prompt=prompt, **greedy).choices[0].text == expected
        stream = via.completions.create(model="tiny", prompt=prompt, stream=True, **greedy)
        assert "".join(c.choices[0].text for c in stream) == expected
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    expected = direct.chat.completions.create(model=NAME, messages=messages, **greedy).choices[0].message.content
    full = via.chat.completions.create(model="tiny", messages=messages, **greedy)
    assert full.choices[0].message.content == expected and full.usage.completion_tokens == TOKENS
    chunks = list(via.chat.completions.create(model="tiny", messages=messages, stream=True,
                                              stream_options={"include_usage": True}, **greedy))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == TOKENS


def test_prefix_aware_sticks_to_one_replica_and_its_prefix_cache_hits(gateway, replicas):
    via, _ = _clients(gateway, replicas)
    before = [_hits(s.url) for s in replicas]
    cached = []
    for i in range(5):
        r = via.chat.completions.create(model="tiny", max_tokens=2, temperature=0, messages=[
            {"role": "system", "content": PREFIX}, {"role": "user", "content": f"question number {i}"}])
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
    gained = [_hits(s.url) - b for s, b in zip(replicas, before)]
    assert sorted(g > 0 for g in gained) == [False, True]  # one replica took them all, and its cache hit
    assert cached[0] < cached[1] and all(c >= 16 for c in cached[1:])


def test_context_window_error_has_openai_code_and_phrase_directly_and_through_the_gateway(gateway, replicas):
    long_prompt = "word " * 700  # longer than max_model_len (512) on its own
    direct = httpx.post(replicas[0].url + "/v1/completions", json={"model": NAME, "prompt": long_prompt},
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    via = httpx.post(gateway.url + "/v1/completions", json={"model": "tiny", "prompt": long_prompt}, timeout=30)
    for r in (direct, via):
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded" and "maximum context length" in error["message"]


def _hits(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "vllm:prefix_cache_hits_total")


@pytest.mark.parametrize("field", [{"seed": 2**64}, {"seed": -(2**63) - 1}, {"top_k": 2**64}, {"priority": 2**70},
                                   {"stop_token_ids": [2**64]}, {"max_tokens": 2**64}, {"logprobs": 2**64},
                                   {"best_of": 2**64}])
def test_integers_too_big_for_the_engine_are_a_400_directly_and_through_the_gateway(gateway, replicas, field):
    # Found by fuzzing the gateway: the replica answered 500 (msgpack cannot encode ints past 64 bits) and the
    # gateway passed that through.
    body = {"prompt": "hi", "max_tokens": 2, **field}
    direct = httpx.post(replicas[0].url + "/v1/completions", json={"model": NAME, **body},
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    via = httpx.post(gateway.url + "/v1/completions", json={"model": "tiny", **body}, timeout=30)
    for r in (direct, via):
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
