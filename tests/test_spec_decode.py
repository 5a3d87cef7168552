"""Speculative decoding end to end on the tiny checkpoints: greedy output token-identical to the
engine without speculation and to transformers, sampled output with the same distribution
(chi-square), no leaked blocks, counters that match what was measured, clear start-up errors."""

from __future__ import annotations

import pytest
from checkpoints import ARCHS, build_checkpoint, build_tokenizer
from checkpoints import hf_greedy as _hf_greedy
from chi_square import two_sample

from tureen import LLM, SamplingParams
from tureen.errors import ConfigError

SELF_INT8 = {"method": "draft_model", "model": "self", "quantization": "int8", "num_speculative_tokens": 3}
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


_HF: dict = {}


def hf_greedy(path, ids, n):
    """transformers' greedy continuation, computed once per (checkpoint, prompt, length)."""
    key = (str(path), tuple(ids), n)
    if key not in _HF:
        _HF[key] = _hf_greedy(path, ids, n)
    return _HF[key]


def draft_of(checkpoint_factory, arch):
    """A draft for ``arch``: another architecture's tiny checkpoint, same tokenizer (it rarely agrees)."""
    other = "qwen2" if arch != "qwen2" else "llama"
    return {"method": "draft_model", "model": str(checkpoint_factory(other)), "num_speculative_tokens": 3}


_NOISY = {}


