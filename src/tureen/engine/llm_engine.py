"""The synchronous engine: add requests, ``step()`` until they finish.

    prompt ──tokenize/validate──> Request(s) ──> Scheduler.schedule() ──SchedulerOutput──>
    ModelRunner.execute() ──ModelRunnerOutput──> Scheduler.update_from_output() ──>
    IncrementalDetokenizer (stop strings) ──> RequestOutput
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tureen.config import EngineConfig
from tureen.engine.detokenizer import IncrementalDetokenizer
from tureen.engine.messages import TokenLogprobs
from tureen.engine.request import Request, RequestStatus
from tureen.engine.scheduler import Scheduler, SchedulerStats
from tureen.errors import (ConfigError, ContextLengthExceededError, InvalidRequestError, PromptTooLongError)
from tureen.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from tureen.sampling_params import RequestOutputKind, SamplingParams
from tureen.tokenizer import Tokenizer

logger = logging.getLogger("tureen.engine")

DEMO_MODEL_NAME = "tureen-demo"


@dataclass
class _Sample:
    """One of a request's ``n`` completions: a scheduler Request plus its text state."""

    index: int
    req: Request
    detok: IncrementalDetokenizer
    num_tokens_seen: int = 0  # output tokens already fed to the detokenizer
    num_tokens_sent: int = 0  # output tokens already handed out (DELTA mode)
    text: str = ""  # text released so far (the detokenizer holds back a possible partial stop string)
    finish_sent: bool = False


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    samples: list[_Sample] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.req.is_finished for s in self.samples)


