"""The FastAPI app: routes, API-key check, body limit, and the engine's life inside the app's.

The HTTP layer only translates: requests become SamplingParams and token ids, engine outputs
become OpenAI objects. The app talks to the engine only through ``EngineClient``
(``tureen.engine.protocol``); the engine core runs in its own process, so this event loop stays
free for health checks, new connections and streaming.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import re
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

import tureen
from tureen.errors import InvalidRequestError
from tureen.server import health as health_routes
from tureen.server import openapi
from tureen.server.openapi import GENERATION_ERRORS, error_responses
from tureen.server.errors import APIError, install_error_handlers, model_not_found, to_api_error
from tureen.server.lifecycle import Phase, ServerState
from tureen.server.metrics import ServerMetrics
from tureen.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from tureen.server.serving import off_loop, require_engine
from tureen.server.serving_chat import create_chat_completion, render_chat
from tureen.server.serving_completion import create_completion
from tureen.server.stats_log import log_stats_forever

logger = logging.getLogger("tureen.server")

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
TOKENIZER_ERRORS = (400, 401, 404, 408, 413, 503)
M = TypeVar("M", bound=BaseModel)


class APIKeyMiddleware:
    """Pure ASGI check of ``Authorization: Bearer KEY`` (runs before the body is even read)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIXES):
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.api_key):
                message = "Missing API key." if not given else "Incorrect API key provided."
                err = APIError(401, message, param=None, code="invalid_api_key")
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 in the OpenAI error shape for bodies over --max-request-body-bytes.

    A declared Content-Length over the limit is refused before reading; a chunked body is counted
    as it arrives and refused when it crosses the limit. (Starlette's own limiter answers in plain
    text, which OpenAI clients cannot parse.)
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._too_large().response()(scope, receive, send)
            return
        seen = 0

        async def counted_receive() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise self._too_large()
            return message
        await self.app(scope, counted_receive, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than the server's limit of {self.limit} bytes "
                             "(--max-request-body-bytes).", code="request_too_large")


class InternalErrorMiddleware:
    """A bug still answers the OpenAI error JSON, and the keep-alive connection survives it.

    Starlette's own last-resort handler re-raises after answering, and uvicorn then drops the
    connection without ``Connection: close``, so a client's next request on it fails. Here the
    exception is logged once and the 500 is a normal response.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, receive, tracked_send)
        except ClientDisconnect:  # the client left (or was timed out) before its body arrived: no one to answer
            return
        except Exception as exc:  # noqa: BLE001 - the point of this middleware
            if started:  # too late for a status: let uvicorn close the connection
                raise
            await to_api_error(exc).response()(scope, receive, send)


async def parse_body(raw: Request, model: type[M]) -> M:
    """Validate the body ourselves: any content type, JSON errors and bad values become 400."""
    body = await raw.body()
    try:
        return model.model_validate_json(body or b"null")
    except ValidationError as exc:
        raise _invalid_body(exc.errors(include_url=False)) from None


def _invalid_body(errors: list) -> APIError:
    if errors and errors[0]["type"] == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {errors[0]['msg']}", code="invalid_json")
    if errors and errors[0]["type"] == "model_type" and not _loc(errors[0]["loc"]):  # the body itself
        return APIError(400, "The request body must be a JSON object.", code="invalid_json")
    errors = _most_specific(errors)
    parts = [f"{_loc(e['loc']) or 'body'}: {_message(e)}" for e in errors[:5]]
    return APIError(400, "Invalid request: " + "; ".join(parts), param=_loc(errors[0]["loc"]) if errors else None)


def _most_specific(errors: list) -> list:
    """Of a union's failed alternatives, keep the ones that got deepest into the value.

    ``content: [{"type": "text"}]`` fails both ``str`` (at ``content``) and ``list[TextPart]`` (at
    ``content.0``); the second is the one that says what is wrong.
    """
    locs = [tuple(p for p in e["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p))) for e in errors]
    deeper = [any(len(other) > len(loc) and other[:len(loc)] == loc for other in locs) for loc in locs]
    kept = [e for e, shadowed in zip(errors, deeper) if not shadowed]
    return kept or errors


def _message(error: dict) -> str:
    """pydantic's message, but in JSON's words where pydantic names Python classes."""
    if error["type"] == "model_type":
        return f"must be a JSON object, got {_json_type(error.get('input'))}"
    if error["type"] == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    return error["msg"]


def _json_type(value: Any) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)


_UNION_TAG = re.compile(r"^(str|int|float|bool|dict|list|[a-z_-]+\[.*\])$")


def _loc(loc: tuple) -> str | None:
    """A field path like ``messages.0.role``, without pydantic's union-member tags (``list[int]``)."""
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and _UNION_TAG.match(p))) or None