def altered_copy(path, suffix, change):
    """A copy of checkpoint ``path`` whose tensors went through ``change(name, tensor, generator)``."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    key = (path, suffix)
    if key not in _NOISY:
        out = path.parent / f"{path.name}-{suffix}"
        shutil.copytree(path, out, dirs_exist_ok=True)
        for f in out.glob("*.safetensors"):
            gen = torch.Generator().manual_seed(0)
            save_file({k: change(k, v, gen).contiguous() for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
        _NOISY[key] = out
    return _NOISY[key]


def noisy_draft(path, scale=0.02):
    """A separate draft checkpoint that mostly agrees with ``path``: its weights plus a little noise."""
    import torch

    out = altered_copy(path, f"draft{scale}",
                       lambda k, v, gen: v + scale * v.std() * torch.randn(v.shape, generator=gen))
    return {"method": "draft_model", "model": str(out), "num_speculative_tokens": 3}


def peaked(path, factor=4.0):
    """``path`` with its LM head scaled up: confident next-token distributions, so a few thousand
    samples fill the cells of a chi-square test over three-token outcomes."""
    return altered_copy(path, f"peaked{factor}", lambda k, v, gen: v * factor if k == "lm_head.weight" else v)


def make_llm(path, spec=None, **kw):
    defaults = dict(dtype="float32", device="cpu", kv_cache_memory="16MiB", max_model_len=256)
    return LLM(str(path), speculative_config=spec, **{**defaults, **kw})


def prompts_for(tokenizer, count, seed=0, lo=6, hi=30):
    import random
    rng = random.Random(seed)
    ids = tokenizer.encode("the quick brown fox jumps over a lazy dog while paged attention keeps every block "
                           "busy and the scheduler batches requests continuously 東京 🙂 " * 3)
    return [ids[(s := rng.randrange(0, 20)):s + rng.randint(lo, hi)] for _ in range(count)]


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


class OracleProposer:
    """Proposes the true greedy continuation with every third token wrong: point-mass drafts
    (like n-gram's) that the real runner must accept and reject exactly."""

    def __init__(self, refs: dict[tuple, list[int]]) -> None:
        self.refs = refs

    def propose(self, reqs, max_tokens):
        for req, k in zip(reqs, max_tokens):
            ref = self.refs[tuple(req.prompt_token_ids)]
            done = len(req.output_token_ids)
            drafts = ref[done:done + k]
            req.spec_token_ids = [t if (done + j) % 3 else (t + 1) % 100 for j, t in enumerate(drafts)]
            req.draft_probs = None

    def release(self, req_id):
        pass


def spec_engine(path, method, checkpoint_factory, prompts, lengths, **kw):
    if method == "oracle":
        llm = make_llm(path, NGRAM, **kw)
        refs = {tuple(p): hf_greedy(path, p, max(lengths)) for p in prompts}
        llm.llm_engine.speculator.proposer = OracleProposer(refs)
        return llm
    spec = {"self-int8": SELF_INT8, "ngram": NGRAM}.get(method) or noisy_draft(path)
    return make_llm(path, spec, **kw)


def check(llm, path, prompts, outs, lengths):
    for ids, out, n in zip(prompts, outs, lengths):
        for c in out.outputs:
            assert c.token_ids == hf_greedy(path, ids, n), f"prompt {ids}"
    kv = llm.llm_engine.scheduler.kv
    assert kv.pool.num_free == kv.num_blocks, "KV usage returns to idle: no block leaked"


# ---- greedy identity, every architecture, every proposer ------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_identity_every_architecture_and_proposer(arch, checkpoint_factory):
    path = checkpoint_factory(arch)
    base = make_llm(path, max_num_seqs=8)
    prompts = prompts_for(base.get_tokenizer(), 3, seed=1)
    lengths = [16, 7, 20]
    plain = [o.outputs[0].token_ids for o in base.generate(prompts, [greedy(n) for n in lengths])]
    for spec in (NGRAM, SELF_INT8, draft_of(checkpoint_factory, arch)):
        llm = make_llm(path, spec, max_num_seqs=8)
        outs = llm.generate(prompts, [greedy(n) for n in lengths])
        assert [o.outputs[0].token_ids for o in outs] == plain, spec
        check(llm, path, prompts, outs, lengths)
        stats = llm.llm_engine.scheduler.spec_stats
        assert stats.num_drafts > 0
        if spec is SELF_INT8:
            assert stats.num_accepted_tokens > stats.num_draft_tokens // 2, "the int8 self-draft mostly agrees"


METHODS = ["oracle", "self-int8", "draft"]


@pytest.mark.parametrize("method", METHODS)
def test_with_chunked_prefill_under_a_tiny_budget(method, llama_dir, checkpoint_factory):
    prompts = prompts_for(make_llm(llama_dir).get_tokenizer(), 4, seed=2, lo=20, hi=45)
    llm = spec_engine(llama_dir, method, checkpoint_factory, prompts, [12], max_num_batched_tokens=7, max_num_seqs=4)
    outs = llm.generate(prompts, greedy(12))
    check(llm, llama_dir, prompts, outs, [12] * 4)
    assert llm.llm_engine.scheduler.spec_stats.num_accepted_tokens > 0


@pytest.mark.parametrize("method", METHODS)
def test_with_forced_preemption(method, llama_dir, checkpoint_factory):
    prompts = prompts_for(make_llm(llama_dir).get_tokenizer(), 5, seed=3, lo=10, hi=20)
    llm = spec_engine(llama_dir, method, checkpoint_factory, prompts, [30], num_gpu_blocks_override=9, block_size=8,
                      max_num_seqs=6)
    outs = llm.generate(prompts, greedy(30))
    assert llm.llm_engine.scheduler.num_preemptions > 0, "the pool was meant to be too small"
    check(llm, llama_dir, prompts, outs, [30] * 5)


@pytest.mark.parametrize("method", METHODS)
def test_with_prefix_cache_hits_and_n_greater_than_one(method, llama_dir, checkpoint_factory):
    ids = prompts_for(make_llm(llama_dir).get_tokenizer(), 1, lo=40, hi=40)[0]
    shared = ids[:24] + ids[:5]
    llm = spec_engine(llama_dir, method, checkpoint_factory, [ids, shared], [16], block_size=8)
    (first,) = llm.generate([ids], greedy(16))
    (again,) = llm.generate([ids], greedy(16, n=3))
    (partial,) = llm.generate([shared], greedy(8))
    assert again.num_cached_tokens == 32 and partial.num_cached_tokens == 24
    check(llm, llama_dir, [ids, ids, shared], [first, again, partial], [16, 16, 8])
    assert len(again.outputs) == 3


@pytest.mark.parametrize("method", METHODS)
def test_with_requests_arriving_mid_decode(method, llama_dir, checkpoint_factory):
    prompts = prompts_for(make_llm(llama_dir).get_tokenizer(), 5, seed=4, lo=8, hi=30)
    lengths = [20, 14, 25, 9, 16]
    llm = spec_engine(llama_dir, method, checkpoint_factory, prompts, lengths, max_num_batched_tokens=16)
    engine, done, step = llm.llm_engine, {}, 0
    engine.add_request("r0", prompts[0], greedy(lengths[0]))
    while engine.has_unfinished_requests() or len(done) < 5:
        if 1 <= step <= 4:
            engine.add_request(f"r{step}", prompts[step], greedy(lengths[step]))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        assert step < 500
    check(llm, llama_dir, prompts, [done[f"r{i}"] for i in range(5)], lengths)


def test_a_draft_models_cache_comes_out_of_the_same_kv_budget(llama_dir, checkpoint_factory):
    spec = draft_of(checkpoint_factory, "llama")
    llm = make_llm(llama_dir, spec)
    engine = llm.llm_engine
    runner, draft = engine.runner, engine.speculator.proposer
    both = runner.kv_bytes_per_token + draft.runner.kv_bytes_per_token
    assert runner.draft_kv_bytes_per_token() == draft.runner.kv_bytes_per_token
    assert engine.num_kv_blocks == (16 << 20) // (engine.block_size * both) == draft.kv.num_blocks
    alone = make_llm(llama_dir).llm_engine.num_kv_blocks
    assert alone == (16 << 20) // (engine.block_size * runner.kv_bytes_per_token) > engine.num_kv_blocks
    self_draft = make_llm(llama_dir, SELF_INT8).llm_engine
    assert self_draft.num_kv_blocks == alone, "a self-draft shares the target's cache: the budget is the target's"


# ---- the self-draft drafts in the target's own KV cache ----------------------------------------
def test_the_self_draft_shares_the_targets_kv_cache_and_never_prefills(llama_dir):
    llm = make_llm(llama_dir, SELF_INT8)
    engine = llm.llm_engine
    draft = engine.speculator.proposer.runner
    assert draft.kv_caches is engine.runner.kv_caches, "no second cache: the draft reads the target's"
    prompts = prompts_for(llm.get_tokenizer(), 3, seed=5, lo=20, hi=40)
    calls = []
    real = draft.compute_sample_logits
    draft.compute_sample_logits = lambda sched: calls.append([r.num_tokens for r in sched.requests]) or real(sched)
    outs = llm.generate(prompts, greedy(24))
    check(llm, llama_dir, prompts, outs, [24] * 3)
    assert calls and all(n == 1 for step in calls for n in step), "one token per request per draft pass"
    stats = engine.scheduler.spec_stats
    assert stats.num_accepted_tokens > stats.num_draft_tokens // 2


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_the_self_draft_on_a_quantized_kv_cache_changes_no_token(llama_dir, kv_cache_dtype):
    prompts = prompts_for(make_llm(llama_dir).get_tokenizer(), 3, seed=6)
    plain = make_llm(llama_dir, kv_cache_dtype=kv_cache_dtype).generate(prompts, greedy(20))
    llm = make_llm(llama_dir, SELF_INT8, kv_cache_dtype=kv_cache_dtype)
    outs = llm.generate(prompts, greedy(20))
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    assert llm.llm_engine.scheduler.spec_stats.num_accepted_tokens > 0
    kv = llm.llm_engine.scheduler.kv
    assert kv.pool.num_free == kv.num_blocks


def test_self_drafts_leave_a_free_block_per_request_in_the_pool(llama_dir):
    """Drafting reserves lookahead slots on the target's pool, but never its last free blocks:
    each speculating request's next token keeps a block to go to, so drafts never push anyone out."""
    llm = make_llm(llama_dir, SELF_INT8, num_gpu_blocks_override=32, block_size=4)
    engine, kv = llm.llm_engine, llm.llm_engine.scheduler.kv
    ids = prompts_for(llm.get_tokenizer(), 1, seed=7, lo=11, hi=11)[0]
    engine.add_request("r", ids, greedy(20))
    engine.step()  # the prefill; then 3 drafts at positions 11..13, the last in a new block
    (req,) = engine.scheduler.running
    assert len(req.spec_token_ids) == 3 and len(req.block_ids) == 4
    req.clear_spec()
    kv.rollback(req)
    hog = kv.pool.allocate(kv.pool.num_free - 1)  # one free block left, one request running
    engine.speculator.propose(engine.scheduler.running)
    assert req.spec_token_ids == [] and len(req.block_ids) == 3, "the last free block stays free"
    kv.pool.release(hog)
    engine.speculator.propose(engine.scheduler.running)
    assert len(req.spec_token_ids) == 3
    out = {}
    while engine.has_unfinished_requests():
        out.update({o.request_id: o for o in engine.step() if o.finished})
    check(llm, llama_dir, [ids], [out["r"]], [20])


def test_stops_inside_an_accepted_run_end_the_output_where_decoding_would(llama_dir, checkpoint_factory):
    base = make_llm(llama_dir)
    ids = prompts_for(base.get_tokenizer(), 1, lo=20, hi=20)[0]
    (ref,) = base.generate([ids], greedy(30))
    tokens = ref.outputs[0].token_ids
    stop_text = base.get_tokenizer().decode(tokens[8:10])
    kinds = [greedy(30, stop_token_ids=[tokens[11]]), greedy(30, stop=[stop_text]) if stop_text.strip() else None,
             greedy(13)]
    for params in [k for k in kinds if k is not None]:
        want = base.generate([ids], params)[0].outputs[0]
        llm = spec_engine(llama_dir, "oracle", checkpoint_factory, [ids], [30])
        got = llm.generate([ids], params)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == \
            (want.token_ids, want.text, want.finish_reason, want.stop_reason)


# ---- sampling: seeded reproduction, and the distribution --------------------------------------
def test_seeded_sampling_reproduces_with_speculation_on(llama_dir):
    llm = make_llm(llama_dir, SELF_INT8)
    ids = prompts_for(llm.get_tokenizer(), 1)[0]
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, seed=7, ignore_eos=True,
                            repetition_penalty=1.2)
    first = llm.generate([ids], params)[0].outputs[0].token_ids
    others = llm.generate([ids, ids[:5]], [params, SamplingParams(temperature=1.0, max_tokens=9)])
    assert others[0].outputs[0].token_ids == first


