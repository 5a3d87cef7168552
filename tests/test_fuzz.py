"""``tureen bench fuzz`` in its CI form: a few hundred generated cases per service plus the hand-written ones.

A real ``tureen serve`` (tiny llama checkpoint) and a ``tureen gateway`` in front of it; the full
run (>= 5,000 generated cases per service) is the README's command. A last test shows the checks
bite: against a server with a planted bug the report names it.
"""

from __future__ import annotations

import pytest
from gateway_procs import GatewayProc
from serve_process import ServerProcess

from tureen.bench.fuzz import run_fuzz

KEY = "sk-fuzz"
CI_CASES = 120
# A generated body may ask for hundreds of tokens; on a busy CPU one such case can outlast the
# fuzzer's 60 s timeout. The cap leaves invalid values (what the checks are about) untouched.
MAX_TOKENS = 16
SMALL = {"slow_loris": {"connections": 20, "wait_s": 60}, "concurrent_tiny": {"count": 100, "concurrency": 50},
         "many_stop_strings": {"count": 2000}}


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "serve.log"
    s = ServerProcess(llama_dir, log, "--http-read-timeout", "2", name="tiny", key=KEY)
    try:
        yield s.wait_healthy()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def gateway(server, llama_dir, tmp_path_factory):
    entry = {"model_name": "tiny", "litellm_params": {"model": "hosted_vllm/tiny", "api_base": server.url + "/v1",
                                                       "api_key": "os.environ/FUZZ_REPLICA_KEY"},
             "tureen_params": {"tokenizer": str(llama_dir)}}
    gw = GatewayProc(tmp_path_factory.mktemp("fuzz-gw"), {"model_list": [entry]}, env={"FUZZ_REPLICA_KEY": KEY})
    try:
        yield gw
    finally:
        gw.stop()


def assert_clean(report) -> None:
    assert report.generated_cases >= CI_CASES, report.generated_cases
    assert report.problems == [], report.problems
    assert report.unexpected_5xx == 0
    assert report.health["status"] == 200 and report.health["metrics"]["vllm:num_requests_running"] == 0
    statuses = {s for op in report.operations for s in op.statuses}
    assert 200 in statuses and 400 in statuses  # the generator reached both the happy path and the refusals
    assert {case.name for case in report.hand_written} >= {"invalid UTF-8", "slow-loris", "deeply nested JSON"}


def test_fuzz_the_server(server):
    assert_clean(run_fuzz(server.url, KEY, cases=CI_CASES, quiet=True, case_args=SMALL, max_tokens=MAX_TOKENS))


def test_fuzz_the_gateway(gateway, server):
    assert_clean(run_fuzz(gateway.url, None, cases=CI_CASES, quiet=True, case_args=SMALL, metrics_url=server.url,
                          max_tokens=MAX_TOKENS))


def test_the_checks_find_a_planted_bug(monkeypatch):
    from test_defects import GuardedServer

    import tureen.server.app as app_module

    def broken(*args):
        raise ZeroDivisionError("planted")
    monkeypatch.setattr(app_module, "_tokenize", broken)
    with GuardedServer() as s:
        report = run_fuzz(s.url, None, cases=40, quiet=True, hand_written=())
    tokenize = next(op for op in report.operations if op.operation == "POST /tokenize")
    assert report.unexpected_5xx > 0 and tokenize.statuses.get(500)
    assert any(p.startswith("POST /tokenize: unexpected 500") for p in report.problems), report.problems


def test_max_tokens_cap_shortens_generation_but_keeps_invalid_values():
    from types import SimpleNamespace

    from tureen.bench.fuzz import _capped

    def capped(body, cap=4):
        return _capped(SimpleNamespace(body=body), cap).body

    assert capped({"prompt": "x"}) == {"prompt": "x", "max_tokens": 4}
    assert capped({"messages": [], "max_tokens": 400}) == {"messages": [], "max_tokens": 4}
    assert capped({"prompt": "x", "max_completion_tokens": 9, "max_tokens": 2}) == \
        {"prompt": "x", "max_completion_tokens": 4, "max_tokens": 2}
    for invalid in (-3, "lots", True, None, 2.5e9):
        assert capped({"prompt": "x", "max_tokens": invalid})["max_tokens"] == invalid
    assert capped({"key_alias": "a"}) == {"key_alias": "a"}  # not a generation body
    assert capped(["prompt"]) == ["prompt"] and capped({"prompt": "x"}, None) == {"prompt": "x"}
