"""Scheduler and KV block manager: pure Python, fake model outputs, no torch."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from fake_runner import FakeRunner, next_token

from tureen.config import CacheConfig, SchedulerConfig
from tureen.engine.kv_cache import BlockPool, KVCacheManager
from tureen.engine.request import Request, RequestStatus
from tureen.engine.scheduler import Scheduler
from tureen.sampling_params import SamplingParams


def make_sched(num_blocks=64, block_size=4, budget=32, max_seqs=8, caching=True, max_model_len=256):
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget),
                     CacheConfig(block_size=block_size, enable_prefix_caching=caching),
                     max_model_len=max_model_len, num_blocks=num_blocks)


def make_req(rid, prompt, max_tokens=8, priority=0, arrival=None, **sp):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **sp)
    return Request(rid, list(prompt), params, max_tokens=max_tokens, priority=priority,
                   arrival_time=arrival if arrival is not None else 0.0)


def reference(prompt, max_tokens):
    seq = list(prompt)
    for _ in range(max_tokens):
        seq.append(next_token(seq))
    return seq[len(prompt):]


def run(sched, runner, arrivals=None, aborts=None, max_steps=10_000, check=None):
    """Drive the scheduler to completion. arrivals/aborts: {step: [Request] / [req_id]}."""
    arrivals, aborts = arrivals or {}, aborts or {}
    finished: dict[str, Request] = {}
    live: dict[str, Request] = {}
    for step in range(max_steps):
        for req in arrivals.get(step, []):
            sched.add_request(req)
            live[req.req_id] = req
        for rid in aborts.get(step, []):
            sched.finish_request(rid, RequestStatus.FINISHED_ABORTED)
        if not sched.has_unfinished() and step >= max(arrivals, default=0):
            break
        out = sched.schedule()
        if check:
            check(sched, out)
        if out.is_empty:
            continue
        sched.update_from_output(out, runner.execute(out))
        for rid, req in list(live.items()):
            if req.is_finished:
                finished[rid] = live.pop(rid)
    for rid, req in list(live.items()):
        if req.is_finished:
            finished[rid] = live.pop(rid)
    assert not live, f"requests never finished: {live}"
    return finished


def assert_no_leaks(sched):
    pool = sched.kv.pool
    assert pool.num_free == pool.num_blocks
    assert all(b.ref_cnt == 0 for b in pool.blocks)
    assert not sched.running and not sched.waiting and not sched.requests


def test_scheduler_imports_no_torch():
    code = "import sys, tureen.engine.scheduler, tureen.engine.kv_cache; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_single_request_matches_reference_and_frees_blocks():
    sched = make_sched()
    runner = FakeRunner(64, 4)
    req = make_req("a", range(1, 11), max_tokens=6)
    done = run(sched, runner, {0: [req]})
    assert done["a"].output_token_ids == reference(range(1, 11), 6)
    assert done["a"].status == RequestStatus.FINISHED_LENGTH
    assert_no_leaks(sched)


def test_token_budget_and_max_num_seqs_are_respected():
    sched = make_sched(budget=10, max_seqs=3)
    runner = FakeRunner(64, 4)
    reqs = [make_req(f"r{i}", range(i, i + 7), max_tokens=5, arrival=i) for i in range(6)]

    def check(s, out):
        assert out.num_batched_tokens <= 10
        assert len(out.requests) <= 3 and len(s.running) <= 3
        assert out.num_batched_tokens == sum(r.num_tokens for r in out.requests)

    done = run(sched, runner, {0: reqs}, check=check)
    for i, r in enumerate(reqs):
        assert done[r.req_id].output_token_ids == reference(range(i, i + 7), 5)
    assert_no_leaks(sched)


def test_long_prompt_is_chunked_and_interleaves_with_decodes():
    sched = make_sched(budget=8, num_blocks=64)
    runner = FakeRunner(64, 4)
    short = make_req("short", [5, 6, 7], max_tokens=20, arrival=0)
    long = make_req("long", range(100, 140), max_tokens=3, arrival=1)
    done = run(sched, runner, {0: [short], 2: [long]})
    long_steps = [s for s in runner.steps if any(r.req_id == "long" for r in s.requests)]
    chunks = [next(r for r in s.requests if r.req_id == "long") for s in long_steps]
    prefill = [c for c in chunks if not c.sample or c.start_pos < 40]
    assert len(prefill) >= 5, "a 40-token prompt under an 8-token budget needs several chunks"
    assert all(not c.sample for c in prefill[:-1]) and prefill[-1].sample
    assert [c.start_pos for c in prefill] == sorted(c.start_pos for c in prefill)
    # the short request kept decoding in the same steps as the long prompt's chunks
    assert all(any(r.req_id == "short" for r in s.requests) for s in long_steps[:4])
    assert done["long"].output_token_ids == reference(range(100, 140), 3)
    assert done["short"].output_token_ids == reference([5, 6, 7], 20)
    assert_no_leaks(sched)


def test_prefix_cache_hit_skips_prefill_and_shares_blocks():
    sched = make_sched(block_size=4)
    runner = FakeRunner(64, 4)
    prefix = list(range(10, 22))  # 3 full blocks
    a = make_req("a", prefix + [1, 2], max_tokens=4)
    run(sched, runner, {0: [a]})
    b = make_req("b", prefix + [3], max_tokens=4)
    c = make_req("c", prefix, max_tokens=4)  # whole prompt cached: last token is still computed
    done = run(sched, runner, {0: [b, c]})
    assert done["b"].num_cached_tokens == 12
    assert done["c"].num_cached_tokens == 8
    assert done["b"].output_token_ids == reference(prefix + [3], 4)
    assert done["c"].output_token_ids == reference(prefix, 4)
    first_b = next(r for s in runner.steps for r in s.requests if r.req_id == "b")
    assert first_b.start_pos == 12 and first_b.token_ids == [3]
    assert sched.kv.prefix_cache_hits == 20 and sched.kv.prefix_cache_queries == 14 + 13 + 12
    assert_no_leaks(sched)


def test_same_step_requests_share_full_prompt_blocks():
    sched = make_sched(block_size=4)
    runner = FakeRunner(64, 4)
    prompt = list(range(50, 59))
    reqs = [make_req(f"n{i}", prompt, max_tokens=3) for i in range(3)]
    shared = []

    def check(s, out):
        if len(out.requests) == 3 and not shared:
            tables = [r.block_ids for r in out.requests]
            shared.append(tables[0][:2] == tables[1][:2] == tables[2][:2])
            assert all(s.kv.pool.blocks[b].ref_cnt == 3 for b in tables[0][:2])

    done = run(sched, runner, {0: reqs}, check=check)
    assert shared == [True]
    assert [done[r.req_id].num_cached_tokens for r in reqs] == [0, 8, 8]
    assert_no_leaks(sched)


def test_preemption_picks_lowest_priority_newest_and_results_are_identical():
    sched = make_sched(num_blocks=10, block_size=4, budget=64, caching=False)
    runner = FakeRunner(10, 4)
    reqs = [make_req("old", range(1, 9), max_tokens=12, arrival=0),
            make_req("vip", range(20, 28), max_tokens=12, arrival=2, priority=-1),
            make_req("new", range(40, 48), max_tokens=12, arrival=1)]
    preempted = []
    done = run(sched, runner, {0: reqs}, check=lambda s, out: preempted.extend(out.preempted_req_ids))
    assert preempted, "the pool is too small for all three: something must be preempted"
    assert preempted[0] == "new"  # priority 0 sorts after -1, and "new" arrived after "old"
    assert done["new"].num_preemptions >= 1 and done["vip"].num_preemptions == 0
    for r, start in zip(reqs, (1, 20, 40)):
        assert done[r.req_id].output_token_ids == reference(range(start, start + 8), 12)
    assert sched.num_preemptions == len(preempted)
    assert_no_leaks(sched)


def test_abort_frees_blocks_immediately():
    sched = make_sched(block_size=4)
    runner = FakeRunner(64, 4)
    reqs = [make_req(f"r{i}", range(i * 10, i * 10 + 9), max_tokens=50) for i in range(3)]
    sched_state = []

    def check(s, out):
        sched_state.append(s.kv.pool.num_free)

    done = run(sched, runner, {0: reqs}, aborts={3: ["r1"], 5: ["r0", "r2"]}, check=check)
    assert all(done[r.req_id].status == RequestStatus.FINISHED_ABORTED for r in reqs)
    assert all(not done[r.req_id].block_ids for r in reqs)
    assert_no_leaks(sched)


def test_stop_token_ids_eos_and_min_tokens():
    seq = list(range(1, 6))
    ref = reference(seq, 10)
    sched = make_sched()
    runner = FakeRunner(64, 4)
    eos = make_req("eos", seq, max_tokens=10)
    eos.sampling_params.eos_token_ids = [ref[2]]
    stop = make_req("stop", seq, max_tokens=10, stop_token_ids=[ref[3]])
    late = make_req("late", seq, max_tokens=10, min_tokens=5)
    late.sampling_params.eos_token_ids = [ref[2]]
    ign = make_req("ign", seq, max_tokens=10, ignore_eos=True)
    ign.sampling_params.eos_token_ids = [ref[2]]
    done = run(sched, runner, {0: [eos, stop, late, ign]})
    assert done["eos"].output_token_ids == ref[:3] and done["eos"].status == RequestStatus.FINISHED_STOPPED
    assert done["stop"].output_token_ids == ref[:4] and done["stop"].stop_reason == ref[3]
    assert len(done["late"].output_token_ids) >= 5
    assert done["ign"].output_token_ids == ref and done["ign"].status == RequestStatus.FINISHED_LENGTH
    assert_no_leaks(sched)


@pytest.mark.parametrize("seed", range(6))
def test_randomized_stress_no_loss_no_duplication_no_leaks(seed):
    rng = random.Random(seed)
    num_blocks, bs = rng.choice([12, 20, 40]), rng.choice([2, 4, 8])
    sched = make_sched(num_blocks=num_blocks, block_size=bs, budget=rng.choice([4, 16, 64]),
                       max_seqs=rng.choice([2, 4, 16]), caching=rng.random() < 0.7)
    runner = FakeRunner(num_blocks, bs)
    shared = [rng.randrange(1000) for _ in range(12)]
    arrivals, prompts, aborted = {}, {}, set()
    for i in range(25):
        plen = rng.randint(1, 30)
        max_tok = rng.randint(1, 12)
        room = min(36, num_blocks * bs - max_tok)  # the engine rejects requests that can never fit
        prompt = (shared[:rng.randint(0, 12)] + [rng.randrange(1000) for _ in range(plen)])[:room]
        req = make_req(f"q{i}", prompt, max_tokens=max_tok, priority=rng.choice([0, 0, 1, -1]),
                       arrival=float(i))
        prompts[req.req_id] = (prompt, max_tok)
        arrivals.setdefault(rng.randint(0, 40), []).append(req)
    aborts = {}
    for i in rng.sample(range(25), 4):
        aborts.setdefault(rng.randint(0, 60), []).append(f"q{i}")
        aborted.add(f"q{i}")

    seen_per_step = []

    def check(s, out):
        ids = [r.req_id for r in out.requests]
        assert len(ids) == len(set(ids)), "a request was scheduled twice in one step"
        in_use = [b for r in s.running for b in r.block_ids]
        counts = {b: in_use.count(b) for b in in_use}
        for b, c in counts.items():
            assert s.kv.pool.blocks[b].ref_cnt == c
            assert b not in s.kv.pool.free
        seen_per_step.append(len(ids))

    done = run(sched, runner, arrivals, aborts=aborts, check=check)
    assert set(done) == set(prompts), "every request finishes exactly once"
    for rid, req in done.items():
        prompt, max_tok = prompts[rid]
        if req.status == RequestStatus.FINISHED_ABORTED:
            assert rid in aborted
            assert req.output_token_ids == reference(prompt, max_tok)[:len(req.output_token_ids)]
        else:
            assert req.output_token_ids == reference(prompt, max_tok), rid
    assert_no_leaks(sched)


# ---- block pool ------------------------------------------------------------------------

def test_block_pool_reference_counts():
    pool = BlockPool(4, enable_caching=True)
    a, b = pool.allocate(2)
    assert pool.num_free == 2 and a.ref_cnt == b.ref_cnt == 1
    pool.register(a, 111)
    pool.touch([a])
    assert a.ref_cnt == 2
    pool.release([a])
    assert a.ref_cnt == 1 and a.block_id not in pool.free
    pool.release([a, b])
    assert pool.num_free == 4
    assert pool.lookup(111) is a, "a freed block keeps its cached contents until evicted"
    with pytest.raises(AssertionError):
        pool.release([b])


def test_block_pool_evicts_least_recently_freed_first():
    pool = BlockPool(3, enable_caching=True)
    blocks = pool.allocate(3)
    for i, blk in enumerate(blocks):
        pool.register(blk, 1000 + i)
    pool.release([blocks[1]])
    pool.release([blocks[2]])
    pool.release([blocks[0]])  # free order: 1, 2, 0
    (first,) = pool.allocate(1)
    assert first is blocks[1] and pool.lookup(1001) is None
    assert pool.lookup(1000) is blocks[0] and pool.lookup(1002) is blocks[2]
    pool.touch([blocks[2]])  # a hit takes it off the free queue
    (second,) = pool.allocate(1)
    assert second is blocks[0] and pool.lookup(1000) is None
    assert pool.lookup(1002) is blocks[2]


def test_freed_request_blocks_are_evicted_tail_first():
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_caching=True)
    req = make_req("a", range(8), max_tokens=1)
    assert kv.allocate_slots(req, 8)
    table = list(req.block_ids)
    kv.free(req)
    assert list(kv.pool.free)[-4:] == table[::-1]
    other = make_req("b", range(100, 108), max_tokens=1)
    kv.allocate_slots(other, 2)  # takes the 4 never-used blocks? no: one block, from the front
    hits = kv.get_computed_blocks(make_req("c", range(8), max_tokens=1))
    assert [b.block_id for b in hits] == table[:3]


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4, enable_caching=True)
    a = make_req("a", range(8), max_tokens=1)
    assert kv.allocate_slots(a, 8)
    b = make_req("b", range(100, 112), max_tokens=1)
    assert not kv.allocate_slots(b, 12)
    assert b.block_ids == [] and kv.pool.num_free == 1