def first_three(llm, ids, seeds):
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=3, ignore_eos=True, seed=s) for s in seeds]
    return [tuple(o.outputs[0].token_ids) for o in llm.generate([ids] * len(seeds), params, use_tqdm=False)]




def distribution_pvalue(target_dir, spec: dict, samples: int) -> tuple[float, int, int]:
    """p-value of equal first-three-token distributions (temperature 1, top-p 0.9, one seed per
    sample) without and with speculation; and how many drafted tokens were accepted, of how many."""
    kw = dict(max_num_seqs=256, max_num_batched_tokens=2048, block_size=4)
    base = make_llm(target_dir, **kw)
    ids = prompts_for(base.get_tokenizer(), 1, lo=13, hi=13)[0]  # 12 cached tokens, one computed
    llm = make_llm(target_dir, {**spec, "disable_by_batch_size": None}, **kw)
    plain = first_three(base, ids, range(samples))
    speculated = first_three(llm, ids, range(samples, 2 * samples))
    stats = llm.llm_engine.scheduler.spec_stats
    return two_sample(plain, speculated), stats.num_accepted_tokens, stats.num_draft_tokens


@pytest.mark.parametrize("method", ["self-int8", "draft"])
def test_sampled_first_three_tokens_keep_the_target_distribution(method, llama_dir, request):
    """Chi-square over the joint first-three-token outcomes, with and without speculation.

    CI draws 1,500 samples a side (about 30 s per method on an idle 2-core machine); the full
    test is ``pytest tests/test_spec_decode.py -k distribution --spec-distribution-samples 20000``.
    """
    target = peaked(llama_dir)
    spec = SELF_INT8 if method == "self-int8" else noisy_draft(target, 0.05)
    pvalue, accepted, drafted = distribution_pvalue(target, spec, request.config.getoption("spec_distribution_samples"))
    if method == "draft":  # a draft that disagrees often: both the acceptance test and the residual draw run
        assert 0.2 * drafted < accepted < 0.8 * drafted
    assert accepted > 0
    assert pvalue > 0.01