def resolve_model(config: EngineConfig) -> tuple[Path, bool]:
    """The checkpoint directory to load, and whether it is the built-in demo model."""
    from tureen.executor.loader import resolve_checkpoint

    if config.model.model is None:
        from tureen.demo import DEMO_MODEL_NOTICE, demo_model_path

        logger.warning(DEMO_MODEL_NOTICE)
        return demo_model_path(), True
    return resolve_checkpoint(config.model.model, config.model.revision), False


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from tureen.executor.model_runner import ModelRunner  # torch lives behind this import

        self.config = config
        self.checkpoint_dir, self.is_demo_model = resolve_model(config)
        self.model_name = config.model.served_model_name or (
            DEMO_MODEL_NAME if self.is_demo_model else config.model.model)
        self.tokenizer = Tokenizer.from_pretrained(self.checkpoint_dir, chat_template=config.model.chat_template)
        self.runner = ModelRunner(config, self.checkpoint_dir)
        self.max_model_len = self._resolve_max_model_len()
        self.num_kv_blocks = self.runner.determine_num_blocks()
        self.runner.allocate_kv_cache(self.num_kv_blocks)
        self.block_size = config.cache.block_size
        self.max_concurrency = self.num_kv_blocks // -(-self.max_model_len // self.block_size)
        self.scheduler = Scheduler(config.scheduler, config.cache, self.max_model_len, self.num_kv_blocks)
        self._parents: dict[str, _Parent] = {}
        self._samples: dict[str, tuple[_Parent, _Sample]] = {}  # scheduler req_id -> owner
        self._finished_outside: list[RequestOutput] = []  # aborted between steps, reported next step
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._log_kv_cache()

    def _resolve_max_model_len(self) -> int:
        limit = self.runner.max_position_embeddings
        wanted = self.config.model.max_model_len or limit
        if wanted > limit:
            raise ConfigError(f"max_model_len={wanted} is larger than the model's max_position_embeddings={limit}")
        return wanted

    def _log_kv_cache(self) -> None:
        kib = self.runner.kv_bytes_per_token / 1024
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.1f KiB/token); max concurrency at "
            "max_model_len=%d: %d sequences", self.num_kv_blocks, self.block_size,
            self.num_kv_blocks * self.block_size, kib, self.max_model_len, self.max_concurrency)

    # ---- adding and aborting ------------------------------------------------------------
    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidRequestError("a token-id prompt must be a list of integers", param="prompt")
        vocab = min(self.tokenizer.vocab_size, self.runner.vocab_size)  # the model's table may be smaller
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
        return list(prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Check a request fits; return its resolved max_tokens. Raises typed errors, changes nothing."""
        n_prompt, limit = len(prompt_token_ids), self.max_model_len
        if n_prompt == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if n_prompt >= limit:
            raise PromptTooLongError(
                f"the prompt has {n_prompt} tokens, but max_model_len is {limit} (prompt plus at least one "
                f"generated token must fit)", limit=limit, value=n_prompt)
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - n_prompt
        if n_prompt + max_tokens > limit:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} in the completion). "
                f"Please reduce the length of the prompt or max_tokens.",
                limit=limit, prompt_tokens=n_prompt, max_tokens=max_tokens)
        capacity = self.num_kv_blocks * self.block_size
        if -(-(n_prompt + max_tokens) // self.block_size) > self.num_kv_blocks:
            raise PromptTooLongError(
                f"the request needs up to {n_prompt + max_tokens} tokens of KV cache, but the whole cache holds "
                f"{capacity}; raise the KV budget or lower max_tokens", limit=capacity, value=n_prompt + max_tokens)
        return max_tokens

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                    priority: int = 0, arrival_time: float | None = None,
                    prompt_token_ids: list[int] | None = None) -> None:
        if request_id in self._parents:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        ids = prompt_token_ids if prompt_token_ids is not None else self.tokenize_prompt(prompt)
        max_tokens = self.validate(ids, params)
        params = dataclasses.replace(params, eos_token_ids=list(self.tokenizer.eos_token_ids))
        now = time.time() if arrival_time is None else arrival_time
        parent = _Parent(request_id, prompt if isinstance(prompt, str) else None, ids, params, RequestMetrics(now))
        for i in range(params.n):
            child_params = params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
            req_id = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(req_id, ids, child_params, max_tokens=max_tokens, priority=priority, arrival_time=now)
            sample = _Sample(i, req, IncrementalDetokenizer(self.tokenizer, ids, child_params))
            parent.samples.append(sample)
            self._samples[req_id] = (parent, sample)
        self._parents[request_id] = parent
        for sample in parent.samples:
            self.scheduler.add_request(sample.req)

    def abort_request(self, request_id: str) -> None:
        """Abort a request: its blocks are freed now; its final output comes from the next step()."""
        parent = self._parents.get(request_id)
        if parent is None:
            return
        for sample in parent.samples:
            if not sample.req.is_finished:
                self.scheduler.finish_request(sample.req.req_id, RequestStatus.FINISHED_ABORTED)
        out = self._make_output(parent)
        if out is not None:
            self._finished_outside.append(out)

    def abort_all(self) -> None:
        for request_id in list(self._parents):
            self.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents) or bool(self._finished_outside)

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._finished_outside = self._finished_outside, []
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return outputs
        self._mark_scheduled(sched.requests)
        result = self.runner.execute(sched)
        updated = self.scheduler.update_from_output(sched, result)
        return outputs + self._process(updated)

    def _mark_scheduled(self, scheduled) -> None:
        now = time.time()
        for sr in scheduled:
            parent, sample = self._samples[sr.req_id]
            if sample.req.first_scheduled_time is None:
                sample.req.first_scheduled_time = now
                if parent.metrics.first_scheduled_time is None:
                    parent.metrics.first_scheduled_time = now

    def _process(self, updated: list[Request]) -> list[RequestOutput]:
        now = time.time()
        touched: dict[str, _Parent] = {}
        for req in updated:
            parent, sample = self._samples[req.req_id]
            new_tokens = req.output_token_ids[sample.num_tokens_seen:]
            sample.num_tokens_seen = len(req.output_token_ids)
            self.generation_tokens_total += len(new_tokens)
            stop = sample.detok.update(new_tokens)
            if stop is not None:
                if req.is_finished:
                    req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop
                else:
                    self.scheduler.finish_request(req.req_id, RequestStatus.FINISHED_STOPPED, stop)
            if parent.metrics.first_token_time is None:
                parent.metrics.first_token_time = now
            parent.metrics.last_token_time = now
            touched[parent.request_id] = parent
        outputs = []
        for parent in touched.values():
            out = self._make_output(parent)
            if out is not None:
                outputs.append(out)
        return outputs

    # ---- outputs --------------------------------------------------------------------------
    def _make_output(self, parent: _Parent) -> RequestOutput | None:
        finished = parent.finished
        kind = parent.params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        if finished:
            self._retire(parent)
        completions = [c for s in parent.samples if (c := self._completion(parent, s, kind)) is not None]
        return RequestOutput(
            request_id=parent.request_id, prompt=parent.prompt, prompt_token_ids=parent.prompt_token_ids,
            outputs=completions, finished=finished,
            num_cached_tokens=max(parent.samples[0].req.num_cached_tokens, 0), metrics=parent.metrics)

    def _completion(self, parent: _Parent, sample: _Sample, kind: RequestOutputKind) -> CompletionOutput | None:
        req = sample.req
        finish_reason = req.status.finish_reason
        delta = kind == RequestOutputKind.DELTA
        start = sample.num_tokens_sent if delta else 0
        if delta and start == len(req.output_token_ids) and (finish_reason is None or sample.finish_sent):
            return None
        text_delta = sample.detok.take_delta(req.is_finished)
        sample.text += text_delta
        late_stop = sample.detok.stop_reason  # a stop string only complete once held-back bytes flush
        if late_stop is not None and req.status == RequestStatus.FINISHED_LENGTH:
            req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, late_stop
            finish_reason = req.status.finish_reason
        sample.num_tokens_sent = len(req.output_token_ids)
        sample.finish_sent = finish_reason is not None
        logprobs = None
        if parent.params.logprobs is not None:
            logprobs = [self._logprob_dict(lp) for lp in req.logprobs[start:]]
        return CompletionOutput(
            index=sample.index, text=text_delta if delta else sample.text, token_ids=req.output_token_ids[start:],
            cumulative_logprob=None if logprobs is None else self._cumulative(req),
            logprobs=logprobs, finish_reason=finish_reason, stop_reason=req.stop_reason)

    def _logprob_dict(self, lp: TokenLogprobs | None) -> dict[int, Logprob]:
        if lp is None:
            return {}
        out: dict[int, Logprob] = {}
        for i, (tok, val) in enumerate(zip(lp.token_ids, lp.logprobs)):
            if tok in out:
                continue
            rank = lp.chosen_rank if i == 0 else i
            out[tok] = Logprob(val, rank, self.tokenizer.decode([tok], skip_special_tokens=False))
        return out

    @staticmethod
    def _cumulative(req: Request) -> float:
        return float(sum(lp.logprobs[0] for lp in req.logprobs if lp is not None))

    def _retire(self, parent: _Parent) -> None:
        if self._parents.pop(parent.request_id, None) is None:
            return
        parent.metrics.finished_time = time.time()
        parent.metrics.num_preemptions = sum(s.req.num_preemptions for s in parent.samples)
        self.prompt_tokens_total += len(parent.prompt_token_ids)
        for sample in parent.samples:
            self._samples.pop(sample.req.req_id, None)

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()
