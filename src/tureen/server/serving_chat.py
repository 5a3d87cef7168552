"""POST /v1/chat/completions: messages through the chat template, OpenAI chat objects out."""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tureen.errors import InvalidRequestError
from tureen.server.lifecycle import ServerState
from tureen.server.sse import ChatChunks
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
from tureen.server.tool_calling import PlainContent, ToolCallFormat, check_tools, tool_call_format, tool_choice_constraint

ROLES = {"system", "user", "assistant", "tool"}


def render_chat(state: ServerState, req: ChatCompletionRequest) -> Prompt:
    """Apply the chat template (the checkpoint's or --chat-template) and tokenize.

    The template receives ``tools`` as transformers' ``apply_chat_template`` passes them.
    """
    text = _render_text(state, req)
    check_text_fits(state, text, "rendered conversation")
    return Prompt(state.engine.tokenizer.encode(text, add_special_tokens=req.add_special_tokens), text)


def _render_text(state: ServerState, req: ChatCompletionRequest) -> str:
    assert state.engine is not None
    messages = req.chat_messages()
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise InvalidRequestError(f"messages[{i}].role must be system, user, assistant or tool, got "
                                      f"{m['role']!r}", param=f"messages.{i}.role")
    tools = req.template_tools()
    return state.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt,
                                                      **({"tools": tools} if tools is not None else {}))


def _content_size(req: ChatCompletionRequest) -> int:
    """Roughly how much text the template will render: message contents plus the tool definitions."""
    text = sum(len(m.content or "") if not isinstance(m.content, list) else sum(len(p.text or "") for p in m.content)
               for m in req.messages)
    # Tools are rendered into the prompt too; their schemas are JSON, so a cheap sum of field sizes
    # is a fair proxy (a precise size would cost as much as dumping them).
    return text + sum(len(repr(t)) for t in req.tools or ())


async def render_chat_off_loop(state: ServerState, req: ChatCompletionRequest) -> Prompt:
    """``render_chat`` with large conversations rendered and tokenized in a worker thread."""
    return await off_loop(_content_size(req), render_chat, state, req)


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, raw: Request) -> Response:
    require_engine(state)
    check_model(state, req)
    req.check_supported()
    config = state.config
    # Tool schemas are checked with jsonschema: large ones in a worker thread, like the template.
    await off_loop(_content_size(req), check_tools, req, config.tool_call_parser, config.enable_auto_tool_choice)
    fmt = tool_call_format(req, config.tool_call_parser)
    prompt = await render_chat_off_loop(state, req)
    tool_constraint = tool_choice_constraint(req)
    params = prepare_params(state, req, [prompt], tool_constraint)
    await check_constraints(state, params, "tools" if tool_constraint is not None else req.constraint_field)
    base_id = new_id("chatcmpl")
    gen = start_generation(state, base_id, [prompt], params, req.priority)
    when = deadline(state)
    if req.stream:
        return GenerationResponse(state, gen, lambda: _stream(state, req, gen, base_id, when, fmt))
    return await collect(state, gen, raw, lambda: _full(state, req, gen, base_id, when, fmt))


def _finish_reason(reason: str | None, called_tools: bool) -> str | None:
    return "tool_calls" if called_tools and reason == "stop" else reason


async def _full(state: ServerState, req: ChatCompletionRequest, gen: Generation, base_id: str,
                when: float | None, fmt: ToolCallFormat) -> Response:
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
    choices = []
    for i in range(req.n):
        content, tool_calls = fmt.shape("".join(texts[i]))
        choices.append(ChatChoice(index=i, message=AssistantMessage(content=content, tool_calls=tool_calls),
                                  logprobs=logprobs[i], finish_reason=_finish_reason(finish[i][0], bool(tool_calls)),
                                  stop_reason=finish[i][1]))
    body = ChatCompletionResponse(id=base_id, model=state.engine.model_name, choices=choices,
                                  usage=usage(gen, total))
    return JSONResponse(body.model_dump(mode="json"))


async def _stream(state: ServerState, req: ChatCompletionRequest, gen: Generation, base_id: str,
                  when: float | None, fmt: ToolCallFormat):
    created = int(time.time())
    model = state.engine.model_name
    fast = ChatChunks(base_id, created, model)

    def chunk(choice: ChatChunkChoice) -> bytes:
        return sse(ChatCompletionChunk(id=base_id, created=created, model=model, choices=[choice]))

    for i in range(req.n):  # the role comes first, in a chunk of its own
        yield fast.choice(i, "", None, None, role="assistant")
    total = 0
    streams = [fmt.stream() for _ in range(req.n)]
    while (item := await next_output(gen, when, state.config.request_timeout)) is not None:
        for c in item[1].outputs:
            total += len(c.token_ids)
            if not (c.text or c.finish_reason or c.token_ids):
                continue
            if not req.logprobs and isinstance(fmt, PlainContent):  # the lean path: one orjson.dumps
                yield fast.choice(c.index, c.text or None, c.finish_reason, c.stop_reason)
                continue
            lp = chat_logprobs(state.token_strings, c, req.top_logprobs or 0) if req.logprobs else None
            delta = streams[c.index].feed(c.text)
            if c.finish_reason is None:
                if delta is not None or lp is not None:
                    yield chunk(ChatChunkChoice(index=c.index, delta=delta or DeltaMessage(), logprobs=lp))
                continue
            if delta is not None:
                yield chunk(ChatChunkChoice(index=c.index, delta=delta, logprobs=lp))
                lp = None
            last, called = streams[c.index].finish()
            yield chunk(ChatChunkChoice(index=c.index, delta=last or DeltaMessage(), logprobs=lp,
                                        finish_reason=_finish_reason(c.finish_reason, called),
                                        stop_reason=c.stop_reason))
    if req.include_usage:
        yield sse(ChatCompletionChunk(id=base_id, created=created, model=model, choices=[], usage=usage(gen, total)))
