"""POST /v1/chat/completions: messages through the chat template, OpenAI chat objects out."""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tureen.errors import InvalidRequestError
from tureen.server.lifecycle import ServerState
from tureen.server.logprobs import chat_logprobs
from tureen.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    DeltaMessage,
)
from tureen.server.serving import (
    Generation,
    GenerationResponse,
    Prompt,
    check_model,
    collect,
    deadline,
    new_id,
    next_output,
    prepare_params,
    require_engine,
    sse,
    start_generation,
    usage,
)

ROLES = {"system", "user", "assistant"}


def render_chat(state: ServerState, req: ChatCompletionRequest) -> Prompt:
    """Apply the chat template (the checkpoint's or --chat-template) and tokenize."""
    assert state.engine is not None
    messages = req.chat_messages()
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise InvalidRequestError(f"messages[{i}].role must be system, user or assistant, got {m['role']!r}",
                                      param=f"messages.{i}.role")
    tokenizer = state.engine.tokenizer
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt)
    return Prompt(tokenizer.encode(text, add_special_tokens=req.add_special_tokens), text)


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, raw: Request) -> Response:
    require_engine(state)
    check_model(state, req)
    req.check_supported()
    prompt = render_chat(state, req)
    params = prepare_params(state, req, [prompt])
    base_id = new_id("chatcmpl")
    gen = start_generation(state, base_id, [prompt], params, req.priority)
    when = deadline(state)
    if req.stream:
        return GenerationResponse(state, gen, lambda: _stream(state, req, gen, base_id, when))
    return await collect(state, gen, raw, lambda: _full(state, req, gen, base_id, when))


async def _full(state: ServerState, req: ChatCompletionRequest, gen: Generation, base_id: str,
                when: float | None) -> Response:
    texts: list[list[str]] = [[] for _ in range(req.n)]
    logprobs: list[ChatLogprobs | None] = [ChatLogprobs(content=[]) if req.logprobs else None
                                           for _ in range(req.n)]
    finish: list[tuple[str | None, int | str | None]] = [(None, None)] * req.n
    total = 0
    while (item := await next_output(gen, when, state.config.request_timeout)) is not None:
        for c in item[1].outputs:
            texts[c.index].append(c.text)
            total += len(c.token_ids)
            if c.finish_reason is not None:
                finish[c.index] = (c.finish_reason, c.stop_reason)
            lp = logprobs[c.index]
            if lp is not None and lp.content is not None:
                lp.content.extend(chat_logprobs(state.token_strings, c, req.top_logprobs or 0).content or [])
    choices = [ChatChoice(index=i, message=AssistantMessage(content="".join(texts[i])), logprobs=logprobs[i],
                          finish_reason=finish[i][0], stop_reason=finish[i][1]) for i in range(req.n)]
    body = ChatCompletionResponse(id=base_id, model=state.engine.model_name, choices=choices,
                                  usage=usage(gen, total))
    return JSONResponse(body.model_dump(mode="json"))


async def _stream(state: ServerState, req: ChatCompletionRequest, gen: Generation, base_id: str,
                  when: float | None):
    created = int(time.time())
    model = state.engine.model_name

    def chunk(choice: ChatChunkChoice) -> bytes:
        return sse(ChatCompletionChunk(id=base_id, created=created, model=model, choices=[choice]))

    for i in range(req.n):  # the role comes first, in a chunk of its own
        yield chunk(ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
    total = 0
    while (item := await next_output(gen, when, state.config.request_timeout)) is not None:
        for c in item[1].outputs:
            total += len(c.token_ids)
            if not (c.text or c.finish_reason or c.token_ids):
                continue
            lp = chat_logprobs(state.token_strings, c, req.top_logprobs or 0) if req.logprobs else None
            yield chunk(ChatChunkChoice(index=c.index, delta=DeltaMessage(content=c.text or None), logprobs=lp,
                                        finish_reason=c.finish_reason, stop_reason=c.stop_reason))
    if req.include_usage:
        yield sse(ChatCompletionChunk(id=base_id, created=created, model=model, choices=[], usage=usage(gen, total)))
