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
from tureen.engine.kv_cache import KVCacheManager
from tureen.engine.messages import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from tureen.engine.request import Request, RequestStatus


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int


class Scheduler:
    def __init__(self, sched_config: SchedulerConfig, cache_config: CacheConfig,
                 max_model_len: int, num_blocks: int) -> None:
        self.max_num_seqs = sched_config.max_num_seqs
        self.max_num_batched_tokens = sched_config.max_num_batched_tokens
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: list[tuple[tuple, Request]] = []  # heap ordered by Request.sort_key()
        self.running: list[Request] = []
        self.num_preemptions = 0

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
            prefix_cache_hits=self.kv.prefix_cache_hits, num_preemptions=self.num_preemptions)

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
            while not self.kv.allocate_slots(req, num_new):
                victim = max(self.running, key=Request.sort_key)
                if self.running.index(victim) < i:
                    i -= 1
                budget += scheduled.pop(victim.req_id, 0)
                self._preempt(victim)
                preempted.append(victim.req_id)
                if victim is req:
                    break
            else:
                scheduled[req.req_id] = num_new
                budget -= num_new
                i += 1
        return budget

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
        for req_id, num_new in scheduled.items():
            req = self.requests[req_id]
            start = req.num_computed_tokens
            out.requests.append(ScheduledRequest(
                req_id=req_id,
                token_ids=req.all_token_ids[start:start + num_new],
                start_pos=start,
                block_ids=req.block_ids,
                sample=start + num_new == req.num_tokens,
                sampling_params=req.sampling_params,
                prompt_token_ids=req.prompt_token_ids,
                output_token_ids=req.output_token_ids,
                step_seed=req.step_seed(),
            ))
            out.num_batched_tokens += num_new
        return out

    def update_from_output(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[Request]:
        """Apply one step's results. Returns the requests that got a token or finished."""
        sampled = {rid: (tok, lp) for rid, tok, lp in zip(result.req_ids, result.sampled_token_ids, result.logprobs)}
        updated = []
        for sr in sched.requests:
            req = self.requests.get(sr.req_id)
            if req is None:  # finished from outside while the step ran
                continue
            req.num_computed_tokens += sr.num_tokens
            if sr.req_id not in sampled:
                continue
            token, logprobs = sampled[sr.req_id]
            req.append_output_token(token, logprobs)
            updated.append(req)
            status, reason = self._check_stop(req, token)
            if status is not None:
                self.requests.pop(req.req_id)
                self.running.remove(req)
                self._finish(req, status, reason)
        return updated

    # ---- helpers ----------------------------------------------------------------------
    def _check_stop(self, req: Request, token: int) -> tuple[RequestStatus | None, int | None]:
        params = req.sampling_params
        num_out = len(req.output_token_ids)
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token in params.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED, None
            if token in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, token
        if num_out >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        heapq.heappush(self.waiting, (req.sort_key(), req))

    def _finish(self, req: Request, status: RequestStatus, stop_reason: str | int | None) -> None:
        self.kv.free(req)
        req.status = status
        req.stop_reason = stop_reason