def build_app(state: ServerState, engine_factory: Callable[[], Any],
              on_fatal: Callable[[BaseException], None] = lambda exc: None) -> FastAPI:
    """``engine_factory`` builds the engine (blocking); it runs in a thread after the port is open."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(_load_engine(state, engine_factory, on_fatal))
        stats = asyncio.create_task(log_stats_forever(state))
        try:
            yield
        finally:
            stats.cancel()
            loader.cancel()
            state.phase = Phase.STOPPED
            if state.engine is not None:
                await asyncio.to_thread(state.engine.shutdown)

    app = FastAPI(title="tureen", version=tureen.__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=int(state.config.max_request_body_bytes))
    if state.config.api_key:  # added after the body limit, so it runs first: no key, no body read
        app.add_middleware(APIKeyMiddleware, api_key=state.config.api_key)
    app.add_middleware(InternalErrorMiddleware)  # outermost of ours: it also covers the two above
    _add_generation_routes(app, state)
    _add_info_routes(app, state)
    openapi.document(app, {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
                           "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest})
    return app


def _ok(model: type[BaseModel], stream: bool = False) -> dict[int | str, dict[str, Any]]:
    """A 200 with ``model`` as its JSON body (or, with ``stream`` true, server-sent events of chunks)."""
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    if stream:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    return {200: {"model": model, "description": "Success.", "content": content}}


async def _load_engine(state: ServerState, factory: Callable[[], Any],
                       on_fatal: Callable[[BaseException], None]) -> None:
    start = time.monotonic()
    try:
        engine = await asyncio.to_thread(factory)
    except Exception as exc:
        logger.error("could not start the engine: %s", exc, exc_info=not _is_expected(exc))
        on_fatal(exc)
        return
    if state.phase is not Phase.STARTING:  # a shutdown began while loading
        await asyncio.to_thread(engine.shutdown)
        return
    cfg = engine.config.cache
    stats = engine.stats()
    cache_info = {"model_name": engine.model_name, "block_size": str(stats.block_size or cfg.block_size),
                  "num_gpu_blocks": str(stats.num_blocks), "enable_prefix_caching": str(cfg.enable_prefix_caching)}
    state.set_ready(engine, ServerMetrics(engine.model_name, engine.max_model_len, state.stats, cache_info))
    # The model, torch and the tokenizer are a few million long-lived objects. Freezing them keeps
    # full garbage collections (which stop every thread, the HTTP loop included) short under load.
    gc.collect()
    gc.freeze()
    demo = " -- the built-in DEMO model: RANDOM weights, meaningless text" if engine.is_demo_model else ""
    logger.info("ready in %.1f s: serving %r (max_model_len=%d)%s", time.monotonic() - start, engine.model_name,
                engine.max_model_len, demo)


def _is_expected(exc: BaseException) -> bool:
    from tureen.errors import TureenError

    return isinstance(exc, TureenError)


def _add_generation_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions", responses=_ok(CompletionResponse, stream=True) | error_responses(GENERATION_ERRORS))
    async def completions(raw: Request) -> Response:
        return await create_completion(state, await parse_body(raw, CompletionRequest), raw)

    @app.post("/v1/chat/completions",
              responses=_ok(ChatCompletionResponse, stream=True) | error_responses(GENERATION_ERRORS))
    async def chat_completions(raw: Request) -> Response:
        return await create_chat_completion(state, await parse_body(raw, ChatCompletionRequest), raw)

    @app.post("/tokenize", responses=_ok(TokenizeResponse) | error_responses(TOKENIZER_ERRORS))
    async def tokenize(raw: Request) -> Response:
        req = await parse_body(raw, TokenizeRequest)
        size = len(req.prompt) if req.prompt is not None else len(await raw.body())
        return JSONResponse((await off_loop(size, _tokenize, state, req)).model_dump())

    @app.post("/detokenize", responses=_ok(DetokenizeResponse) | error_responses(TOKENIZER_ERRORS))
    async def detokenize(raw: Request) -> Response:
        req = await parse_body(raw, DetokenizeRequest)
        require_engine(state)
        _check_model_name(state, req.model)
        tokenizer = state.engine.tokenizer
        bad = [t for t in req.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})",
                                      param="tokens")
        return JSONResponse(DetokenizeResponse(prompt=tokenizer.decode(req.tokens)).model_dump())


def _check_model_name(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.engine.model_name:
        raise model_not_found(name, state.engine.model_name)


def _tokenize(state: ServerState, req: TokenizeRequest) -> TokenizeResponse:
    require_engine(state)
    _check_model_name(state, req.model)
    engine = state.engine
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequestError("send exactly one of 'prompt' or 'messages'", param="prompt")
    if req.prompt is not None:
        add_special = True if req.add_special_tokens is None else req.add_special_tokens
        ids = engine.tokenizer.encode(req.prompt, add_special_tokens=add_special)
    else:
        chat = ChatCompletionRequest(messages=req.messages, add_generation_prompt=req.add_generation_prompt,
                                     add_special_tokens=bool(req.add_special_tokens))
        ids = render_chat(state, chat).token_ids
    strs = [engine.tokenizer.id_to_token(t) or "" for t in ids] if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs)


def _model_card(state: ServerState) -> ModelCard:
    engine = state.engine
    return ModelCard(id=engine.model_name, root=str(engine.config.model.model or engine.model_name),
                     max_model_len=engine.max_model_len)


def _add_info_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/v1/models", responses=_ok(ModelList) | error_responses((401, 503)))
    async def models() -> Response:
        require_engine(state)
        return JSONResponse(ModelList(data=[_model_card(state)]).model_dump())

    @app.get("/v1/models/{model_id:path}", responses=_ok(ModelCard) | error_responses((401, 404, 503)))
    async def model(model_id: str) -> Response:
        """OpenAI's models.retrieve; ids may hold slashes (``org/name``)."""
        require_engine(state)
        _check_model_name(state, model_id)
        return JSONResponse(_model_card(state).model_dump())

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": tureen.__version__})

    @app.get("/health", responses={200: {"description": "Ready: the engine runs."},
                                   503: {"description": "Not ready: starting, draining, stalled or dead."}})
    async def health(deep: bool = False) -> Response:
        if deep:
            return await health_routes.deep_health(state)
        return health_routes.health(state)

    @app.get("/metrics", responses={200: {"description": "Prometheus text format.", "content": {CONTENT_TYPE_LATEST: {}}}})
    async def metrics() -> Response:
        body = state.metrics.render() if state.metrics is not None else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)
