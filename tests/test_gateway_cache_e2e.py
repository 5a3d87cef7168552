"""Both cache tiers at once (exact in a real redis-server, semantic with MiniLM in embedded Qdrant) in
``tureen gateway``, in front of a real ``tureen serve`` on a tiny checkpoint and a fake upstream that
counts its calls; driven with the official ``openai`` client."""

from __future__ import annotations

import httpx
import openai
import pytest

pytest.importorskip("qdrant_client")
pytest.importorskip("transformers")

from gateway_procs import FakeProc, GatewayProc, deployment, metric  # noqa: E402
from redis_server import RedisServer  # noqa: E402
from serve_process import ServerProcess  # noqa: E402

MASTER = "sk-master-e2e-0123456789"
ENGINE_KEY = "sk-engine"
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def stack(llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gw-cache-e2e")
    started = []
    try:
        engine = ServerProcess(llama_dir, tmp / "engine.log", name="tiny-llama", key=ENGINE_KEY)
        started.append(engine)
        redis = RedisServer(tmp / "redis").start()
        started.append(redis)
        fake = FakeProc(tmp, tokens=4)
        started.append(fake)
        engine.wait_healthy()
        config = {
            "model_list": [{"model_name": "tiny", "litellm_params": {"model": "hosted_vllm/tiny-llama",
                                                                     "api_base": engine.url + "/v1",
                                                                     "api_key": "os.environ/E2E_ENGINE_KEY"}},
                           deployment("fake", fake)],
            "router_settings": {"num_retries": 0, "redis_url": redis.url},
            "general_settings": {"master_key": "os.environ/E2E_MASTER"},
            "litellm_settings": {"cache": True, "cache_params": {"type": ["redis", "qdrant-semantic"]}}}
        gw = GatewayProc(tmp, config, env={"E2E_MASTER": MASTER, "E2E_ENGINE_KEY": ENGINE_KEY}, wait=False)
        started.append(gw)
        from gateway_procs import _wait
        _wait(gw.url + "/health", gw.proc, gw.log_path, timeout=180)  # the embedding model loads first
        keys = {}
        for team in ("a", "b"):
            r = httpx.post(gw.url + "/key/generate", json={"team_id": team},
                           headers={"Authorization": f"Bearer {MASTER}"})
            keys[team] = r.json()["key"]
        yield gw, fake, keys
    finally:
        for proc in reversed(started):
            proc.stop()


def _client(gw, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def _ask(client, text, model="fake", system=None, **extra):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, **GREEDY, **extra)
    return raw.headers, raw.parse()


def test_real_engine_greedy_answers_are_cached_exactly_also_streamed(stack):
    gw, _, keys = stack
    client = _client(gw, keys["a"])
    first = client.completions.with_raw_response.create(model="tiny", prompt="the quick brown fox", **GREEDY)
    again = client.completions.with_raw_response.create(model="tiny", prompt="the quick brown fox", **GREEDY)
    assert first.headers["x-tureen-cache"] == "miss" and again.headers["x-tureen-cache"] == "hit"
    assert again.parse().choices[0].text == first.parse().choices[0].text
    assert again.parse().usage.completion_tokens == first.parse().usage.completion_tokens
    stream = client.completions.create(model="tiny", prompt="the quick brown fox", stream=True,
                                       stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == first.parse().choices[0].text
    assert chunks[-1].usage.completion_tokens == first.parse().usage.completion_tokens
    messages = [{"role": "user", "content": "hello there"}]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages, stream=True, **GREEDY))
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=messages, **GREEDY)
    assert raw.headers["x-tureen-cache"] == "hit" and raw.parse().choices[0].message.content == streamed


def test_a_paraphrase_is_a_semantic_hit_and_a_near_miss_is_not(stack):
    gw, fake, keys = stack
    client = _client(gw, keys["a"])
    headers, first = _ask(client, "How do I reset my password?")
    assert headers["x-tureen-cache"] == "miss"
    calls = fake.stats()["requests"]
    headers, para = _ask(client, "I forgot my password, how can I reset it?")
    assert headers["x-tureen-cache"] == "semantic-hit" and fake.stats()["requests"] == calls
    assert float(headers["x-tureen-cache-similarity"]) >= 0.8
    assert para.choices[0].message.content == first.choices[0].message.content
    headers, _ = _ask(client, "How do I delete my account?")
    assert headers["x-tureen-cache"] == "miss" and fake.stats()["requests"] == calls + 1
    stream = client.chat.completions.create(model="fake", stream=True, messages=[
        {"role": "user", "content": "How can I reset my password?"}], **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == first.choices[0].message.content
    assert fake.stats()["requests"] == calls + 1
    text = gw.metrics()
    assert metric(text, "tureen_gateway_cache_hits_total", tier="semantic", model="fake") >= 2
    assert metric(text, "tureen_gateway_cache_embedding_seconds_count", model="fake") >= 3


def test_semantic_tenant_isolation_and_system_prompts(stack):
    gw, fake, keys = stack
    a, b = _client(gw, keys["a"]), _client(gw, keys["b"])
    _ask(a, "What is the capital of France?", system="Answer in one word.")
    assert _ask(a, "Which city is the capital of France?", system="Answer in one word.")[0]["x-tureen-cache"] \
        == "semantic-hit"
    calls = fake.stats()["requests"]
    assert _ask(b, "What is the capital of France?", system="Answer in one word.")[0]["x-tureen-cache"] == "miss"
    assert _ask(a, "What is the capital of France?", system="Answer at length.")[0]["x-tureen-cache"] == "miss"
    assert fake.stats()["requests"] == calls + 2
