"""Speculative decoding's parts on their own: the rejection sampler on synthetic distributions,
n-gram lookup, the config, and the scheduler's lookahead, rollback and counters on a fake model."""

from __future__ import annotations

import pytest
import torch

import fake_runner
from chi_square import chisquare
from fake_runner import FakeExecutor

from tureen.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from tureen.engine.llm_engine import LLMEngine
from tureen.engine.request import Request
from tureen.engine.scheduler import Scheduler
from tureen.engine.spec_decode.proposer import NgramProposer, lookup
from tureen.errors import ConfigError
from tureen.executor.spec_decode.rejection import Draft, greedy_verify, rejection_sample
from tureen.sampling_params import RequestOutputKind, SamplingParams


# ---- the rejection sampler, where exactness can be checked directly -------------------------
@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_rejection_sampler_emits_exactly_the_target_distribution(with_draft_probs):
    """k = 1 over V = 5: the first emitted token must follow p, whatever the draft q was."""
    torch.manual_seed(0)
    p = [0.05, 0.4, 0.3, 0.15, 0.1]
    q = torch.tensor([0.5, 0.1, 0.1, 0.2, 0.1]) if with_draft_probs else None
    n = 20000
    draft_tokens = (torch.multinomial(q, n, replacement=True) if q is not None
                    else torch.full((n,), 3)).tolist()
    drafts = [Draft([t], None if q is None else q[None, :], [None, None]) for t in draft_tokens]
    target = torch.tensor([p, [0.2] * 5], dtype=torch.float32).repeat(n, 1)  # (2n, V)
    first = [out[0] for out in rejection_sample(target, drafts, [False] * n)]
    counts = torch.bincount(torch.tensor(first), minlength=5).tolist()
    assert chisquare(counts, [x * n for x in p]) > 0.01, counts


def test_rejection_sampler_acceptance_rate_is_the_overlap_of_p_and_q():
    """With a draft q, a drafted token is accepted with total probability sum_x min(p(x), q(x))."""
    torch.manual_seed(1)
    p = torch.tensor([0.6, 0.3, 0.1, 0.0])
    q = torch.tensor([0.2, 0.2, 0.2, 0.4])
    n = 20000
    tokens = torch.multinomial(q, n, replacement=True).tolist()
    drafts = [Draft([t], q[None, :], [None, None]) for t in tokens]
    out = rejection_sample(torch.stack([p, p]).repeat(n, 1), drafts, [False] * n)
    accepted = sum(len(o) == 2 for o in out) / n
    assert abs(accepted - float(torch.minimum(p, q).sum())) < 0.015
    assert all(o[0] != 3 for o in out), "a token the target gives probability 0 is never emitted"


def test_rejection_sampler_greedy_keeps_the_argmax_prefix():
    target = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.3, 0.4, 0.3]])
    onehot = torch.nn.functional.one_hot(target.argmax(-1), 3).float()  # greedy rows are one-hot
    assert rejection_sample(onehot, [Draft([1, 0, 2], None, [None] * 4)], [True]) == [[1, 0, 2, 1]]
    assert rejection_sample(onehot, [Draft([1, 2, 2], None, [None] * 4)], [True]) == [[1, 0]]
    assert rejection_sample(onehot, [Draft([0, 0, 2], None, [None] * 4)], [True]) == [[1]]


def test_greedy_verify_equals_the_rejection_sampler_on_one_hot_rows():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(40, 9, generator=g)
    onehot = torch.nn.functional.one_hot(logits.argmax(-1), 9).float()
    best = logits.argmax(-1).tolist()
    drafts, starts, row = [], [], 0
    for k in (1, 3, 4, 2, 4, 3, 1, 4):  # some drafts copy the argmax for a while, then go wrong
        right = torch.randint(0, k + 1, (1,), generator=g).item()
        drafts.append([best[row + j] if j < right else (best[row + j] + 1) % 9 for j in range(k)])
        starts.append(row)
        row += k + 1
    expected = rejection_sample(onehot[:row], [Draft(d, None, [None] * (len(d) + 1)) for d in drafts],
                                [True] * len(drafts))
    assert greedy_verify(logits, starts, drafts) == expected
    assert {len(e) for e in expected} > {1}, "accepted runs of several lengths"


