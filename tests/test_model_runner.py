"""The ModelRunner driven directly with hand-built SchedulerOutputs, checked against transformers.

A small fake scheduler (below) gives each request a shuffled, non-contiguous block table from a
pool whose freed blocks are reused dirty, chunks prefills under a token budget, lets requests
arrive while others decode, and batches everything; greedy tokens must equal transformers'
``generate(do_sample=False)`` for every architecture.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from checkpoints import ARCHS
from tureen.config import EngineConfig
from tureen.executor import attention
from tureen.engine.messages import ScheduledRequest, SchedulerOutput, TokenLogprobs
from tureen.errors import ConfigError
from tureen.executor.model_runner import ModelRunner, step_order
from tureen.sampling_params import SamplingParams

BLOCK = 4


_HF_MODELS: dict[str, object] = {}


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy ``generate`` (float32, CPU, batch of one) that never stops at EOS.

    The checkpoint's generation_config carries an EOS id; it is cleared on the reference model
    because a ``GenerationConfig(eos_token_id=None)`` passed to ``generate`` does not override it.
    """
    from transformers import AutoModelForCausalLM

    key = str(model_dir)
    if key not in _HF_MODELS:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None
        _HF_MODELS[key] = model
    model = _HF_MODELS[key]
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)
    tokens = out[0, len(prompt_ids):].tolist()
    assert len(tokens) == max_new_tokens
    return tokens


def make_runner(model_dir: Path, num_blocks: int = 96, **kwargs) -> ModelRunner:
    config = EngineConfig.from_kwargs(str(model_dir), device="cpu", block_size=BLOCK, **kwargs)
    runner = ModelRunner(config, model_dir)
    runner.allocate_kv_cache(num_blocks)
    return runner


def prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


@dataclass
class FakeRequest:
    req_id: str
    prompt: list[int]
    max_new: int
    arrival: int = 0  # step at which it joins
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    computed: int = 0
    blocks: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new


def drive(runner: ModelRunner, reqs: list[FakeRequest], budget: int, chunk: int, seed: int = 0) -> None:
    """Schedule until every request has its tokens: chunked prefill, decode, dirty block reuse."""
    rng = random.Random(seed)
    pool = list(range(len(runner.kv_caches[0][0])))
    rng.shuffle(pool)
    step = 0
    while not all(r.done for r in reqs):
        batch, left = [], budget
        for r in reqs:
            n = min(len(r.tokens) - r.computed, chunk, left)
            if r.done or r.arrival > step or n <= 0:
                continue
            while len(r.blocks) * BLOCK < r.computed + n:
                r.blocks.append(pool.pop())
            left -= n
            batch.append((r, n))
        rng.shuffle(batch)  # the runner must not depend on request order
        sched = SchedulerOutput([
            ScheduledRequest(r.req_id, r.tokens[r.computed:r.computed + n], r.computed, list(r.blocks),
                             r.computed + n == len(r.tokens), r.params, r.prompt, list(r.output))
            for r, n in batch], num_batched_tokens=budget - left)
        out = runner.execute(sched)
        assert out.req_ids == [s.req_id for s in sched.requests if s.sample]
        by_id = {rid: toks[0] for rid, toks in zip(out.req_ids, out.sampled_token_ids)}
        for r, n in batch:
            r.computed += n
            if r.req_id in by_id:
                r.output.append(by_id[r.req_id])
                if r.done:  # free its blocks, dirty, for later arrivals
                    pool.extend(r.blocks)
                    rng.shuffle(pool)
                    r.blocks = []
        step += 1


