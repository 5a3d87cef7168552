"""The synchronous engine: add requests, ``step()`` until they finish.

    prompt ──InputProcessor (tokenize, validate once)──> Request(s) ──> Scheduler.schedule() ──SchedulerOutput──>
    ModelRunner.execute() ──ModelRunnerOutput──> Scheduler.update_from_output() ──>
    IncrementalDetokenizer (stop strings) ──> RequestOutput
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path

from tureen.config import EngineConfig
from tureen.engine.core_messages import EngineCoreRequest
from tureen.engine.detokenizer import IncrementalDetokenizer
from tureen.engine.executor import Executor
from tureen.engine.input_processor import InputLimits, InputProcessor
from tureen.engine.messages import SchedulerOutput, TokenLogprobs
from tureen.engine.request import Request, RequestStatus
from tureen.engine.scheduler import Scheduler, SchedulerStats
from tureen.engine.spec_decode.speculator import Speculator, build_speculator
from tureen.engine.step_timing import NULL_TIMER, NullTimer, StepTimer
from tureen.errors import ConfigError, InvalidRequestError
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
    grammar: Future | None = None  # the compiled constraint, while its samples wait to be scheduled

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
    """The engine core: scheduler, executor (model runner) and detokenizer, stepped by its owner.

    ``runner`` is the executor: anything with the ``Executor`` shape (``engine/executor.py``).
    By default the model runner for the checkpoint; tests pass a fake, and later a draft runner
    or tensor-parallel workers plug in the same way.
    """

    def __init__(self, config: EngineConfig, runner: Executor | None = None) -> None:
        self.config = config
        self.checkpoint_dir, self.is_demo_model = resolve_model(config)
        self.model_name = config.model.served_model_name or (
            DEMO_MODEL_NAME if self.is_demo_model else config.model.model)
        self.tokenizer = Tokenizer.from_pretrained(self.checkpoint_dir, chat_template=config.model.chat_template)
        if runner is None:
            from tureen.executor.model_runner import ModelRunner  # torch lives behind this import

            runner = ModelRunner(config, self.checkpoint_dir)
        self.runner = runner
        self.max_model_len = self._resolve_max_model_len()
        self.num_kv_blocks = self.runner.determine_num_blocks()
        self.runner.allocate_kv_cache(self.num_kv_blocks)
        self.block_size = config.cache.block_size
        self.max_concurrency = self.num_kv_blocks // -(-self.max_model_len // self.block_size)
        self.processor = InputProcessor(self.tokenizer, self.input_limits())
        spec = config.speculative_config
        self.scheduler = Scheduler(config.scheduler, config.cache, self.max_model_len, self.num_kv_blocks,
                                   num_spec_tokens=spec.num_speculative_tokens if spec else 0)
        self.speculator = self._build_speculator()
        from tureen.executor.structured import StructuredOutputManager  # xgrammar lives behind this import
        self.structured = StructuredOutputManager(config.structured_outputs, self.tokenizer, self.runner.vocab_size)
        self._compiling: list[_Parent] = []  # constrained requests whose grammar is still compiling
        self._num_constrained = 0  # unfinished requests with a constraint; 0 skips the bitmask entirely
        self._parents: dict[str, _Parent] = {}
        self._samples: dict[str, tuple[_Parent, _Sample]] = {}  # scheduler req_id -> owner
        self._finished_outside: list[RequestOutput] = []  # aborted between steps, reported next step
        self.step_timer: NullTimer | StepTimer = NULL_TIMER  # enable_step_timing() swaps in a StepTimer
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._log_kv_cache()

    def _build_speculator(self) -> Speculator | None:
        spec = self.config.speculative_config
        if spec is None:
            return None

        def load_draft():
            from tureen.executor.spec_decode.draft import DraftModelProposer, SelfDraftProposer  # torch

            if spec.is_self_draft:
                return SelfDraftProposer.load(self.config, spec, self.checkpoint_dir, self.runner, self.scheduler.kv)
            return DraftModelProposer.load(self.config, spec, self.checkpoint_dir, self.tokenizer,
                                           self.runner.vocab_size, self.num_kv_blocks)

        speculator = build_speculator(spec, self.max_model_len, load_draft)
        logger.info("speculative decoding: %s, %d tokens per step, while at most %s requests run", spec.method
                    if not spec.is_self_draft else f"{spec.quantization} self-draft", spec.num_speculative_tokens,
                    spec.disable_by_batch_size if spec.disable_by_batch_size is not None else "any number of")
        return speculator

    def input_limits(self) -> InputLimits:
        vocab = min(self.tokenizer.vocab_size, self.runner.vocab_size)  # the model's table may be smaller
        return InputLimits(vocab, self.max_model_len, self.num_kv_blocks, self.block_size)

    def _resolve_max_model_len(self) -> int:
        limit = self.runner.max_position_embeddings
        wanted = self.config.model.max_model_len or limit
        if wanted > limit:
            raise ConfigError(f"max_model_len={wanted} is larger than the model's max_position_embeddings={limit}")
        return wanted

    def _log_kv_cache(self) -> None:
        kib = self.runner.kv_bytes_per_token / 1024
        draft = getattr(self.runner, "draft_kv_bytes_per_token", lambda: 0)()
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.1f KiB/token%s); max concurrency at "
            "max_model_len=%d: %d sequences; KV dtype %s", self.num_kv_blocks, self.block_size,
            self.num_kv_blocks * self.block_size, kib,
            f", plus {draft / 1024:.1f} KiB/token for the draft model's cache, from the same budget" if draft else "",
            self.max_model_len, self.max_concurrency, self.runner.kv_cache_description())

    # ---- adding and aborting ------------------------------------------------------------
    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        return self.processor.tokenize(prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Check a request fits; return its resolved max_tokens. Raises typed errors, changes nothing."""
        return self.processor.validate(prompt_token_ids, params)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                    priority: int = 0, arrival_time: float | None = None,
                    prompt_token_ids: list[int] | None = None) -> None:
        if request_id in self._parents:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        self.add_core_request(self.processor.process(request_id, prompt, params, priority=priority,
                                                     arrival_time=arrival_time, prompt_token_ids=prompt_token_ids))

    def add_core_request(self, core: EngineCoreRequest) -> None:
        """Add a request the input processor has already validated and resolved (no checks here)."""
        if core.request_id in self._parents:
            raise InvalidRequestError(f"request id {core.request_id!r} is already in use", param="request_id")
        params, ids = core.params, core.prompt_token_ids
        grammar = self._start_compiling(params)
        assert params.max_tokens is not None, "an EngineCoreRequest has its max_tokens resolved"
        parent = _Parent(core.request_id, core.prompt, ids, params, RequestMetrics(core.arrival_time))
        for i in range(params.n):
            child_params = params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
            req_id = core.request_id if params.n == 1 else f"{core.request_id}#{i}"
            req = Request(req_id, ids, child_params, max_tokens=params.max_tokens, priority=core.priority,
                          arrival_time=core.arrival_time)
            sample = _Sample(i, req, IncrementalDetokenizer(self.tokenizer, ids, child_params))
            parent.samples.append(sample)
            self._samples[req_id] = (parent, sample)
        self._parents[core.request_id] = parent
        if grammar is not None:
            parent.grammar = grammar
            self._compiling.append(parent)
            self._num_constrained += len(parent.samples)
            return
        for sample in parent.samples:
            self.scheduler.add_request(sample.req)

    def check_structured_outputs(self, params: SamplingParams) -> None:
        """Compile the request's constraint now (cached); InvalidRequestError names what is wrong.

        Blocking: the server calls it off its event loop, the offline API before adding requests.
        """
        if params.structured_outputs is not None:
            self.structured.check(params.structured_outputs)

    def _start_compiling(self, params: SamplingParams) -> Future | None:
        """Compile the constraint in the background; the samples wait until it is ready.

        A constraint already known to be bad raises here, before anything is queued.
        """
        if params.structured_outputs is None:
            return None
        future = self.structured.compile_async(params.structured_outputs)
        if future.done() and future.exception() is not None:
            raise future.exception()
        return future

    def _admit_compiled(self) -> None:
        """Schedule the constrained requests whose grammar is ready; fail those whose grammar is bad."""
        if not self._compiling:
            return
        if not self.scheduler.has_unfinished():  # nothing else to run: wait a little for a compilation
            wait([p.grammar for p in self._compiling], timeout=0.05, return_when=FIRST_COMPLETED)
        waiting = []
        for parent in self._compiling:
            if not parent.grammar.done():
                waiting.append(parent)
            elif parent.grammar.exception() is not None:
                logger.warning("request %s: %s", parent.request_id, parent.grammar.exception())
                self._finish_unscheduled(parent)
            else:
                for sample in parent.samples:
                    sample.req.grammar = self.structured.new_grammar(parent.grammar.result())
                    self.scheduler.add_request(sample.req)
                parent.grammar = None
        self._compiling = waiting

    def _finish_unscheduled(self, parent: _Parent) -> None:
        for sample in parent.samples:
            sample.req.status = RequestStatus.FINISHED_ABORTED
        out = self._make_output(parent)
        if out is not None:
            self._finished_outside.append(out)

    def abort_request(self, request_id: str) -> None:
        """Abort a request: its blocks are freed now; its final output comes from the next step()."""
        parent = self._parents.get(request_id)
        if parent is None:
            return
        if parent in self._compiling:  # never reached the scheduler
            self._compiling.remove(parent)
            self._finish_unscheduled(parent)
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
        timer = self.step_timer
        timer.start()
        self._admit_compiled()
        outputs, self._finished_outside = self._finished_outside, []
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return outputs
        self._mark_scheduled(sched.requests)
        if self._num_constrained:
            sched.token_bitmask = self.structured.token_bitmask(sched, self.scheduler.requests)
        timer.lap("schedule")
        try:
            result = self.runner.execute(sched)
        except Exception as exc:  # a failed model step fails its own requests, never the engine
            return outputs + self._fail_step(sched, exc)
        updated = self.scheduler.update_from_output(sched, result)
        timer.lap("update")
        outputs += self._process(updated)
        timer.lap("output")
        if self.speculator is not None:  # drafts for the next step, once stop strings have ended requests
            self.speculator.propose(self.scheduler.running)
            timer.lap("propose")
        timer.end_step()
        return outputs

    def enable_step_timing(self) -> StepTimer:
        """Start timing every step's phases (``engine/step_timing.py``); returns the timer."""
        self.step_timer = StepTimer()
        if hasattr(self.runner, "step_timer"):  # the model runner times its own phases
            self.runner.step_timer = self.step_timer
        return self.step_timer

    def _fail_step(self, sched: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        """Finish every request of a step that raised (blocks freed) with an error output each."""
        logger.error("a model step failed; failing its %d requests", len(sched.requests), exc_info=exc)
        message = f"the engine failed while running this request: {type(exc).__name__}: {exc}"
        failed: dict[str, _Parent] = {}
        for sr in sched.requests:
            owner = self._samples.get(sr.req_id)
            if owner is not None:
                failed[owner[0].request_id] = owner[0]
        outputs = []
        for parent in failed.values():
            for sample in parent.samples:
                if not sample.req.is_finished:
                    self.scheduler.finish_request(sample.req.req_id, RequestStatus.FINISHED_ABORTED)
            out = self._make_output(parent)
            if out is not None:
                out.error = message
                outputs.append(out)
        return outputs

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
            self.step_timer.lap("output")
            stop = self._detokenize(sample, req)
            self.step_timer.lap("detokenize")
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

    def _detokenize(self, sample: _Sample, req: Request) -> str | None:
        """Feed the request's new tokens to its detokenizer; return the stop string they complete.

        A step may add several tokens (accepted drafts). With stop strings they go in one at a
        time, and tokens after the one that completed a stop string are dropped, as if the
        request had decoded one token per step.
        """
        new_tokens = req.output_token_ids[sample.num_tokens_seen:]
        stop = None
        if len(new_tokens) > 1 and req.sampling_params.stop:
            for i, token in enumerate(new_tokens):
                stop = sample.detok.update([token])
                if stop is not None:
                    req.truncate_output(sample.num_tokens_seen + i + 1)
                    break
        else:
            stop = sample.detok.update(new_tokens)
        self.generation_tokens_total += len(req.output_token_ids) - sample.num_tokens_seen
        sample.num_tokens_seen = len(req.output_token_ids)
        return stop

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
        if parent.params.structured_outputs is not None:
            self._num_constrained -= len(parent.samples)
        self.prompt_tokens_total += len(parent.prompt_token_ids)
        for sample in parent.samples:
            self._samples.pop(sample.req.req_id, None)

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()
