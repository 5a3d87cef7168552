"""``tureen prompts`` on real git repositories: scaffolding, show/render/diff, refusals, promote, rollback, history.

Tag moves here eval against a fake OpenAI-compatible upstream; the gate against a real model is in
test_prompts_eval.py.
"""

from __future__ import annotations

import json

import pytest
import yaml

from gateway_procs import FakeProc
from prompt_fixtures import commit_all, git, make_repo, write_prompt
from tureen.cli import main

PASSING = {"max_tokens": 4, "cases": [{"description": "c", "user": "hi", "assert": [
    {"type": "contains", "value": "t0"}, {"type": "icontains", "value": "T1"}, {"type": "regex", "value": r"t\d"},
    {"type": "not-contains", "value": "zz"}, {"type": "latency", "threshold": 60000},
    {"type": "cost", "threshold": 1.0}]}]}


def prompts(root, *args: str) -> int:
    return main(["prompts", "--registry", str(root), *args])


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    f = FakeProc(tmp_path_factory.mktemp("prompts-fake"), tokens=3)
    try:
        yield f
    finally:
        f.stop()


def test_new_scaffolds_a_prompt_then_the_next_version(tmp_path, capsys):
    root = make_repo(tmp_path)
    assert prompts(root, "new", "support-chat") == 0
    assert sorted(p.name for p in (root / "support-chat").iterdir()) == ["evals", "prompt.yaml", "v1.jinja2"]
    assert (root / "support-chat/evals/support-chat.yaml").exists()
    spec = yaml.safe_load((root / "support-chat/prompt.yaml").read_text())
    spec["versions"]["v1"]["models"] = ["m"]
    (root / "support-chat/prompt.yaml").write_text(yaml.safe_dump(spec))
    assert prompts(root, "new", "support-chat") == 0
    assert (root / "support-chat/v2.jinja2").read_text() == (root / "support-chat/v1.jinja2").read_text()
    assert yaml.safe_load((root / "support-chat/prompt.yaml").read_text())["versions"]["v2"] == {"models": ["m"]}
    (root / "support-chat/v2.jinja2").write_text("Hi from {{ product }}.\n")
    capsys.readouterr()
    assert prompts(root, "diff", "support-chat", "v1", "v2") == 0
    out = capsys.readouterr().out
    assert "-You are a helpful assistant for {{ product }}." in out and "+Hi from {{ product }}." in out
    assert prompts(root, "render", "support-chat", "--version", "v2", "--var", "product=Acme") == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1]) == [{"role": "system", "content": "Hi from Acme."}]
    assert prompts(root, "list") == 0 and "support-chat" in capsys.readouterr().out
    assert prompts(root, "show", "support-chat", "--version", "v1") == 0
    assert "language: enum" in capsys.readouterr().out
    assert prompts(root, "new", "Bad Name") == 1


def test_bad_input_gets_a_clear_error(tmp_path, capsys):
    root = make_repo(tmp_path)
    write_prompt(root, "p", {"v1": "Hello {{ who }}", "v2": "{% if %}"}, variables={"who": {"type": "integer"}})
    commit_all(root)
    capsys.readouterr()
    assert prompts(root, "render", "p", "--version", "v1", "--var", "who=abc") == 1
    assert "variable 'who' must be an integer" in capsys.readouterr().err
    assert prompts(root, "render", "p", "--version", "v2") == 1
    assert "syntax error" in capsys.readouterr().err
    assert prompts(root, "show", "ghost") == 1 and "unknown prompt 'ghost'" in capsys.readouterr().err
    (root / "tags.yaml").write_text("p: {stable: [")
    assert prompts(root, "list") == 1 and "tags.yaml" in capsys.readouterr().err
    assert prompts(tmp_path / "nowhere", "list") == 1


def _registry(tmp_path, n: int = 3):
    root = make_repo(tmp_path)
    write_prompt(root, "s", {f"v{i}": f"version {i} for {{{{ who }}}}" for i in range(1, n + 1)},
                 variables={"who": {"type": "string", "default": "you"}}, evals=PASSING)
    commit_all(root)
    return root