@pytest.mark.parametrize("min_group", [16, 1], ids=["one-decode-group", "many-decode-groups"])
@pytest.mark.parametrize("arch", ARCHS)
def test_batched_chunked_greedy_matches_transformers(checkpoint_factory, monkeypatch, arch, min_group):
    monkeypatch.setattr(attention, "MIN_DECODE_GROUP", min_group)  # 1: decode rows split into padded groups
    model_dir = checkpoint_factory(arch)
    runner = make_runner(model_dir)
    v = runner.vocab_size
    reqs = [
        FakeRequest("a", prompt(37, v, 1), max_new=12),
        FakeRequest("b", prompt(5, v, 2), max_new=20),
        FakeRequest("c", prompt(29, v, 3), max_new=9, arrival=3),  # arrives mid-decode
        FakeRequest("d", prompt(1, v, 4), max_new=6, arrival=1),  # one-token prompt
        FakeRequest("e", prompt(18, v, 5), max_new=14, arrival=6),  # reuses freed (dirty) blocks
    ]
    drive(runner, reqs, budget=24, chunk=9)
    for r in reqs:
        assert r.output == hf_greedy(model_dir, r.prompt, r.max_new), r.req_id


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_single_request_one_chunk_prefill(checkpoint_factory, arch):
    model_dir = checkpoint_factory(arch)
    runner = make_runner(model_dir)
    r = FakeRequest("x", prompt(45, runner.vocab_size, 9), max_new=16)
    drive(runner, [r], budget=512, chunk=512)
    assert r.output == hf_greedy(model_dir, r.prompt, 16)


def test_prefill_in_chunks_equals_one_chunk(checkpoint_factory):
    model_dir = checkpoint_factory("qwen3")
    outputs = []
    for chunk in (64, 7, 1):
        runner = make_runner(model_dir)
        r = FakeRequest("x", prompt(33, runner.vocab_size, 11), max_new=8)
        drive(runner, [r], budget=64, chunk=chunk)
        outputs.append(r.output)
    assert outputs[0] == outputs[1] == outputs[2] == hf_greedy(model_dir, prompt(33, runner.vocab_size, 11), 8)


def test_prefix_blocks_written_in_the_same_step_are_read_correctly(checkpoint_factory):
    """A prefix-cache hit on blocks that another request fills in this very step."""
    model_dir = checkpoint_factory("llama")
    runner = make_runner(model_dir)
    shared = prompt(16, runner.vocab_size, 21)  # 4 full blocks
    p1, p2 = shared + prompt(5, runner.vocab_size, 22), shared + prompt(7, runner.vocab_size, 23)
    b1, b2_tail = [40, 12, 33, 7, 25, 60], [3, 51]
    params = SamplingParams(temperature=0.0)
    sched = SchedulerOutput([
        ScheduledRequest("hit", p2[16:], 16, b1[:4] + b2_tail, True, params, p2, []),  # listed first
        ScheduledRequest("owner", p1, 0, b1, True, params, p1, []),
    ])
    out = runner.execute(sched)
    assert out.req_ids == ["hit", "owner"]
    assert out.sampled_token_ids == [[hf_greedy(model_dir, p2, 1)[0]], [hf_greedy(model_dir, p1, 1)[0]]]


def test_non_sampling_chunks_return_nothing_and_order_follows_the_schedule(checkpoint_factory):
    model_dir = checkpoint_factory("llama")
    runner = make_runner(model_dir)
    p = prompt(10, runner.vocab_size, 5)
    params = SamplingParams(temperature=0.0)
    out = runner.execute(SchedulerOutput([ScheduledRequest("x", p[:6], 0, [8, 2], False, params, p, [])]))
    assert out.req_ids == [] and out.sampled_token_ids == []
    q = prompt(3, runner.vocab_size, 6)
    out = runner.execute(SchedulerOutput([
        ScheduledRequest("x", p[6:], 6, [8, 2, 9], True, params, p, []),
        ScheduledRequest("y", q, 0, [4], True, params, q, []),
    ]))
    assert out.req_ids == ["x", "y"]
    assert out.sampled_token_ids == [[hf_greedy(model_dir, p, 1)[0]], [hf_greedy(model_dir, q, 1)[0]]]
    assert out.logprobs == [[None], [None]]


