"""The engine end to end, greedy float32 on CPU, token for token against transformers' generate."""

from __future__ import annotations

import random

import pytest
from checkpoints import hf_greedy

from tureen import LLM, SamplingParams
from tureen.errors import (ContextLengthExceededError, InvalidRequestError, InvalidSamplingParamsError,
                           PromptTooLongError, UnsupportedArchitectureError)


def prompts_for(tokenizer, count, seed=0, lo=3, hi=40):
    rng = random.Random(seed)
    text = "the quick brown fox jumps over a lazy dog while paged attention keeps every block busy 東京 🙂 " * 4
    ids = tokenizer.encode(text)
    return [ids[(s := rng.randrange(0, 20)):s + rng.randint(lo, hi)] for _ in range(count)]


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def make_llm(path, **kw):
    defaults = dict(dtype="float32", device="cpu", kv_cache_memory="16MiB", max_model_len=256)
    return LLM(str(path), **{**defaults, **kw})


def check_against_hf(path, prompts, outs, lengths):
    for ids, out, n in zip(prompts, outs, lengths):
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == hf_greedy(path, ids, n), f"prompt {ids}"


def test_single_request_every_architecture(arch_dir):
    llm = make_llm(arch_dir)
    ids = prompts_for(llm.get_tokenizer(), 1, lo=30, hi=30)[0]
    (out,) = llm.generate([ids], greedy(24))
    assert out.outputs[0].finish_reason == "length"
    check_against_hf(arch_dir, [ids], [out], [24])


@pytest.mark.parametrize("cpu_kernels", ["on", "off"])  # native kernels required / plain torch ops
def test_mixed_batch_every_architecture(arch_dir, cpu_kernels):
    llm = make_llm(arch_dir, max_num_seqs=8, cpu_kernels=cpu_kernels)
    runner = llm.llm_engine.runner
    assert (runner.cpu_ops is not None) == (runner.linear_backend == "native") == (cpu_kernels == "on")
    prompts = prompts_for(llm.get_tokenizer(), 6, seed=1)
    lengths = [5, 17, 9, 30, 1, 12]
    outs = llm.generate(prompts, [greedy(n) for n in lengths])
    check_against_hf(arch_dir, prompts, outs, lengths)


def test_chunked_prefill_under_a_tiny_token_budget(llama_dir):
    llm = make_llm(llama_dir, max_num_batched_tokens=7, max_num_seqs=4)
    prompts = prompts_for(llm.get_tokenizer(), 4, seed=2, lo=20, hi=45)
    outs = llm.generate(prompts, greedy(10))
    check_against_hf(llama_dir, prompts, outs, [10] * 4)


def test_preemption_forced_by_a_tiny_kv_pool(llama_dir):
    llm = make_llm(llama_dir, num_gpu_blocks_override=9, block_size=8, max_num_seqs=6)
    prompts = prompts_for(llm.get_tokenizer(), 5, seed=3, lo=10, hi=20)
    outs = llm.generate(prompts, greedy(30))
    assert llm.llm_engine.scheduler.num_preemptions > 0, "the pool was meant to be too small"
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    check_against_hf(llama_dir, prompts, outs, [30] * 5)
    assert llm.llm_engine.scheduler.kv.pool.num_free == 9


def test_prefix_cache_hits_give_identical_output(llama_dir):
    llm = make_llm(llama_dir, block_size=8)
    ids = prompts_for(llm.get_tokenizer(), 1, lo=40, hi=40)[0]
    (first,) = llm.generate([ids], greedy(16))
    (again,) = llm.generate([ids], greedy(16))
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens == 32  # 5 full blocks, but the last prompt token is always recomputed
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == hf_greedy(llama_dir, ids, 16)
    shared = ids[:24] + ids[:5]
    (partial,) = llm.generate([shared], greedy(8))
    assert partial.num_cached_tokens == 24
    assert partial.outputs[0].token_ids == hf_greedy(llama_dir, shared, 8)


def test_prefix_caching_can_be_disabled(llama_dir):
    llm = make_llm(llama_dir, enable_prefix_caching=False)
    ids = prompts_for(llm.get_tokenizer(), 1, lo=40, hi=40)[0]
    llm.generate([ids], greedy(4))
    (again,) = llm.generate([ids], greedy(4))
    assert again.num_cached_tokens == 0


def test_n_greater_than_one_shares_the_prompt(llama_dir):
    llm = make_llm(llama_dir, block_size=4)
    ids = prompts_for(llm.get_tokenizer(), 1, lo=21, hi=21)[0]
    (out,) = llm.generate([ids], greedy(12, n=3))
    ref = hf_greedy(llama_dir, ids, 12)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.token_ids == ref for c in out.outputs)
    kv = llm.llm_engine.scheduler.kv
    assert kv.prefix_cache_hits >= 2 * 20, "children reuse the first child's full prompt blocks"


def test_requests_arriving_mid_decode(llama_dir):
    llm = make_llm(llama_dir, max_num_batched_tokens=16)
    engine = llm.llm_engine
    prompts = prompts_for(llm.get_tokenizer(), 5, seed=4, lo=8, hi=30)
    lengths = [20, 14, 25, 9, 16]
    done, step = {}, 0
    engine.add_request("r0", prompts[0], greedy(lengths[0]))
    while engine.has_unfinished_requests() or len(done) < 5:
        if 1 <= step <= 4:
            engine.add_request(f"r{step}", prompts[step], greedy(lengths[step]))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        assert step < 500
    check_against_hf(llama_dir, prompts, [done[f"r{i}"] for i in range(5)], lengths)