# ---- counters and bad input ----------------------------------------------------------------
def test_counters_match_the_measured_acceptance(llama_dir, checkpoint_factory):
    from tureen.engine.protocol import EngineStats
    from tureen.server.metrics import ServerMetrics

    prompts = prompts_for(make_llm(llama_dir).get_tokenizer(), 3, seed=5)
    llm = spec_engine(llama_dir, "oracle", checkpoint_factory, prompts, [20])
    sent = []
    runner = llm.llm_engine.runner
    execute = runner.execute

    def spy(sched):  # measure acceptance independently: drafts that equal the reference tokens
        out = execute(sched)
        for sr, toks in zip(sched.requests, out.sampled_token_ids):
            if sr.spec_token_ids:
                sent.append((len(sr.spec_token_ids), len(toks) - 1))
        return out
    runner.execute = spy
    llm.generate(prompts, greedy(20))
    stats = llm.llm_engine.stats().spec_decoding
    metrics = ServerMetrics("m", 256, lambda: EngineStats(spec_decoding=stats), {})
    text = metrics.render().decode()

    def value(name, **labels):
        want = "".join(f'{k}="{v}",' for k, v in labels.items())
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} {want} missing")
    drafts, accepted = value("vllm:spec_decode_num_draft_tokens_total"), value("vllm:spec_decode_num_accepted_tokens_total")
    assert value("vllm:spec_decode_num_drafts_total") == len(sent) > 0
    assert (drafts, accepted) == (sum(d for d, _ in sent), sum(a for _, a in sent))
    assert 0 < accepted / drafts < 1
    assert value("vllm:spec_decode_num_accepted_tokens_per_pos_total", position="0") == sum(a > 0 for _, a in sent)
    assert sum(value("vllm:spec_decode_num_accepted_tokens_per_pos_total", position=str(j))
               for j in range(4)) == accepted


def test_a_draft_with_another_vocabulary_is_refused_at_start_up(llama_dir, tmp_path):
    other = build_checkpoint("qwen2", tmp_path / "other")
    build_tokenizer(other, vocab_size=400)  # same model shape, another tokenizer
    with pytest.raises(ConfigError, match="vocabulary"):
        make_llm(llama_dir, {"method": "draft_model", "model": str(other), "num_speculative_tokens": 2})


def test_bad_speculative_configs_fail_at_start_up(llama_dir):
    for bad in ({"method": "ngram", "num_speculative_tokens": 0}, {"method": "eagle", "num_speculative_tokens": 2}):
        with pytest.raises(ConfigError):
            make_llm(llama_dir, bad)