def test_rejection_sampler_is_reproducible_for_seeded_rows():
    target = torch.softmax(torch.randn(4, 50), -1)
    drafts = [Draft([3, 7, 9], None, [11, 12, 13, 14])]
    runs = {tuple(rejection_sample(target, drafts, [False])[0]) for _ in range(5)}
    assert len(runs) == 1


# ---- n-gram lookup --------------------------------------------------------------------------
def test_ngram_lookup_takes_the_longest_suffix_and_its_latest_occurrence():
    seq = [1, 2, 3, 4, 9, 2, 3, 5, 8, 1, 2, 3]
    assert lookup(seq, 1, 3, 2) == [4, 9]  # "1 2 3" occurred at the start
    assert lookup([5, 2, 3, 7, 6, 2, 3, 8, 0, 2, 3], 1, 2, 3) == [8, 0, 2]  # latest "2 3"
    assert lookup([1, 2, 3, 4], 1, 3, 2) == []  # no earlier occurrence
    assert lookup([7, 1, 7], 2, 3, 2) == []  # only a 1-token match, below the minimum
    assert lookup([7, 1, 7], 1, 3, 2) == [1, 7]
    assert lookup([4, 4, 4, 4], 1, 2, 5) == [4] * 5  # a repetition continues past the end of the sequence
    assert lookup([1, 2, 3, 1, 2], 1, 2, 5) == [3, 1, 2, 3, 1]


# ---- config and bad input -------------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": -2}, "num_speculative_tokens"),
    ({"method": "medusa", "num_speculative_tokens": 2}, "method"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs a model"),
    ({"method": "draft_model", "model": "self", "num_speculative_tokens": 2}, "quantization"),
    ({"method": "ngram", "num_speculative_tokens": 2, "colour": "blue"}, "unknown"),
])
def test_bad_speculative_configs_are_clear_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig.from_kwargs(None, speculative_config=bad)


def test_speculative_config_from_json_and_defaults():
    cfg = EngineConfig.from_kwargs(None, speculative_config='{"method": "ngram", "num_speculative_tokens": 3}')
    spec = cfg.speculative_config
    assert (spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max) == (3, 1, 5)
    with pytest.raises(ConfigError, match="JSON"):
        SpeculativeConfig.parse("{nope")


# ---- scheduler: lookahead slots, rollback, counters (fake model, no torch in the engine path) --
def _looping_model(seq):
    """A next-token rule that reads only the last token, so sequences cycle and n-gram drafts often hit."""
    return (seq[-1] * 7 + 3) % 23


def _run(sched: Scheduler, runner, proposer=None, steps=2000):
    for _ in range(steps):
        if not sched.has_unfinished():
            return
        out = sched.schedule()
        sched.update_from_output(out, runner.execute(out))
        if proposer is not None:
            ready = [r for r in sched.running if r.num_computed_tokens == r.num_tokens - 1]
            proposer.propose(ready, [4] * len(ready))
    raise AssertionError("did not finish")


@pytest.mark.parametrize("num_blocks, budget", [(64, 2048), (12, 2048), (64, 5)])
def test_speculation_is_identical_on_a_fake_model_and_leaks_no_blocks(monkeypatch, num_blocks, budget):
    monkeypatch.setattr(fake_runner, "next_token", _looping_model)

    def run(spec: bool):
        sched = Scheduler(SchedulerConfig(max_num_batched_tokens=budget), CacheConfig(block_size=4), 512,
                          num_blocks, num_spec_tokens=4 if spec else 0)
        reqs = [Request(f"r{i}", [i + 1, 2 * i + 3, 5], SamplingParams(temperature=0.0), max_tokens=20 + 3 * i)
                for i in range(6)]
        for r in reqs:
            sched.add_request(r)
        _run(sched, fake_runner.FakeRunner(num_blocks, 4), NgramProposer(1, 3) if spec else None)
        assert sched.kv.pool.num_free == num_blocks, "every block is back in the pool"
        return [r.output_token_ids for r in reqs], sched

    plain, _ = run(False)
    spec, sched = run(True)
    assert spec == plain
    stats = sched.spec_stats
    assert stats.num_accepted_tokens > 0 and stats.num_accepted_tokens < stats.num_draft_tokens
    assert sum(stats.accepted_per_pos) == stats.num_accepted_tokens
    assert stats.accepted_per_pos == sorted(stats.accepted_per_pos, reverse=True)
    if num_blocks == 12:
        assert sched.num_preemptions > 0