def test_text_and_chat_prompts(llama_dir):
    llm = make_llm(llama_dir)
    tok = llm.get_tokenizer()
    (out,) = llm.generate("the quick brown fox", greedy(8))
    assert out.prompt == "the quick brown fox"
    assert out.prompt_token_ids == tok.encode("the quick brown fox")
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids)
    (chat,) = llm.chat([{"role": "user", "content": "hi"}], greedy(5))
    assert chat.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert chat.prompt_token_ids == tok.encode(chat.prompt, add_special_tokens=False)


def test_eos_stops_generation_unless_ignored(llama_dir):
    llm = make_llm(llama_dir)
    ids = prompts_for(llm.get_tokenizer(), 1, lo=12, hi=12)[0]
    ref = hf_greedy(llama_dir, ids, 10)
    (out,) = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[ref[4]]))
    assert out.outputs[0].token_ids == ref[:5]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == ref[4]


def test_stop_strings_are_found_across_tokens_and_excluded(llama_dir):
    llm = make_llm(llama_dir)
    tok = llm.get_tokenizer()
    ids = prompts_for(tok, 1, lo=12, hi=12)[0]
    (full,) = llm.generate([ids], greedy(30))
    text = full.outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 4]
    assert len(stop) == 4
    (out,) = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=30, stop=[stop]))
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.outputs[0].text == text[:text.index(stop)]
    (kept,) = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=30, stop=[stop],
                                                 include_stop_str_in_output=True))
    assert kept.outputs[0].text == text[:text.index(stop) + len(stop)]


def test_seeded_sampling_reproduces_across_batches(llama_dir):
    llm = make_llm(llama_dir)
    prompts = prompts_for(llm.get_tokenizer(), 4, seed=5)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, ignore_eos=True)
    alone = llm.generate([prompts[0]], seeded)[0].outputs[0].token_ids
    mixed = llm.generate(prompts[::-1], [SamplingParams(temperature=0.7, max_tokens=9, ignore_eos=True)] * 3 + [seeded])
    assert mixed[3].outputs[0].token_ids == alone
    other = llm.generate([prompts[0]], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=99,
                                                      ignore_eos=True))[0]
    assert other.outputs[0].token_ids != alone


def test_logprobs_report_chosen_token_and_top_k(llama_dir):
    llm = make_llm(llama_dir)
    ids = prompts_for(llm.get_tokenizer(), 1)[0]
    (out,) = llm.generate([ids], greedy(6, logprobs=3))
    c = out.outputs[0]
    assert len(c.logprobs) == 6
    for tok, step in zip(c.token_ids, c.logprobs):
        assert tok in step and step[tok].rank == 1  # greedy picks the most likely token
        assert len(step) == 3
        assert all(lp.logprob <= 0.0 for lp in step.values())
    assert c.cumulative_logprob == pytest.approx(sum(step[t].logprob for t, step in zip(c.token_ids, c.logprobs)))


def test_bad_input_raises_typed_errors_and_engine_keeps_working(llama_dir):
    llm = make_llm(llama_dir, max_model_len=64)
    good = prompts_for(llm.get_tokenizer(), 1, lo=10, hi=10)[0]
    with pytest.raises(PromptTooLongError) as e:
        llm.generate([list(range(5, 75))], greedy(1))
    assert e.value.limit == 64 and e.value.value == 70 and "64" in str(e.value)
    with pytest.raises(ContextLengthExceededError) as e:
        llm.generate([good], greedy(60))
    assert "64" in str(e.value) and "70" in str(e.value)
    with pytest.raises(InvalidSamplingParamsError) as e:
        SamplingParams(temperature=-1)
    assert e.value.param == "temperature" and "-1" in str(e.value)
    with pytest.raises(InvalidRequestError):
        llm.generate([[10**9]], greedy(1))
    with pytest.raises(InvalidRequestError):
        llm.generate([[]], greedy(1))
    (out,) = llm.generate([good], greedy(5))
    assert out.outputs[0].token_ids == hf_greedy(llama_dir, good, 5)
    assert llm.llm_engine.scheduler.kv.pool.num_free == llm.llm_engine.num_kv_blocks


def test_request_that_can_never_fit_in_the_kv_cache_is_rejected(llama_dir):
    llm = make_llm(llama_dir, num_gpu_blocks_override=2, block_size=8)
    with pytest.raises(PromptTooLongError) as e:
        llm.generate([list(range(5, 15))], greedy(10))
    assert e.value.limit == 16


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, llama_dir):
    import json
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPTBigCodeForCausalLM"], "gpt_bigcode"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError) as e:
        make_llm(bad)
    assert "LlamaForCausalLM" in str(e.value) and "Qwen3ForCausalLM" in str(e.value)


def test_kv_cache_size_follows_the_byte_budget(llama_dir, caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="tureen.engine"):
        llm = make_llm(llama_dir, kv_cache_memory="1MiB", block_size=16, max_model_len=128)
    per_token = 2 * 2 * 2 * 16 * 4  # K and V x layers x kv heads x head_dim x float32
    assert llm.llm_engine.num_kv_blocks == 2**20 // (16 * per_token)
    assert llm.llm_engine.max_concurrency == llm.llm_engine.num_kv_blocks // 8
    assert f"KV cache: {llm.llm_engine.num_kv_blocks} blocks x 16 tokens" in caplog.text
