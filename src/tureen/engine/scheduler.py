"""Iteration-level scheduler. Pure Python: no torch.

One rule replaces "prefill mode" and "decode mode": every step, each scheduled request's computed
tokens catch up with its known tokens, under a per-step token budget. A decoding request needs
one token; a new prompt needs all of its uncached tokens, and when the budget runs out it gets a
chunk now and the rest in later steps (chunked prefill), interleaved with other requests' decodes.

Order: lower ``priority`` value first, then arrival (FCFS). When blocks run out, the running
request that sorts last (lowest priority, newest) is preempted by recompute: its blocks are
freed, its computed count reset, and it waits at its original place in the queue. Its tokens so
far are kept, so on resume it recomputes them (often hitting the prefix cache) and continues
with identical results.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from tureen.config import CacheConfig, SchedulerConfig
from tureen.engine.block_hash import make_block_hasher
from tureen.engine.kv_cache import KVCacheManager
from tureen.engine.messages import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from tureen.engine.request import Request, RequestStatus
from tureen.engine.spec_decode.stats import SpecDecodingStats


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    spec_decoding: SpecDecodingStats | None = None  # cumulative; None when speculation is off


class Scheduler:
    def __init__(self, sched_config: SchedulerConfig, cache_config: CacheConfig,
                 max_model_len: int, num_blocks: int, num_spec_tokens: int = 0) -> None:
        self.max_num_seqs = sched_config.max_num_seqs
        self.max_num_batched_tokens = sched_config.max_num_batched_tokens
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching,
                                 make_block_hasher(cache_config.prefix_caching_hash_algo))
        self.requests: dict[str, Request] = {}
        self.waiting: list[tuple[tuple, Request]] = []  # heap ordered by Request.sort_key()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.spec_stats = SpecDecodingStats(num_spec_tokens)

    # ---- queue management -------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        assert req.req_id not in self.requests, f"duplicate request id {req.req_id}"
        self.requests[req.req_id] = req
        heapq.heappush(self.waiting, (req.sort_key(), req))

    def finish_request(self, req_id: str, status: RequestStatus, stop_reason: str | int | None = None) -> None:
        """Finish a request from outside the step (abort, stop string). Unknown ids are ignored."""
        req = self.requests.pop(req_id, None)
        if req is None:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting = [item for item in self.waiting if item[1] is not req]
            heapq.heapify(self.waiting)
        self._finish(req, status, stop_reason)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting), kv_cache_usage=self.kv.usage,
            num_blocks=self.kv.num_blocks, prefix_cache_queries=self.kv.prefix_cache_queries,
            prefix_cache_hits=self.kv.prefix_cache_hits, num_preemptions=self.num_preemptions,
            spec_decoding=self.spec_stats.snapshot() if self.spec_stats.num_spec_tokens else None)

    # ---- one step ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: dict[str, int] = {}  # req_id -> tokens this step, in scheduling order
        preempted: list[str] = []
        budget = self._schedule_running(budget, scheduled, preempted)
        if not preempted:  # admitting new work while evicting old would only thrash
            self._schedule_waiting(budget, scheduled)
        return self._build_output(scheduled, preempted)

    def _schedule_running(self, budget: int, scheduled: dict[str, int], preempted: list[str]) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            num_spec = self._num_spec_tokens(req, num_new, budget)
            while not self.kv.allocate_slots(req, num_new, num_lookahead_tokens=num_spec):
                if num_spec:  # drop the drafts before evicting anyone for them
                    num_spec = 0
                    continue
                victim = max(self.running, key=Request.sort_key)
                if self.running.index(victim) < i:
                    i -= 1
                budget += scheduled.pop(victim.req_id, 0)
                self._preempt(victim)
                preempted.append(victim.req_id)
                if victim is req:
                    break
            else:
                del req.spec_token_ids[num_spec:]
                scheduled[req.req_id] = num_new + num_spec
                budget -= num_new + num_spec
                i += 1
        return budget

    def _num_spec_tokens(self, req: Request, num_new: int, budget: int) -> int:
        """Drafted tokens to verify this step: only when the chunk reaches the end of the known
        tokens, within the budget, and never more than the request may still emit minus one."""
        if not req.spec_token_ids or req.num_computed_tokens + num_new < req.num_tokens:
            return 0
        room = min(req.max_tokens - len(req.output_token_ids), self.max_model_len - req.num_tokens) - 1
        return max(0, min(len(req.spec_token_ids), budget - num_new, room))

    def _schedule_waiting(self, budget: int, scheduled: dict[str, int]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0][1]
            hits = self.kv.get_computed_blocks(req)
            num_cached = len(hits) * self.kv.block_size
            num_new = min(req.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(req, num_new, hits):
                break
            heapq.heappop(self.waiting)
            self.kv.record_lookup(req.num_tokens, num_cached)
            req.num_computed_tokens = num_cached
            if req.num_cached_tokens < 0:  # first admission, not a resume after preemption
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled[req.req_id] = num_new
            budget -= num_new

    def _build_output(self, scheduled: dict[str, int], preempted: list[str]) -> SchedulerOutput:
        out = SchedulerOutput(preempted_req_ids=preempted)
        for req_id, num_scheduled in scheduled.items():
            req = self.requests[req_id]
            start = req.num_computed_tokens
            spec = req.spec_token_ids if start + num_scheduled > req.num_tokens else []
            out.requests.append(ScheduledRequest(
                req_id=req_id,
                token_ids=req.all_token_ids[start:start + num_scheduled] + spec,
                start_pos=start,
                block_ids=req.block_ids,
                sample=start + num_scheduled >= req.num_tokens,
                sampling_params=req.sampling_params,
                prompt_token_ids=req.prompt_token_ids,
                output_token_ids=req.output_token_ids,
                step_seed=req.step_seed(),
                spec_token_ids=list(spec),
                draft_probs=None if not spec or req.draft_probs is None else req.draft_probs[:len(spec)],
                spec_step_seeds=[req.step_seed(j) for j in range(1, len(spec) + 1)],
            ))
            out.num_batched_tokens += num_scheduled
        return out

    def update_from_output(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[Request]:
        """Apply one step's results. Returns the requests that got a token or finished."""
        sampled = {rid: (toks, lps) for rid, toks, lps in zip(result.req_ids, result.sampled_token_ids,
                                                               result.logprobs)}
        updated = []
        for sr in sched.requests:
            req = self.requests.get(sr.req_id)
            if req is None:  # finished from outside while the step ran
                continue
            if sr.req_id not in sampled:
                req.num_computed_tokens += sr.num_tokens
                continue
            tokens, logprobs = sampled[sr.req_id]
            num_rejected = len(sr.spec_token_ids) + 1 - len(tokens)
            # The drafts' KV is computed up to the first rejected one; the rest is rolled back.
            req.num_computed_tokens += sr.num_tokens - num_rejected
            req.clear_spec()
            self.spec_stats.observe(len(sr.spec_token_ids), len(tokens) - 1)
            updated.append(req)
            self._append_tokens(req, tokens, logprobs)
            if not req.is_finished and num_rejected:
                self.kv.rollback(req)
        return updated

    def _append_tokens(self, req: Request, tokens: list[int], logprobs: list) -> None:
        """Append a step's new tokens one at a time, stopping at the first that ends the request."""
        for token, lp in zip(tokens, logprobs):
            req.append_output_token(token, lp)
            if req.grammar is not None:
                req.grammar.accept_tokens([token])  # the step's mask allowed only tokens it accepts
            status, reason = self._check_stop(req, token)
            if status is not None:
                self.requests.pop(req.req_id)
                self.running.remove(req)
                self._finish(req, status, reason)
                return

    # ---- helpers ----------------------------------------------------------------------
    def _check_stop(self, req: Request, token: int) -> tuple[RequestStatus | None, int | None]:
        params = req.sampling_params
        num_out = len(req.output_token_ids)
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token in params.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED, None
            if token in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, token
        if req.grammar is not None and req.grammar.is_terminated():  # the constraint is complete
            return RequestStatus.FINISHED_STOPPED, None
        if num_out >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.clear_spec()
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        heapq.heappush(self.waiting, (req.sort_key(), req))

    def _finish(self, req: Request, status: RequestStatus, stop_reason: str | int | None) -> None:
        self.kv.free(req)
        req.status = status
        req.stop_reason = stop_reason