def test_rejected_drafts_free_their_blocks_at_once(monkeypatch):
    monkeypatch.setattr(fake_runner, "next_token", _looping_model)
    sched = Scheduler(SchedulerConfig(), CacheConfig(block_size=2), 512, 32, num_spec_tokens=6)
    req = Request("r", [1, 2, 3], SamplingParams(temperature=0.0), max_tokens=50)
    sched.add_request(req)
    runner = fake_runner.FakeRunner(32, 2)
    out = sched.schedule()
    sched.update_from_output(out, runner.execute(out))
    true_next = _looping_model(req.all_token_ids)
    req.spec_token_ids = [(true_next + 1) % 23 + 23] * 6  # certain to be rejected at the first position
    out = sched.schedule()
    assert len(req.block_ids) == 5  # 4 known tokens + 6 lookahead slots, 2 per block
    assert out.requests[0].spec_token_ids == req.spec_token_ids
    sched.update_from_output(out, runner.execute(out))
    assert req.output_token_ids[-1] == true_next and req.num_computed_tokens == 4
    assert len(req.block_ids) == 3 and sched.kv.pool.num_free == 29  # 5 tokens known: 3 blocks kept


def test_drafts_respect_max_tokens_and_the_token_budget(monkeypatch):
    monkeypatch.setattr(fake_runner, "next_token", _looping_model)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=3), CacheConfig(block_size=4), 512, 32,
                      num_spec_tokens=5)
    req = Request("r", [1, 2, 3], SamplingParams(temperature=0.0), max_tokens=4)
    sched.add_request(req)
    runner = fake_runner.FakeRunner(32, 4)
    out = sched.schedule()
    sched.update_from_output(out, runner.execute(out))
    req.spec_token_ids = [0, 0, 0, 0, 0]
    out = sched.schedule()
    assert out.num_batched_tokens == 3 and len(out.requests[0].spec_token_ids) == 2  # budget 3 = 1 + 2 drafts
    req.spec_token_ids = [9] * 5
    req.output_token_ids.extend([0, 0])  # pretend: 3 outputs, so only 1 more may come: no drafts
    assert sched._num_spec_tokens(req, 1, 100) == 0


# ---- the engine with a fake executor: opt-out, auto-off ---------------------------------------
def _engine(llama_dir, **spec):
    cfg = EngineConfig.from_kwargs(str(llama_dir), max_model_len=256, speculative_config={
        "method": "ngram", "num_speculative_tokens": 3, **spec})
    return LLMEngine(cfg, runner=FakeExecutor(num_blocks=128, vocab_size=1000))


def _drain(engine):
    done = {}
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            return done
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    raise AssertionError("did not finish")


def _fake_params(**kw):
    return SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY,
                          **kw)


def test_logprobs_requests_opt_out_and_the_batch_threshold_turns_speculation_off(llama_dir, monkeypatch):
    monkeypatch.setattr(fake_runner, "next_token", _looping_model)
    engine = _engine(llama_dir)
    engine.add_request("lp", [1, 2, 3], _fake_params(logprobs=1))
    _drain(engine)
    assert engine.scheduler.spec_stats.num_drafts == 0
    engine.add_request("plain", [1, 2, 3], _fake_params())
    _drain(engine)
    assert engine.scheduler.spec_stats.num_drafts > 0

    busy = _engine(llama_dir, disable_by_batch_size=2)
    for i in range(3):
        busy.add_request(f"r{i}", [1, 2, 3 + i], _fake_params())
    _drain(busy)
    assert busy.scheduler.spec_stats.num_drafts == 0, "3 running requests > disable_by_batch_size=2"


def test_the_stats_line_reports_acceptance_over_the_interval(caplog):
    from tureen.engine.protocol import EngineStats
    from tureen.engine.spec_decode.stats import SpecDecodingStats
    from tureen.server.stats_log import log_stats_line

    earlier = EngineStats(num_running=1, generation_tokens=10,
                          spec_decoding=SpecDecodingStats(4, 10, 40, 20, [8, 6, 4, 2]))
    now = EngineStats(num_running=1, generation_tokens=50,
                      spec_decoding=SpecDecodingStats(4, 20, 80, 50, [17, 15, 11, 7]))
    with caplog.at_level("INFO", logger="tureen.server.stats"):
        log_stats_line(now, earlier, 1.0)
    line = caplog.records[-1].getMessage()
    # interval: 10 drafts, 40 drafted tokens, 30 accepted
    assert "spec_acceptance_rate_pct=75.000" in line and "spec_mean_acceptance_length=4.000" in line, line
    assert "spec_drafts=10" in line
    with caplog.at_level("INFO", logger="tureen.server.stats"):
        log_stats_line(EngineStats(num_running=1), EngineStats(), 1.0)
    assert "spec_" not in caplog.records[-1].getMessage()


