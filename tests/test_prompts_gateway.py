"""Registered prompts served through the real gateway in front of a fake upstream."""

from __future__ import annotations

import threading
from collections import Counter

import httpx
import openai
import pytest
import yaml

from gateway_procs import FakeProc, GatewayProc, deployment, metric, wait_until
from prompt_fixtures import commit_all, git, make_repo, write_prompt, write_tags
from tureen.cli import main

VARS = {"customer": {"type": "string"}, "tier": {"type": "enum", "values": ["free", "pro"], "default": "free"}}
SUITE = {"max_tokens": 4, "cases": [{"description": "c", "user": "hi", "assert": [{"type": "contains",
                                                                                  "value": "t0"}]}]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prompts-gw")
    root = make_repo(tmp / "repo")
    write_prompt(root, "support", {"v1": "v1: help {{ customer }} ({{ tier }})", "v2": "v2: hello {{ customer }}"},
                 variables=VARS, evals=SUITE)
    write_prompt(root, "roll", {f"v{i}": f"roll v{i}" for i in (1, 2)}, evals=SUITE)
    write_prompt(root, "loose", {"v1": "loose"}, allow_uncertified="warn")
    write_prompt(root, "fewshot", {"v1": "### system\nYou sort {{ what }}.\n### user\nb a\n### assistant\na b\n"},
                 variables={"what": {"type": "string"}}, type="chat")
    write_tags(root, {"support": {"stable": "v1", "canary": "v2", "canary_weight": 20}, "loose": {"stable": "v1"}})
    commit_all(root)
    fake = FakeProc(tmp, tokens=2, ttft_s=0.0, itl_s=0.0)
    gw = GatewayProc(tmp, {"model_list": [deployment("m", fake), deployment("other", fake)],
                           "tureen_settings": {"prompts": {"registry_path": str(root), "reload_interval_s": 0.2}}})
    try:
        yield gw, fake, root
    finally:
        gw.stop()
        fake.stop()


def _chat(prompt: dict, model: str = "m", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "my order is late"}], "prompt": prompt,
            **extra}


def test_openai_sdk_extra_body_renders_and_prepends_the_prompt(setup):
    gw, fake, _ = setup
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="none")
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "my order is late"}],
        extra_body={"prompt": {"name": "support", "tag": "canary", "variables": {"customer": "Ada"}}})
    assert raw.parse().choices[0].message.content
    assert (raw.headers["x-tureen-prompt-name"], raw.headers["x-tureen-prompt-version"],
            raw.headers["x-tureen-prompt-tag"]) == ("support", "v2", "canary")
    sent = fake.stats()["last_bodies"][-1]
    assert "prompt" not in sent
    assert sent["messages"] == [{"role": "system", "content": "v2: hello Ada"},
                                {"role": "user", "content": "my order is late"}]


@pytest.mark.parametrize("prompt,model,status,param,words", [
    ({"name": "ghost"}, "m", 404, "prompt.name", ["ghost"]),
    ({"name": "support", "tag": "beta", "variables": {"customer": "a"}}, "m", 400, "prompt.tag", ["beta"]),
    ({"name": "support", "version": "v9"}, "m", 404, "prompt.version", ["v9"]),
    ({"name": "support", "variables": {}}, "m", 400, "prompt.variables.customer", ["customer"]),
    ({"name": "support", "variables": {"customer": "a", "tier": "gold"}}, "m", 400, "prompt.variables.tier",
     ["tier"]),
    ({"name": "support", "variables": {"customer": "a"}}, "other", 400, "model", ["support", "other"]),
    ("support", "m", 400, "prompt", ["name"]),
])
def test_bad_prompt_requests_are_openai_errors_naming_the_culprit(setup, prompt, model, status, param, words):
    gw, _, _ = setup
    with gw.client() as c:
        r = c.post("/v1/chat/completions", json=_chat(prompt, model))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and all(w in error["message"] for w in words)


def test_allow_uncertified_warn_serves_logs_and_counts(setup):
    gw, _, _ = setup
    with gw.client() as c:
        r = c.post("/v1/chat/completions", json=_chat({"name": "loose"}, "other"))
    assert r.status_code == 200 and r.headers["x-tureen-prompt-version"] == "v1"
    assert metric(gw.metrics(), "tureen_gateway_prompt_uncertified_total", prompt="loose") >= 1
    assert "not certified for model other" in gw.log_text()


def test_canary_share_is_20_percent_and_sticky_over_2000_requests_from_200_users(setup):
    gw, _, _ = setup
    seen: dict[str, set[str]] = {}
    with gw.client() as c:
        for i in range(2000):
            user = f"user-{i % 200}"
            r = c.post("/v1/chat/completions", json=_chat({"name": "support", "variables": {"customer": user}},
                                                          user=user, max_tokens=1))
            assert r.status_code == 200
            seen.setdefault(user, set()).add(r.headers["x-tureen-prompt-version"])
    assert all(len(v) == 1 for v in seen.values())
    share = sum(v == {"v2"} for v in seen.values()) / len(seen)
    assert abs(share - 0.20) <= 0.03
    text = gw.metrics()
    canary = metric(text, "tureen_gateway_prompt_requests_total", prompt="support", tag="canary")
    stable = metric(text, "tureen_gateway_prompt_requests_total", prompt="support", tag="stable")
    assert canary >= 10 * share * 200 and stable >= 2000 - canary
    assert metric(text, "tureen_gateway_prompt_canary_weight", prompt="support") == 20


