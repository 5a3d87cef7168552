"""The eval gate against a real ``tureen serve`` on a tiny checkpoint, at temperature 0; the latency gate and the
judge against scripted models."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from prompt_fixtures import commit_all, git, make_repo, write_prompt, write_tags
from serve_process import ServerProcess
from tureen.cli import main

MODEL = "tiny-llama"
NEVER = {"type": "not-contains", "value": "\u2603never\u2603"}


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    s = ServerProcess(llama_dir, tmp_path_factory.mktemp("prompts-serve") / "server.log", "--max-num-seqs", "8",
                      name=MODEL).wait_healthy()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def env(monkeypatch, server):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    return server


def prompts(root, *args: str) -> int:
    return main(["prompts", "--registry", str(root), *args])


def _cases(asserts: list) -> dict:
    return {"max_tokens": 8, "concurrency": 2, "cases": [
        {"description": f"case {i}", "vars": {"who": name}, "user": f"Say something about {name}.",
         "assert": asserts} for i, name in enumerate(["Ada", "Bo", "Cy"])]}


def _tags(root) -> str:
    return (root / "tags.yaml").read_text()


def test_equals_recorded_from_one_version_gates_the_next(tmp_path, env):
    root = make_repo(tmp_path)
    write_prompt(root, "support", {"v1": "You are a terse assistant for {{ who }}."},
                 models={"v1": [MODEL]}, variables={"who": {"type": "string"}}, evals=_cases([NEVER]))
    commit_all(root)
    assert prompts(root, "eval", "support", "--version", "v1", "--base-url", env.url) == 0
    recorded = json.loads((root / "support/evals/results/support-v1.json").read_text())["candidate"]["cases"]
    assert recorded[0]["output"] and {c["passed"] for c in recorded} == {True}
    suite = {"max_tokens": 8, "cases": [
        {"description": c["description"], "vars": {"who": who}, "user": f"Say something about {who}.",
         "assert": [{"type": "equals", "value": c["output"]}]}
        for c, who in zip(recorded, ["Ada", "Bo", "Cy"])]}
    (root / "support/evals/support.yaml").write_text(yaml.safe_dump(suite))
    commit_all(root, "record outputs")

    assert prompts(root, "promote", "support", "v1", "--to", "stable", "--base-url", env.url) == 0
    assert yaml.safe_load(_tags(root))["support"]["stable"] == "v1"
    message = git(root, "log", "-1", "--format=%B")
    assert "promote support stable none -> v1 (eval 3/3)" in message and "who: Test Author" in message
    assert "score: 1.000 (3/3)" in message and "forced: no" in message
    assert "support-v1.json" in git(root, "show", "--name-only", "--format=", "HEAD")
    assert not git(root, "status", "--porcelain").strip()

    write_prompt(root, "support", {"v2": "Reply only in shouting capital letters and mention {{ who }} twice, "
                                         "then list three unrelated fruits."},
                 models={"v1": [MODEL], "v2": [MODEL]}, variables={"who": {"type": "string"}})
    (root / "support/evals/support.yaml").write_text(yaml.safe_dump(suite))
    commit_all(root, "v2")
    head, tags_before = git(root, "rev-parse", "HEAD"), _tags(root)
    assert prompts(root, "promote", "support", "v2", "--to", "stable", "--base-url", env.url) == 1
    assert _tags(root) == tags_before and git(root, "rev-parse", "HEAD") == head  # refused: nothing moved
    result = json.loads((root / "support/evals/results/support-v2.json").read_text())
    assert result["gate"]["passed"] is False and result["stable"]["pass_rate"] == 1.0

    assert prompts(root, "promote", "support", "v2", "--to", "stable", "--base-url", env.url, "--force") == 0
    message = git(root, "log", "-1", "--format=%B")
    assert "FORCED" in message and "forced: yes" in message and "refused-by-gate:" in message
    assert yaml.safe_load(_tags(root))["support"]["stable"] == "v2"


class _ScriptedModel(BaseHTTPRequestHandler):
    """A chat completions endpoint whose answer ``answer(body)`` scripts."""

    def answer(self, body: dict) -> dict:
        raise NotImplementedError

    def do_POST(self):  # noqa: N802
        data = json.dumps(self.answer(json.loads(self.rfile.read(int(self.headers["content-length"])))))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(data.encode())

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serving(handler: type[_ScriptedModel]):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


PER_TOKEN_S = 0.01


class _Paced(_ScriptedModel):
    """A model whose latency is exactly ``max_tokens`` times PER_TOKEN_S: no engine timing to flake."""

    def answer(self, body: dict) -> dict:
        n = int(body["max_tokens"])
        time.sleep(PER_TOKEN_S * n)
        return {"id": "chatcmpl-paced", "object": "chat.completion", "created": 0, "model": MODEL,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * n},
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": 4, "completion_tokens": n, "total_tokens": 4 + n}}


@pytest.fixture
def paced(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with _serving(_Paced) as url:
        yield url


def test_a_p95_latency_regression_is_refused(tmp_path, paced):
    # 1 token (10 ms) against 120 (1.2 s): far past the default 50% growth and 50 ms slack, on any machine
    root = make_repo(tmp_path)
    write_prompt(root, "fast", {"v1": "Be brief, {{ who }}.", "v2": "Be brief, {{ who }}."},
                 models={"v1": [MODEL], "v2": [MODEL]}, variables={"who": {"type": "string"}},
                 evals=_cases([NEVER]), v1_spec={"config": {"max_tokens": 1}},
                 v2_spec={"config": {"max_tokens": 120}})
    write_tags(root, {"fast": {"stable": "v1"}})
    commit_all(root)
    tags_before = _tags(root)
    assert prompts(root, "promote", "fast", "v2", "--to", "stable", "--base-url", paced) == 1
    assert _tags(root) == tags_before
    gate = json.loads((root / "fast/evals/results/fast-v2.json").read_text())["gate"]
    assert gate["passed"] is False and any("p95 latency" in r for r in gate["reasons"])
    # the same candidate passes when the growth allowed is huge: only latency refused it
    assert prompts(root, "promote", "fast", "v2", "--to", "canary", "--canary-weight", "10", "--base-url",
                   paced, "--max-latency-growth", "1000000") == 0
    assert yaml.safe_load(_tags(root))["fast"] == {"stable": "v1", "canary": "v2", "canary_weight": 10.0}


class _Judge(_ScriptedModel):
    def answer(self, body: dict) -> dict:
        verdict = "PASS-ME" in body["messages"][-1]["content"]
        content = json.dumps({"pass": verdict, "score": float(verdict), "reason": "fake judge"})
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


@pytest.fixture
def judge():
    with _serving(_Judge) as url:
        yield url + "/v1"


def test_llm_rubric_asks_the_judge(tmp_path, env, judge):
    root = make_repo(tmp_path)
    suite = {"max_tokens": 4, "cases": [
        {"description": "judged ok", "user": "hi", "assert": [{"type": "llm-rubric", "value": "PASS-ME please"}]},
        {"description": "judged bad", "user": "hi", "assert": [{"type": "llm-rubric", "value": "strict rubric"}]}]}
    write_prompt(root, "judged", {"v1": "Hello."}, models={"v1": [MODEL]}, evals=suite)
    commit_all(root)
    assert prompts(root, "eval", "judged", "--version", "v1", "--base-url", env.url, "--judge-url", judge) == 1
    cases = json.loads((root / "judged/evals/results/judged-v1.json").read_text())["candidate"]["cases"]
    assert [c["passed"] for c in cases] == [True, False]
    assert cases[1]["assertions"][0]["reason"] == "fake judge"
