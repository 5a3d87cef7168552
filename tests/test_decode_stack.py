"""The native decode stack (executor/decode_stack.py, csrc/decode_stack.c), the greedy fast path
and the step-time breakdown.

The stack must be an exact stand-in for the layer-by-layer path: same kernels in the same order, so
the logprobs of every decode step are compared for equality, not closeness; and greedy tokens
must still match transformers."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest
import torch
from checkpoints import hf_greedy

from tureen import LLM, SamplingParams
from tureen.engine.messages import ScheduledRequest, TokenBitmask
from tureen.engine.step_timing import NULL_TIMER, StepTimer
from tureen.executor.decode_stack import DecodeInputs, NativeDecodeStack
from tureen.executor.sampler import Sampler, SamplingMetadata, greedy_tokens, plain_greedy

STACK_ARCHS = ["llama", "llama3", "llama-mqa", "mistral", "qwen2"]  # qwen3 normalises q/k: layer path


def make_llm(path, **kw):
    defaults = dict(dtype="float32", device="cpu", kv_cache_memory="16MiB", max_model_len=256, block_size=4)
    return LLM(str(path), **{**defaults, **kw})


def prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(5, vocab, (length,), generator=g).tolist() for length in (3, 9, 17, 30)[:n]]


def step_logprobs(out) -> list[dict[int, float]]:
    return [{t: lp.logprob for t, lp in step.items()} for step in out.outputs[0].logprobs]


@pytest.mark.parametrize("arch", STACK_ARCHS)
def test_stack_logprobs_equal_the_layer_path_exactly(checkpoint_factory, arch):
    path = checkpoint_factory(arch)
    native, layers = make_llm(path), make_llm(path, decode_stack="layers")
    assert native.llm_engine.runner.decode_stack is not None
    assert layers.llm_engine.runner.decode_stack is None
    ps = prompts(4, native.llm_engine.runner.vocab_size)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=3) for n in (12, 7, 20, 3)]
    a, b = native.generate(ps, params, use_tqdm=False), layers.generate(ps, params, use_tqdm=False)
    for x, y in zip(a, b):  # requests finish at different steps: the batch shrinks under the stack
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert step_logprobs(x) == step_logprobs(y)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_stack_runs_quantized_weights_like_the_layer_path(llama_dir, quantization):
    kw = dict(quantization=quantization, quantization_group_size=32)
    native, layers = make_llm(llama_dir, **kw), make_llm(llama_dir, decode_stack="layers", **kw)
    assert native.llm_engine.runner.decode_stack is not None
    ps = prompts(2, native.llm_engine.runner.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    for x, y in zip(native.generate(ps, params, use_tqdm=False), layers.generate(ps, params, use_tqdm=False)):
        assert step_logprobs(x) == step_logprobs(y)


def test_batch1_greedy_matches_transformers_across_many_blocks(llama_dir):
    llm = make_llm(llama_dir)
    (ids,) = prompts(1, llm.llm_engine.runner.vocab_size)
    (out,) = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert out.outputs[0].token_ids == hf_greedy(llama_dir, ids, 40)  # 43 positions: 11 blocks of 4


def test_unsupported_models_and_caches_keep_the_layer_path(checkpoint_factory, llama_dir):
    assert make_llm(checkpoint_factory("qwen3")).llm_engine.runner.decode_stack is None
    assert make_llm(llama_dir, kv_cache_dtype="int8").llm_engine.runner.decode_stack is None
    assert make_llm(llama_dir, cpu_kernels="off").llm_engine.runner.decode_stack is None


def test_quantize_lm_head_packs_it_and_leaves_the_tied_embedding_alone(checkpoint_factory):
    path = checkpoint_factory("qwen2")  # tied embeddings
    plain, quant = make_llm(path, quantization="int8"), make_llm(path, quantization="int8", quantize_lm_head=True)
    from tureen.executor.quantization.factory import linear_kernels

    model = quant.llm_engine.runner.model
    assert set(linear_kernels(model)) == {"native int8 GEMM"}
    assert "float32" in " ".join(linear_kernels(plain.llm_engine.runner.model))
    assert torch.equal(model.model.embed_tokens.weight, plain.llm_engine.runner.model.model.embed_tokens.weight)
    assert quant.llm_engine.runner.weight_bytes() < plain.llm_engine.runner.weight_bytes()
    ids = prompts(1, model.args.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    a, b = quant.generate(ids, params, use_tqdm=False)[0], plain.generate(ids, params, use_tqdm=False)[0]
    la, lb = step_logprobs(a)[0], step_logprobs(b)[0]
    assert la != lb  # the head really is quantized ...
    assert set(la) & set(lb)  # ... and close enough to agree on the likely tokens
    common = set(la) & set(lb)
    assert max(abs(la[t] - lb[t]) for t in common) < 0.1


def test_the_lm_head_can_take_its_own_quantization(checkpoint_factory):
    """int4 layers with an int8 head: the head is packed exactly as an int8 model's head, the
    layers exactly as an int4 model's."""
    from tureen.executor.decode_stack import native_packed
    from tureen.executor.quantization.factory import linear_kernels

    path = checkpoint_factory("llama")
    g32 = {"quantization": "int4", "quantization_group_size": 32}
    mixed = make_llm(path, **g32, lm_head_quantization="int8").llm_engine.runner
    int8 = make_llm(path, quantization="int8", quantize_lm_head=True).llm_engine.runner
    int4 = make_llm(path, **g32).llm_engine.runner
    assert "LM head in int8" in mixed.quantization.describe()
    assert set(linear_kernels(mixed.model)) == {"native int4 (group 32) GEMM", "native int8 GEMM"}
    head, ref = native_packed(mixed.model.lm_head), native_packed(int8.model.lm_head)
    assert torch.equal(head.qweight, ref.qweight) and torch.equal(head.params, ref.params)
    layer, ref = native_packed(mixed.model.model.layers[0].mlp.down_proj), native_packed(
        int4.model.model.layers[0].mlp.down_proj)
    assert torch.equal(layer.qweight, ref.qweight) and torch.equal(layer.params, ref.params)
    from tureen.errors import ConfigError

    with pytest.raises(ConfigError, match="lm_head_quantization"):
        make_llm(path, **g32, lm_head_quantization="int2")