def test_bench_spec_reports_every_method_side_by_side(llama_dir, tmp_path):
    import json

    from tureen.cli import main

    out = tmp_path / "spec.json"
    code = main(["bench", "spec", str(llama_dir), "--dtype", "float32", "--kv-cache-memory", "16MiB",
                 "--max-model-len", "512", "--methods", "ngram,self-int8", "--batch-sizes", "1,3",
                 "--disable-by-batch-size", "2", "--output-len", "6", "--repeats", "1", "--save-result", str(out),
                 "--plot", str(tmp_path / "spec.png")])
    assert code in (0, None)
    rows = json.loads(out.read_text())
    assert {(r["workload"], r["batch_size"], r["method"]) for r in rows} == {
        (w, b, m) for w in ("echo", "ordinary") for b in (1, 3) for m in ("none", "ngram", "self-int8")}
    for r in rows:
        assert r["median_tokens_per_s"] > 0 and r["median_tpot_ms"] > 0
        base = next(b for b in rows if (b["workload"], b["batch_size"], b["method"]) ==
                    (r["workload"], r["batch_size"], "none"))
        assert r["decode_speedup"] == pytest.approx(base["median_tpot_ms"] / r["median_tpot_ms"])
        if r["method"] == "none" or r["batch_size"] == 3:  # batch 3 > disable_by_batch_size 2: off
            assert r["num_drafts"] == 0
        elif r["method"] == "self-int8":  # n-gram may find nothing to copy in a random model's output
            assert r["num_drafts"] > 0 and r["acceptance_rate"] is not None
    assert (tmp_path / "spec.png").stat().st_size > 0


def test_bench_serve_reads_the_servers_spec_counters_and_checks_its_setting():
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from tureen.bench.serve_config import ServeBenchConfig
    from tureen.bench.spec_metrics import parse_spec_counters
    from tureen.engine.spec_decode.stats import SpecDecodingStats
    from tureen.server.metrics import EngineStateCollector

    assert parse_spec_counters("# HELP x y\n# TYPE x counter\nx_total 3.0\n") is None  # speculation off
    registry = CollectorRegistry()
    stats = SimpleNamespace(num_running=0, num_waiting=0, kv_cache_usage=0.0, prefix_cache_queries=0,
                            prefix_cache_hits=0, num_preemptions=0, prompt_tokens=0, generation_tokens=0,
                            spec_decoding=None)
    registry.register(EngineStateCollector({"model_name": "m", "engine": "0"}, lambda: stats, {}))
    before = parse_spec_counters(generate_latest(registry).decode())
    assert before is None
    stats.spec_decoding = SpecDecodingStats(num_spec_tokens=3)
    for drafted, accepted in ((3, 3), (3, 1), (2, 0)):
        stats.spec_decoding.observe(drafted, accepted)
    run = parse_spec_counters(generate_latest(registry).decode())
    assert (run.num_drafts, run.num_draft_tokens, run.num_accepted_tokens) == (3, 8, 4)
    assert run.acceptance_rate == pytest.approx(0.5) and run.mean_acceptance_length == pytest.approx(1 + 4 / 3)
    assert run.minus(run).acceptance_rate is None
    with pytest.raises(ConfigError, match="method"):
        ServeBenchConfig.from_kwargs(speculative_config='{"method": "nope", "num_speculative_tokens": 2}')
    ok = ServeBenchConfig.from_kwargs(speculative_config='{"method": "ngram", "num_speculative_tokens": 2}')
    assert ok.describe()["speculative_config"] == '{"method": "ngram", "num_speculative_tokens": 2}'


def test_a_draft_quantized_at_load_time_quantizes_its_lm_head_too(llama_dir, tmp_path):
    from tureen.executor.spec_decode.draft import quantizes_lm_head

    self_int8 = SpeculativeConfig(method="draft_model", model="self", quantization="int8", num_speculative_tokens=2)
    plain = SpeculativeConfig(method="draft_model", model=str(llama_dir), num_speculative_tokens=2)
    assert quantizes_lm_head(self_int8, llama_dir) and not quantizes_lm_head(plain, llama_dir)