def test_prompts_api_serves_the_registry_read_only(setup):
    gw, _, _ = setup
    with gw.client() as c:
        listing = c.get("/v1/prompts").json()["data"]
        one = c.get("/v1/prompts/support", params={"tag": "canary"}).json()
        by_version = c.get("/v1/prompts/support", params={"version": "v1"}).json()
        missing = c.get("/v1/prompts/ghost")
    support = next(p for p in listing if p["name"] == "support")
    assert support["labels"] == {"stable": "v1", "canary": "v2"} and support["versions"] == ["v1", "v2"]
    assert one["version"] == "v2" and one["labels"] == ["canary"] and one["prompt"] == "v2: hello {{ customer }}"
    assert one["type"] == "text" and one["certified_models"] == ["m"] and "customer" in one["variables"]
    assert by_version["labels"] == ["stable"]
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "prompt_not_found"


def _load(gw, stop: threading.Event, versions: Counter, failures: list) -> None:
    with gw.client() as c:
        while not stop.is_set():
            try:
                r = c.post("/v1/chat/completions", json=_chat({"name": "roll"}, max_tokens=1))
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
                continue
            if r.status_code != 200:
                failures.append(r.text)
            else:
                versions[r.headers["x-tureen-prompt-version"]] += 1


def test_rollback_is_served_within_the_reload_interval_with_no_failed_request(setup, monkeypatch):
    gw, fake, root = setup
    url = ["--base-url", fake.url]
    assert main(["prompts", "--registry", str(root), "promote", "roll", "v1", "--to", "stable", *url]) == 0
    assert main(["prompts", "--registry", str(root), "promote", "roll", "v2", "--to", "stable", *url]) == 0
    with gw.client() as c:
        wait_until(lambda: c.post("/v1/chat/completions", json=_chat({"name": "roll"})).headers.get(
            "x-tureen-prompt-version") == "v2")
    stop, versions, failures = threading.Event(), Counter(), []
    threads = [threading.Thread(target=_load, args=(gw, stop, versions, failures)) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: versions["v2"] > 20)
        assert main(["prompts", "--registry", str(root), "rollback", "roll"]) == 0
        seen = versions["v1"]
        wait_until(lambda: versions["v1"] > seen + 20, timeout=10)
        # a malformed, uncommitted tags.yaml: logged, the last good state stays
        good = (root / "tags.yaml").read_text()
        (root / "tags.yaml").write_text("roll: {stable: [oops")
        wait_until(lambda: "prompt registry change refused" in gw.log_text(), timeout=10)
        before = versions["v1"]
        wait_until(lambda: versions["v1"] > before + 20, timeout=10)
        (root / "tags.yaml").write_text(good)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert yaml.safe_load(git(root, "show", "HEAD:prompts/tags.yaml"))["roll"]["stable"] == "v1"
    text = gw.metrics()
    assert metric(text, "tureen_gateway_prompt_reloads_total", result="ok") >= 2
    assert metric(text, "tureen_prompt_eval_pass_rate", prompt="roll", version="v2") == 1.0  # committed results
    assert metric(text, "tureen_prompt_eval_last_run_timestamp_seconds", prompt="roll", version="v2") > 1.7e9


def test_streaming_requests_render_too_and_completions_ignore_the_extension(setup):
    gw, fake, _ = setup
    with gw.client() as c:
        with c.stream("POST", "/v1/chat/completions", json=_chat({"name": "support", "tag": "canary",
                                                                   "variables": {"customer": "Di"}},
                                                                  stream=True)) as r:
            body = r.read().decode()
            assert r.status_code == 200 and r.headers["x-tureen-prompt-version"] == "v2"
        assert body.rstrip().endswith("data: [DONE]")
        assert fake.stats()["last_bodies"][-1]["messages"][0] == {"role": "system", "content": "v2: hello Di"}
        r = c.post("/v1/completions", json={"model": "m", "prompt": "plain text"})
    assert r.status_code == 200 and "x-tureen-prompt-name" not in r.headers


def test_a_registry_that_does_not_load_at_start_degrades_to_503_and_recovers(tmp_path):
    root = make_repo(tmp_path / "repo")
    write_prompt(root, "p", {"v1": "hello"})
    write_tags(root, {"p": {"stable": "v9"}})  # names a missing version
    commit_all(root)
    fake = FakeProc(tmp_path, tokens=1, ttft_s=0.0, itl_s=0.0)
    gw = GatewayProc(tmp_path, {"model_list": [deployment("m", fake)],
                                "tureen_settings": {"prompts": {"registry_path": str(root),
                                                                "reload_interval_s": 0.2}}})
    try:
        with gw.client() as c:
            r = c.post("/v1/chat/completions", json=_chat({"name": "p"}))
            assert r.status_code == 503 and r.json()["error"]["code"] == "prompt_registry_unavailable"
            assert c.post("/v1/chat/completions", json={k: v for k, v in _chat({}).items() if k != "prompt"}
                          ).status_code == 200  # other traffic is served
            write_tags(root, {"p": {"stable": "v1"}})
            wait_until(lambda: c.post("/v1/chat/completions", json=_chat({"name": "p"})).status_code == 200)
        assert "v9.jinja2 does not exist" in gw.log_text()
    finally:
        gw.stop()
        fake.stop()


def test_chat_prompts_prepend_whole_conversations_and_serve_as_message_lists(setup):
    gw, fake, _ = setup
    with gw.client() as c:
        r = c.post("/v1/chat/completions", json=_chat({"name": "fewshot", "version": "v1",
                                                       "variables": {"what": "letters"}}))
        shape = c.get("/v1/prompts/fewshot", params={"version": "v1"}).json()
    assert r.status_code == 200 and r.headers["x-tureen-prompt-tag"] == "version"
    assert [m["role"] for m in fake.stats()["last_bodies"][-1]["messages"]] == ["system", "user", "assistant",
                                                                                 "user"]
    assert shape["type"] == "chat" and shape["prompt"][0] == {"role": "system", "content": "You sort {{ what }}."}
