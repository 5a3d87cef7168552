"""POST /v1/completions: prompt strings or token ids in, OpenAI text_completion objects out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tureen.outputs import CompletionOutput
from tureen.server.lifecycle import ServerState
from tureen.server.logprobs import completion_logprobs
from tureen.server.sse import CompletionChunks
from tureen.server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from tureen.server.serving import (
    Generation,
    GenerationResponse,
    Prompt,
    check_constraints,
    check_model,
    check_text_fits,
    collect,
    deadline,
    new_id,
    next_output,
    off_loop,
    prepare_params,
    require_engine,
    sse,
    start_generation,
    usage,
)


async def tokenize_prompts(state: ServerState, req: CompletionRequest) -> list[Prompt]:
    """Token ids per prompt, off the event loop when large; token-id prompts are checked by validate."""
    assert state.engine is not None
    tokenizer = state.engine.tokenizer
    prompts = []
    for p in req.prompts():
        if isinstance(p, str):
            check_text_fits(state, p)
            ids = await off_loop(len(p), tokenizer.encode, p, req.add_special_tokens)
            prompts.append(Prompt(ids, p))
        else:
            prompts.append(Prompt(list(p)))
    return prompts


@dataclass
class _Choice:
    """One choice's accumulated text and logprobs (also used to number streamed text offsets)."""

    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: CompletionLogprobs | None = None
    offset: int = 0
    tokens: int = 0
    chunks: list[str] = field(default_factory=list)


def _choice_index(prompt_index: int, c: CompletionOutput, n: int) -> int:
    return prompt_index * n + c.index


async def create_completion(state: ServerState, req: CompletionRequest, raw: Request) -> Response:
    require_engine(state)
    check_model(state, req)
    req.check_supported()
    prompts = await tokenize_prompts(state, req)
    params = prepare_params(state, req, prompts)
    await check_constraints(state, params, req.constraint_field)
    base_id = new_id("cmpl")
    gen = start_generation(state, base_id, prompts, params, req.priority)
    when = deadline(state)
    if req.stream:
        return GenerationResponse(state, gen, lambda: _stream(state, req, gen, base_id, when))
    return await collect(state, gen, raw, lambda: _full(state, req, gen, base_id, when))


async def _full(state: ServerState, req: CompletionRequest, gen: Generation, base_id: str,
                when: float | None) -> Response:
    choices = [_Choice() for _ in range(len(gen.prompts) * req.n)]
    while (item := await next_output(gen, when, state.config.request_timeout)) is not None:
        prompt_index, out = item
        for c in out.outputs:
            ch = choices[_choice_index(prompt_index, c, req.n)]
            _accumulate(state, req, ch, c)
    total = sum(ch.tokens for ch in choices)
    body = CompletionResponse(
        id=base_id, model=state.engine.model_name, usage=usage(gen, total),
        choices=[CompletionChoice(index=i, text="".join(ch.chunks), logprobs=ch.logprobs,
                                  finish_reason=ch.finish_reason, stop_reason=ch.stop_reason)
                 for i, ch in enumerate(choices)])
    return JSONResponse(body.model_dump(mode="json"))


def _accumulate(state: ServerState, req: CompletionRequest, ch: _Choice, c: CompletionOutput) -> None:
    if req.logprobs is not None:
        lp = completion_logprobs(state.token_strings, c, ch.offset)
        if ch.logprobs is None:
            ch.logprobs = lp
        else:
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(ch.logprobs, name).extend(getattr(lp, name))
    ch.chunks.append(c.text)
    ch.offset += len(c.text)
    ch.tokens += len(c.token_ids)
    if c.finish_reason is not None:
        ch.finish_reason, ch.stop_reason = c.finish_reason, c.stop_reason


async def _stream(state: ServerState, req: CompletionRequest, gen: Generation, base_id: str,
                  when: float | None):
    created = int(time.time())
    fast = CompletionChunks(base_id, created, state.engine.model_name) if req.logprobs is None else None
    offsets: dict[int, int] = {}
    total = 0
    while (item := await next_output(gen, when, state.config.request_timeout)) is not None:
        prompt_index, out = item
        for c in out.outputs:
            index = _choice_index(prompt_index, c, req.n)
            total += len(c.token_ids)
            if not (c.text or c.finish_reason or c.token_ids):
                continue
            if fast is not None:
                yield fast.choice(index, c.text, c.finish_reason, c.stop_reason)
            else:
                yield sse(_chunk(state, req, base_id, created, index, c, offsets))
    if req.include_usage:
        yield sse(CompletionResponse(id=base_id, created=created, model=state.engine.model_name, choices=[],
                                     usage=usage(gen, total)))


def _chunk(state: ServerState, req: CompletionRequest, base_id: str, created: int, index: int,
           c: CompletionOutput, offsets: dict[int, int]) -> CompletionResponse:
    logprobs = None
    if req.logprobs is not None:
        logprobs = completion_logprobs(state.token_strings, c, offsets.get(index, 0))
    offsets[index] = offsets.get(index, 0) + len(c.text)
    choice = CompletionChoice(index=index, text=c.text, logprobs=logprobs, finish_reason=c.finish_reason,
                              stop_reason=c.stop_reason)
    return CompletionResponse(id=base_id, created=created, model=state.engine.model_name, choices=[choice])

