"""The one shared fake engine for server tests: a scripted ``EngineClient``.

Token ``k`` of sample ``i`` is a letter fixed by the prompt, one step every ``step_delay`` seconds,
so the HTTP layer's own behaviour (shapes, errors, admission, timeouts, disconnects, metrics) is
pinned down in seconds. Knobs: ``extra_waiting``/``kv_usage`` (admission), ``frozen_heartbeat``
(watchdog), ``fail_after`` (a mid-stream engine error), ``aborted``/``running`` (what was aborted).
"""

from __future__ import annotations

import asyncio
import time

from tureen.config import EngineConfig
from tureen.engine.protocol import EngineClient, EngineStats
from tureen.errors import ContextLengthExceededError, InvalidRequestError
from tureen.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from tureen.sampling_params import SamplingParams

MODEL = "scripted"
BOS = 256


class ScriptedTokenizer:
    """Bytes are tokens (plus a BOS id 256); the model answers with lowercase letters."""

    vocab_size = 300
    max_token_chars = 1  # a token is one byte, so one character covers at least one token
    eos_token_ids = [299]
    generation_defaults: dict = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS] if add_special_tokens else []) + list(text.encode())

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def id_to_token(self, token_id: int) -> str:
        return chr(token_id) if token_id < 256 else f"<{token_id}>"

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        def text(content):
            return content if isinstance(content, str) else "".join(p["text"] for p in content)
        out = "".join(f"<{m['role']}>{text(m['content'])}\n" for m in messages)
        return out + ("<assistant>" if add_generation_prompt else "")


def letter(prompt_ids: list[int], sample: int, step: int) -> int:
    return ord("a") + (sum(prompt_ids) + 3 * sample + step) % 26


class ScriptedEngine:
    """Token ``k`` of sample ``i`` is a letter fixed by the prompt; one step every ``step_delay`` s."""

    def __init__(self, step_delay: float = 0.0, max_model_len: int = 128) -> None:
        self.config = EngineConfig.from_kwargs(MODEL)
        self.tokenizer = ScriptedTokenizer()
        self.model_name = MODEL
        self.max_model_len = max_model_len
        self.is_demo_model = False
        self.step_delay = step_delay
        self.running: dict[str, asyncio.Event] = {}
        self.aborted: list[str] = []  # requests whose consumer left before the end
        self.extra_waiting = 0
        self.kv_usage = 0.0
        self.frozen_heartbeat: float | None = None
        self.fail_after: int | None = None  # raise mid-stream after this many steps
        self.totals = EngineStats(num_blocks=64, block_size=16)

    def validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if not all(0 <= t < self.tokenizer.vocab_size for t in ids):
            raise InvalidRequestError("a token id is outside the vocabulary", param="prompt")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids)
        if len(ids) + max_tokens > self.max_model_len:
            raise ContextLengthExceededError("too long", limit=self.max_model_len, prompt_tokens=len(ids),
                                             max_tokens=max_tokens)
        params.max_tokens = max_tokens

    async def generate(self, prompt, params: SamplingParams, request_id: str, *, priority: int = 0):
        ids = prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt)
        self.validate(ids, params)
        abort = self.running[request_id] = asyncio.Event()
        metrics = RequestMetrics(arrival_time=time.time(), first_scheduled_time=time.time())
        texts = [""] * params.n
        finished = False
        try:
            for step in range(params.max_tokens):
                try:
                    await asyncio.wait_for(abort.wait(), self.step_delay)
                except TimeoutError:
                    pass
                if abort.is_set():
                    finished = True
                    yield self._output(request_id, ids, [_done(i, "abort") for i in range(params.n)], metrics)
                    return
                if self.fail_after is not None and step >= self.fail_after:
                    raise RuntimeError("scripted engine failure")
                outs = [self._token(ids, params, i, step, texts) for i in range(params.n)]
                finished = step == params.max_tokens - 1 or all(o.finish_reason for o in outs)
                if finished:
                    for o in outs:
                        o.finish_reason = o.finish_reason or "length"
                yield self._output(request_id, ids, outs, metrics, finished)
                if finished:
                    return
        finally:
            self.running.pop(request_id, None)
            if not finished:
                self.aborted.append(request_id)

    def _token(self, ids, params, i, step, texts) -> CompletionOutput:
        tok = letter(ids, i, step)
        texts[i] += chr(tok)
        stop = next((s for s in params.stop if texts[i].endswith(s)), None)
        lp = None
        if params.logprobs is not None:
            lp = [{tok: Logprob(-0.25, 1, chr(tok)), tok + 1: Logprob(-1.5, 2, chr(tok + 1))}]
        self.totals.generation_tokens += 1
        return CompletionOutput(index=i, text="" if stop else chr(tok), token_ids=[tok], logprobs=lp,
                                finish_reason="stop" if stop else None, stop_reason=stop)

    def _output(self, rid, ids, outs, metrics, finished=True) -> RequestOutput:
        now = time.time()
        metrics.first_token_time = metrics.first_token_time or now
        metrics.last_token_time = now
        if finished:
            metrics.finished_time = now
        return RequestOutput(rid, None, ids, outs, finished, num_cached_tokens=len(ids) // 2, metrics=metrics)

    async def check_structured_outputs(self, params: SamplingParams) -> None:
        """The scripted engine has no grammar backend; the structured-output tests run a real engine."""

    async def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.running[request_id].set()

    def stats(self) -> EngineStats:
        beat = self.frozen_heartbeat if self.frozen_heartbeat is not None else time.monotonic()
        return EngineStats(num_running=len(self.running), num_waiting=self.extra_waiting, kv_cache_usage=self.kv_usage,
                           num_blocks=64, block_size=16, generation_tokens=self.totals.generation_tokens,
                           heartbeat=beat)

    @property
    def is_alive(self) -> bool:
        return True

    def shutdown(self) -> None:
        pass


def _done(i: int, reason: str) -> CompletionOutput:
    return CompletionOutput(index=i, text="", token_ids=[], finish_reason=reason)


assert isinstance(ScriptedEngine(), EngineClient)
