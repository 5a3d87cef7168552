"""The decode step's own parallel runtime (csrc/pool.c, ``decode_runtime="pool"``).

Its point is that a thread another process has taken the core of is not waited for: its task is
recomputed by the others and its late result dropped. So beyond giving the very bits of the OpenMP
runtime, it must stay exact and must not hang when a worker is late at the worst moments, which a
test-only fault makes happen dozens of times a run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tureen import LLM, SamplingParams
from tureen.errors import ConfigError


def make_llm(path, **kw):
    defaults = dict(dtype="float32", device="cpu", kv_cache_memory="16MiB", max_model_len=256, block_size=4)
    return LLM(str(path), **{**defaults, **kw})


def prompts(n: int, vocab: int, seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (length,), generator=g).tolist() for length in (4, 11, 19, 27, 2, 8)[:n]]


PARAMS = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=2) for n in (14, 6, 22, 9, 17, 3)]


def results(outs) -> list[tuple[list[int], list[dict[int, float]]]]:
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
            for o in outs]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the pool needs a worker; CI has two cores
    yield
    torch.set_num_threads(before)


def test_both_runtimes_give_the_same_logprobs(llama_dir, two_threads):
    pool, omp = make_llm(llama_dir), make_llm(llama_dir, decode_runtime="openmp")
    assert pool.llm_engine.runner.decode_stack.pooled and not omp.llm_engine.runner.decode_stack.pooled
    ps = prompts(6, pool.llm_engine.runner.vocab_size)
    assert results(pool.generate(ps, PARAMS, use_tqdm=False)) == results(omp.generate(ps, PARAMS, use_tqdm=False))


def test_plain_greedy_steps_give_the_samplers_tokens(llama_dir, two_threads):
    llm = make_llm(llama_dir)
    ps = prompts(4, llm.llm_engine.runner.vocab_size)
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with_logprobs = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)  # the Sampler
    a = [o.outputs[0].token_ids for o in llm.generate(ps, plain, use_tqdm=False)]
    assert a == [o.outputs[0].token_ids for o in llm.generate(ps, with_logprobs, use_tqdm=False)]


LATE_WORKER = r"""
import json, sys, torch
from tureen import LLM, SamplingParams
torch.set_num_threads(2)
every, ns = int(sys.argv[1]), int(sys.argv[2])
path = None  # the demo model: ops big enough that the worker takes tasks of every one
kw = dict(kv_cache_memory="64MiB", max_model_len=256)
g = torch.Generator().manual_seed(5)
ps = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (4, 11, 19, 27, 2, 8)]
params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=2) for n in (14, 6, 22, 9, 17, 3)]
def run(llm):
    return [[o.outputs[0].token_ids, [sorted(s.items()) for s in o.outputs[0].logprobs]] for o in
            llm.generate(ps, params, use_tqdm=False)]
reference = run(LLM(path, decode_runtime="openmp", **kw))
llm = LLM(path, **kw)
ops = llm.llm_engine.runner.cpu_ops
before = ops.pool_stats()
ops.pool_debug_stall(every, ns)
late = run(llm)
ops.pool_debug_stall(0, 0)
after = ops.pool_stats()
print(json.dumps({"same": json.dumps(late, default=str) == json.dumps(reference, default=str),
                  "steals": after["steals"] - before["steals"], "dropped": after["dropped"] - before["dropped"]}))
"""


def test_a_worker_late_at_every_stall_point_changes_nothing_and_hangs_nothing():
    # Every 3rd stall point sleeps 2 ms: after taking a task (the others steal it, then it must not
    # claim a task of a later op) or before committing one (its result must be dropped). A child
    # process, so that a hang fails this test instead of the run.
    proc = subprocess.run([sys.executable, "-c", LATE_WORKER, "3", "2000000"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["same"]
    assert got["steals"] > 0 and got["dropped"] > 0


def test_a_step_that_finds_the_pool_busy_runs_alone_with_the_same_bits(llama_dir, two_threads):
    # The pool serves one call at a time (an engine per thread would share it); a call that finds it
    # held runs its program on its own thread.
    llm = make_llm(llama_dir)
    llm.generate(prompts(6, llm.llm_engine.runner.vocab_size), SamplingParams(temperature=0.0, max_tokens=5,
                                                                              ignore_eos=True), use_tqdm=False)
    stack, ops = llm.llm_engine.runner.decode_stack, llm.llm_engine.runner.cpu_ops
    n = len(stack.inputs.order)  # the last decode step's inputs, still in place: each forward redoes it
    with torch.inference_mode():
        pooled = stack.forward(n)[1].clone()
        before = ops.pool_stats()["alone"]
        with ops.pool_debug_held():
            alone = stack.forward(n)[1].clone()
        assert ops.pool_stats()["alone"] == before + 1
        again = stack.forward(n)[1]
    assert torch.equal(alone, pooled) and torch.equal(again, pooled)


def test_decode_runtime_is_validated():
    with pytest.raises(ConfigError, match="decode_runtime"):
        LLM(decode_runtime="tbb")