def test_logprobs_come_from_the_sampler(checkpoint_factory):
    model_dir = checkpoint_factory("qwen2")
    runner = make_runner(model_dir)
    p = prompt(6, runner.vocab_size, 8)
    out = runner.execute(SchedulerOutput([
        ScheduledRequest("x", p, 0, [1, 5], True, SamplingParams(temperature=0.0, logprobs=3), p, [])]))
    [lp] = out.logprobs[0]
    assert isinstance(lp, TokenLogprobs)
    assert [lp.token_ids[0]] == out.sampled_token_ids[0] == [hf_greedy(model_dir, p, 1)[0]]
    assert lp.chosen_rank == 1 and len(lp.token_ids) == 4 and lp.logprobs[0] <= 0.0


def test_step_order_puts_single_tokens_first_by_context_length():
    params = SamplingParams()

    def req(n, start):
        return ScheduledRequest("r", [1] * n, start, [], True, params, [], [])
    reqs = [req(5, 0), req(1, 30), req(1, 4), req(3, 8), req(1, 12)]
    assert step_order(reqs) == [2, 4, 1, 0, 3]


# ---- sizing and errors ---------------------------------------------------------------------------

def test_kv_cache_sizing_on_cpu(checkpoint_factory):
    model_dir = checkpoint_factory("qwen3")  # 2 layers, 2 kv heads, head_dim 32, float32
    config = EngineConfig.from_kwargs(str(model_dir), device="cpu", block_size=16, kv_cache_memory="1MiB")
    runner = ModelRunner(config, model_dir)
    assert runner.kv_bytes_per_token == 2 * 2 * 2 * 32 * 4
    assert runner.determine_num_blocks() == 2**20 // (16 * 1024)
    assert runner.max_position_embeddings == 512 and runner.vocab_size == runner.hf_config["vocab_size"]
    assert runner.device == torch.device("cpu") and runner.dtype == torch.float32
    runner.allocate_kv_cache(7)
    assert [tuple(c.shape) for c in runner.kv_caches] == [(2, 7, 16, 2, 32)] * 2
    config = EngineConfig.from_kwargs(str(model_dir), device="cpu", num_gpu_blocks_override=5)
    assert ModelRunner(config, model_dir).determine_num_blocks() == 5
    config = EngineConfig.from_kwargs(str(model_dir), device="cpu", block_size=16, kv_cache_memory=1000)
    with pytest.raises(ConfigError, match="one block needs 16384 bytes"):
        ModelRunner(config, model_dir).determine_num_blocks()


def test_bad_inputs_are_typed_errors(checkpoint_factory):
    model_dir = checkpoint_factory("llama")
    config = EngineConfig.from_kwargs(str(model_dir), device="cpu", block_size=BLOCK)
    runner = ModelRunner(config, model_dir)
    params = SamplingParams(temperature=0.0)
    good = SchedulerOutput([ScheduledRequest("x", [5, 6], 0, [0], True, params, [5, 6], [])])
    with pytest.raises(RuntimeError, match="allocate_kv_cache"):
        runner.execute(good)
    runner.allocate_kv_cache(8)
    # Token ids are checked once, by the engine's input processor; an id that got past it anyway makes
    # the step raise (LLMEngine then fails that step's requests), it never corrupts the runner.
    bad = SchedulerOutput([ScheduledRequest("bad", [5, runner.vocab_size], 0, [0], True, params, [], [])])
    with pytest.raises(IndexError):
        runner.execute(bad)
    short = SchedulerOutput([ScheduledRequest("x", [5] * 9, 0, [0, 1], True, params, [], [])])
    with pytest.raises(ValueError, match="block table"):
        runner.execute(short)
    assert runner.execute(SchedulerOutput()).req_ids == []
    assert len(runner.execute(good).sampled_token_ids) == 1  # still works after the errors