def test_quantize_lm_head_needs_on_the_fly_quantization(llama_dir):
    from tureen.errors import ConfigError

    with pytest.raises(ConfigError, match="quantize_lm_head"):
        make_llm(llama_dir, quantize_lm_head=True)


# ---- persistent inputs -----------------------------------------------------------------------

def sr(req_id: str, pos: int, blocks: list[int], token: int = 7) -> ScheduledRequest:
    return ScheduledRequest(req_id, [token], pos, blocks, True, SamplingParams(temperature=0.0), [1], [])


def expected_slots(reqs, bs):
    return [r.block_ids[r.start_pos // bs] * bs + r.start_pos % bs for r in reqs]


def test_decode_inputs_grow_rows_in_place_and_rebuild_on_change():
    inputs = DecodeInputs(block_size=4)
    inputs.update([sr("a", 3, [5]), sr("b", 0, [9])])
    table = inputs.table
    inputs.update([sr("a", 4, [5, 2]), sr("b", 1, [9])])  # a crosses into a new block
    assert inputs.table is table and inputs.known_blocks == [2, 1]
    assert inputs.table[0, :2].tolist() == [5, 2] and inputs.table[1, 0].item() == 9
    reqs = [sr("b", 2, [9]), sr("c", 5, [4, 8], token=11)]  # a finished, c joined: the rows are rebuilt
    inputs.update(reqs)
    assert inputs.table[0, 0].item() == 9 and inputs.table[1, :2].tolist() == [4, 8]
    assert inputs.scalars[:, :2].tolist() == [[7, 11], [2, 5], expected_slots(reqs, 4), [3, 6]]
    inputs.update([sr("b", 3, [9]), sr("c", 6, [4, 6])])  # same length, another last block: row rewritten
    assert inputs.table[1, :2].tolist() == [4, 6]
    inputs.reset()  # what the runner does after any other kind of step (blocks may have moved)
    inputs.update([sr("b", 4, [1, 2]), sr("c", 7, [3, 6])])
    assert inputs.table[:2, :2].tolist() == [[1, 2], [3, 6]]


def test_decode_inputs_reallocate_for_more_rows_and_wider_tables():
    inputs = DecodeInputs(block_size=2)
    reqs = [sr(str(i), 2 * i + 1, list(range(10 + i, 11 + 2 * i))) for i in range(5)]
    inputs.update(reqs)
    assert inputs.rows >= 5 and inputs.width >= 5
    for i, r in enumerate(reqs):
        assert inputs.table[i, :len(r.block_ids)].tolist() == r.block_ids
    assert inputs.scalars[2, :5].tolist() == expected_slots(reqs, 2)
    assert NativeDecodeStack.accepts(reqs)
    assert not NativeDecodeStack.accepts(reqs + [ScheduledRequest("p", [1, 2], 0, [0], True,
                                                                  SamplingParams(), [1, 2], [])])


# ---- greedy fast path ------------------------------------------------------------------------

@pytest.mark.parametrize("params, bitmask, plain", [
    (dict(temperature=0.0), False, True),
    (dict(temperature=0.7), False, False),
    (dict(temperature=0.0, logprobs=1), False, False),
    (dict(temperature=0.0, repetition_penalty=1.2), False, False),
    (dict(temperature=0.0, min_tokens=5, stop_token_ids=[3]), False, False),
    (dict(temperature=0.0), True, False),
])
def test_plain_greedy_only_when_argmax_is_the_whole_pipeline(params, bitmask, plain):
    req = ScheduledRequest("a", [1], 3, [0], True, SamplingParams(**params), [1, 2], [4])
    mask = TokenBitmask(["a"], torch.full((1, 1), -1, dtype=torch.int32)) if bitmask else None
    assert plain_greedy([req], mask) is plain


def test_greedy_tokens_equal_the_sampler():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    reqs = [ScheduledRequest(str(i), [1], 0, [0], True, SamplingParams(temperature=0.0), [1], []) for i in range(5)]
    meta = SamplingMetadata.from_requests(reqs, 300, torch.device("cpu"))
    assert greedy_tokens(logits) == Sampler()(logits.clone(), meta)


# ---- step timing -----------------------------------------------------------------------------

def test_step_timer_report_keeps_layers_out_of_the_step_total():
    timer = StepTimer()
    timer.add("forward", 0.004, 0.003)
    timer.add("layer.1", 0.002)
    timer.add("layer.0", 0.002)
    timer.add("sampling", 0.001, 0.001)
    timer.end_step()
    report = timer.report()
    assert list(report) == ["forward", "sampling", "layer.0", "layer.1"]
    assert report["forward"]["wall_us"] == pytest.approx(4000) and report["forward"]["cpu_us"] == pytest.approx(3000)
    assert report["forward"]["share"] == pytest.approx(0.8)
    assert timer.step_us() == pytest.approx(5000)


@pytest.mark.parametrize("decode_stack", ["native", "layers"])
def test_engine_breakdown_has_every_phase_and_layer(llama_dir, decode_stack):
    llm = make_llm(llama_dir, decode_stack=decode_stack)
    engine = llm.llm_engine
    timer = engine.enable_step_timing()
    engine.add_request("r", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    report = timer.report()
    assert timer.steps == 6
    layers = len(engine.runner.model.model.layers)
    for phase in ("schedule", "prepare", "forward", "logits", "sampling", "update", "output", "detokenize",
                  *(f"layer.{i}" for i in range(layers))):
        assert report[phase]["wall_us"] >= 0 and timer.totals[phase].count >= 6, phase
    engine.step_timer = engine.runner.step_timer = NULL_TIMER
    assert engine.runner._layer_hooks == []


def test_bench_single_writes_the_breakdown_and_reads_llama_bench(llama_dir, tmp_path):
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\necho '[{\"avg_ts\": 250.0, \"n_gen\": 4}]'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    cmd = [sys.executable, "-m", "tureen.cli", "bench", "single", str(llama_dir), "--variants", "none,int8+lm_head",
           "--decode-tokens", "4", "--input-len", "5", "--repeats", "1", "--kv-cache-memory", "8MiB",
           "--max-model-len", "64", "--llama-bench", str(fake), "--gguf", f"none={gguf}",
           "--output-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "bench-single.json").read_text())
    none, int8 = doc["results"]
    assert int8["variant"] == "int8 + LM head"
    assert none["llama_cpp_tokens_per_s"] == 250.0
    assert none["ratio_vs_llama_cpp"] == pytest.approx(none["decode_tokens_per_s"] / 250.0)
    assert int8["llama_cpp_tokens_per_s"] is None
    assert {"forward", "sampling", "layer.0", "layer.1"} <= set(none["breakdown_us"])
    assert (tmp_path / "bench-single.png").stat().st_size > 0


def test_bench_variants_parse_the_lm_head_suffix():
    from tureen.bench.quant import Variant

    v = Variant.parse("int4:64+lm_head")
    assert v.name == "int4 (group 64) + LM head"
    assert v.engine_kwargs() == {"quantization": "int4", "quantization_group_size": 64, "quantize_lm_head": True}
    w = Variant.parse("int4-a8+lm_head")
    assert w.name == "int4 (group 128) W8A8 + LM head" and w.engine_kwargs()["quantization_activation"] == "int8"
    h = Variant.parse("int4-a8+lm_head:int8")
    assert h.name == "int4 (group 128) W8A8 + int8 LM head" and h.engine_kwargs()["lm_head_quantization"] == "int8"
    assert Variant.parse("none").engine_kwargs() == {"quantization": None}
    for bad in ("none+lm_head", "int8+bias", "int4+lm_head:int3"):
        with pytest.raises(ValueError):
            Variant.parse(bad)


# ---- verification rows: a request's 1 + k tokens as decode rows ------------------------------

def test_decode_inputs_give_every_token_a_row_sharing_its_request_table():
    inputs = DecodeInputs(block_size=4)
    verify = ScheduledRequest("v", [7, 8, 9], 3, [5, 2], True, SamplingParams(temperature=0.0), [1], [],
                              spec_token_ids=[8, 9])  # positions 3, 4, 5: crosses from block 5 into 2
    assert inputs.update([sr("a", 1, [6]), verify]) == 4
    assert inputs.order == ["a", "v", "v", "v"]
    assert inputs.scalars[:, :4].tolist() == [[7, 7, 8, 9], [1, 3, 4, 5], [25, 23, 8, 9], [2, 4, 5, 6]]
    assert inputs.table[:4, :2].tolist() == [[6, 0], [5, 2], [5, 2], [5, 2]]
    assert inputs.max_position == 5
    inputs.update([sr("a", 2, [6]), sr("v", 6, [5, 2])])  # all drafts accepted: v is one row again
    assert inputs.order == ["a", "v"] and inputs.table[1, :2].tolist() == [5, 2]
    assert inputs.scalars[:, :2].tolist() == [[7, 7], [2, 6], [26, 10], [3, 7]]
    assert NativeDecodeStack.accepts([verify], max_rows=3) and not NativeDecodeStack.accepts([verify])


def run_step(runner, reqs):
    from tureen.engine.messages import SchedulerOutput

    return runner.compute_sample_logits(SchedulerOutput(requests=reqs, num_batched_tokens=sum(
        r.num_tokens for r in reqs)))[0]


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # mistral: a sliding window over the verify rows
def test_a_verify_step_on_the_stack_equals_decoding_its_tokens_one_by_one(checkpoint_factory, arch):
    path = checkpoint_factory(arch)
    llm = make_llm(path, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    runner = llm.llm_engine.runner
    assert runner.max_decode_rows == 5
    vocab, blocks = runner.vocab_size, list(range(8))
    prompt = torch.randint(5, vocab, (10,), generator=torch.Generator().manual_seed(1)).tolist()
    greedy_params = SamplingParams(temperature=0.0)

    def req(tokens, pos, spec=()):
        return ScheduledRequest("r", tokens, pos, blocks, True, greedy_params, prompt, [], spec_token_ids=list(spec))

    run_step(runner, [req(prompt, 0)])  # the prefill: layer path
    drafts = [11, 12, 13, 14]
    verify = run_step(runner, [req([3, *drafts], 10, drafts)])  # 5 rows, positions 10-14, one call
    assert verify.shape == (5, vocab)
    singles = torch.cat([run_step(runner, [req([t], 10 + j)]) for j, t in enumerate([3, *drafts])])
    assert torch.equal(verify, singles)
    runner.decode_stack, runner.max_decode_rows = None, 1  # the layer path's verification: prefill attention
    layer = run_step(runner, [req([3, *drafts], 10, drafts)])
    torch.testing.assert_close(verify, layer, rtol=1e-4, atol=1e-4)


def test_speculative_verification_runs_on_the_stack_and_stays_greedy_identical(llama_dir):
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    llm = make_llm(llama_dir, speculative_config=spec)
    runner, calls = llm.llm_engine.runner, []
    native = runner._decode_stack_logits
    runner._decode_stack_logits = lambda sched: calls.append(sum(r.num_tokens for r in sched.requests)) or \
        native(sched)
    ps = prompts(3, runner.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = llm.generate(ps, params, use_tqdm=False)
    for ids, out in zip(ps, outs):
        assert out.outputs[0].token_ids == hf_greedy(llama_dir, ids, 24)
    assert llm.llm_engine.scheduler.spec_stats.num_drafts > 0
    assert max(calls) > 3, "steps carrying drafts took the native stack"
