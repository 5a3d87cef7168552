"""Every error the server answers, in one OpenAI error schema.

Typed exceptions from the engine (``tureen.errors``) and the HTTP layer become an ``APIError``,
which renders as ``{"error": {"message", "type", "param", "code"}}`` with its status (and
``Retry-After`` for 503). Bad input is a 4xx; only a bug in tureen is a 500.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tureen.errors import (
    ConfigError,
    ContextLengthExceededError,
    EngineDeadError,
    EngineOverloadedError,
    EngineStepError,
    InvalidRequestError,
    KVCacheTooSmallError,
    PromptTooLongError,
)
from tureen.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("tureen.server")

INVALID_REQUEST = "invalid_request_error"
UNAVAILABLE = "service_unavailable_error"


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST, *, param: str | None = None,
                 code: str | None = None, retry_after: float | None = None,
                 extra_headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.retry_after = param, code, retry_after
        self.extra_headers = dict(extra_headers or {})

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def headers(self) -> dict[str, str]:
        headers = dict(self.extra_headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))  # integer seconds (RFC 9110)
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())

    def sse_payload(self) -> str:
        return json.dumps(self.body())


def model_not_found(name: str, served: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist; this server serves '{served}'.",
                    param="model", code="model_not_found")


def request_timeout(seconds: float) -> APIError:
    return APIError(504, f"The request ran longer than the server's --request-timeout of {seconds:g} s and was "
                         "aborted.", "timeout_error", code="request_timeout")


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception to the error the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthExceededError):
        return APIError(400, _context_message(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, KVCacheTooSmallError):
        return APIError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, PromptTooLongError):
        return APIError(400, _prompt_message(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, (InvalidRequestError, ConfigError)):
        return APIError(400, str(exc), param=getattr(exc, "param", None))
    if isinstance(exc, EngineOverloadedError):
        return APIError(503, str(exc), UNAVAILABLE, code=exc.reason, retry_after=exc.retry_after)
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), UNAVAILABLE, code="engine_dead", retry_after=30)
    if isinstance(exc, EngineStepError):  # the engine failed this request; the server and others go on
        return APIError(500, str(exc), "internal_server_error", code="engine_error")
    logger.error("internal error", exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}", "internal_server_error")


def _context_message(exc: ContextLengthExceededError) -> str:
    total = exc.prompt_tokens + exc.max_tokens
    return (f"This model's maximum context length is {exc.limit} tokens, but the request needs {total} tokens: "
            f"{exc.prompt_tokens} in the prompt plus {exc.max_tokens} for the completion (max_tokens). Shorten "
            f"the prompt or lower max_tokens.")


def _prompt_message(exc: PromptTooLongError) -> str:
    return (f"This model's maximum context length is {exc.limit} tokens, but the prompt alone has {exc.value} "
            f"tokens, which leaves no room for the completion (the prompt plus at least one generated token must "
            f"fit). Shorten the prompt.")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(),
                        code="invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
             for e in errors[:5]]
    return APIError(400, "Invalid request: " + "; ".join(parts), param=param)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        message = str(exc.detail)
        if exc.status_code == 413:
            message = "The request body is larger than the server's --max-request-body-bytes limit."
        if exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
        # Starlette puts the route's methods in ``Allow`` on a 405 (RFC 9110 requires it): keep them.
        return APIError(exc.status_code, message, code=code, extra_headers=exc.headers).response()

    for kind in (APIError, InvalidRequestError, ConfigError, EngineOverloadedError, EngineDeadError):
        app.add_exception_handler(kind, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_api_error)