def test_promote_commits_tags_with_results_and_rollback_restores_previous_stable(tmp_path, fake, capsys,
                                                                                   monkeypatch):
    root = _registry(tmp_path)
    url = ["--base-url", fake.url]
    monkeypatch.chdir(root.parent)  # the default registry, ./prompts, relative to the working directory
    assert main(["prompts", "promote", "s", "v1", "--to", "stable", *url]) == 0
    assert not git(root, "status", "--porcelain").strip()
    assert prompts(root, "promote", "s", "v2", "--to", "stable", *url) == 0
    assert prompts(root, "promote", "s", "v3", "--to", "canary", "--canary-weight", "25", *url) == 0
    assert yaml.safe_load((root / "tags.yaml").read_text()) == {"s": {"stable": "v2", "canary": "v3",
                                                                       "canary_weight": 25.0}}
    result = json.loads((root / "s/evals/results/s-v2.json").read_text())
    assert result["candidate"]["pass_rate"] == 1.0 and result["stable"]["version"] == "v1"
    commits = int(git(root, "rev-list", "--count", "HEAD"))
    assert prompts(root, "rollback", "s") == 0
    assert int(git(root, "rev-list", "--count", "HEAD")) == commits + 1
    assert yaml.safe_load((root / "tags.yaml").read_text())["s"]["stable"] == "v1"
    message = git(root, "log", "-1", "--format=%B")
    assert "rollback s stable v2 -> v1" in message and "who: Test Author <author@example.com>" in message
    capsys.readouterr()
    assert prompts(root, "history", "s") == 0
    out = capsys.readouterr().out
    assert out.count("promote") == 3 and "rollback" in out


def test_refuses_a_dirty_tags_file_an_edited_tagged_version_and_uncommitted_versions(tmp_path, fake, capsys):
    root = _registry(tmp_path)
    url = ["--base-url", fake.url]
    assert prompts(root, "promote", "s", "v1", "--to", "stable", *url) == 0
    head = git(root, "rev-parse", "HEAD")
    (root / "tags.yaml").write_text((root / "tags.yaml").read_text() + "# hand edit\n")
    assert prompts(root, "promote", "s", "v2", "--to", "stable", *url) == 1
    assert "uncommitted changes" in capsys.readouterr().err
    assert prompts(root, "rollback", "s") == 1
    git(root, "checkout", "--", "tags.yaml")
    (root / "s/v1.jinja2").write_text("sneaky edit of a tagged version")
    assert prompts(root, "promote", "s", "v2", "--to", "stable", *url) == 1
    error = capsys.readouterr().err
    assert "immutable" in error and "s/v1.jinja2" in error
    git(root, "checkout", "--", "s/v1.jinja2")
    (root / "s/v4.jinja2").write_text("not committed")
    assert prompts(root, "promote", "s", "v4", "--to", "stable", *url) == 1
    assert "not committed" in capsys.readouterr().err
    assert prompts(root, "rollback", "s") == 1  # no earlier stable
    assert git(root, "rev-parse", "HEAD") == head
    # in a pull request the edit is committed: check compares with the base revision
    (root / "s/v4.jinja2").unlink()
    assert prompts(root, "check") == 0
    (root / "s/v1.jinja2").write_text("edited and committed")
    commit_all(root, "sneaky")
    assert prompts(root, "check") == 0 and prompts(root, "check", "--against", head.strip()) == 1
    assert "s/v1.jinja2" in capsys.readouterr().err


def test_a_failing_suite_refuses_and_names_the_failed_assertion(tmp_path, fake, capsys):
    root = make_repo(tmp_path)
    failing = {"cases": [{"description": "json", "user": "hi", "assert": [
        {"type": "is-json"}, {"type": "contains-json", "value": {"type": "object"}},
        {"type": "equals", "value": "exactly this"}]}]}
    write_prompt(root, "f", {"v1": "x"}, evals=failing)
    commit_all(root)
    assert prompts(root, "promote", "f", "v1", "--to", "stable", "--base-url", fake.url) == 1
    assert not (root / "tags.yaml").exists()
    case = json.loads((root / "f/evals/results/f-v1.json").read_text())["candidate"]["cases"][0]
    assert [a["passed"] for a in case["assertions"]] == [False, False, False]
    assert "pass rate 0%" in capsys.readouterr().err


def _result(version: str, passed: list[bool], latency_ms: float):
    from tureen.prompts.evals import CaseResult, SuiteResult
    return SuiteResult("p", version, "m", [CaseResult(f"c{i}", ok, "", latency_ms, 0.0)
                                           for i, ok in enumerate(passed)], 1.0)


def test_gate_rules_threshold_regression_and_latency_growth_with_slack():
    from tureen.prompts.lifecycle import gate
    stable = _result("v1", [True, True, False, True], 100)
    assert gate(_result("v2", [True] * 4, 140), stable, 1.0, 50, 50).passed
    assert not gate(_result("v2", [True, True, False, True], 100), stable, 1.0, 50).passed  # below threshold
    regressed = gate(_result("v2", [True, False, False, True], 100), stable, 0.5, 50)
    assert not regressed.passed and "regression" in regressed.reasons[0]
    slow = gate(_result("v2", [True] * 4, 200), stable, 1.0, 50, 50)
    assert not slow.passed and "p95 latency" in slow.reasons[0]
    assert gate(_result("v2", [True] * 4, 8), _result("v1", [True] * 4, 2), 1.0, 50, 50).passed  # within slack
