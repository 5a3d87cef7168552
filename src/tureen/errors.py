"""Typed exceptions that cross module boundaries.

The HTTP layer maps each of these to one OpenAI error schema; nothing here imports torch.
"""

from __future__ import annotations


class TureenError(Exception):
    """Base class for every error tureen raises on purpose."""


class ConfigError(TureenError, ValueError):
    """An engine or tool option is invalid."""


class InvalidRequestError(TureenError, ValueError):
    """A request is malformed or asks for something impossible (HTTP 400).

    ``param`` names the offending field when there is one.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidSamplingParamsError(InvalidRequestError):
    """A sampling value is out of range."""


class PromptTooLongError(InvalidRequestError):
    """The prompt alone does not fit in ``max_model_len`` (or in the whole KV cache)."""

    def __init__(self, message: str, *, limit: int, value: int) -> None:
        super().__init__(message, param="prompt")
        self.limit = limit
        self.value = value


class KVCacheTooSmallError(PromptTooLongError):
    """The request fits ``max_model_len`` but needs more KV-cache blocks than the whole cache holds."""


class ContextLengthExceededError(InvalidRequestError):
    """Prompt tokens plus ``max_tokens`` exceed ``max_model_len``."""

    def __init__(self, message: str, *, limit: int, prompt_tokens: int, max_tokens: int) -> None:
        super().__init__(message, param="max_tokens")
        self.limit = limit
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens


class UnsupportedArchitectureError(TureenError):
    """The checkpoint's architecture has no model file in tureen."""


class ModelLoadError(TureenError):
    """A checkpoint could not be found or read."""


class EngineDeadError(TureenError):
    """The engine loop has stopped; no request can be served."""


class EngineStepError(TureenError):
    """The engine failed while running this request (a model step raised); other requests go on."""


class EngineOverloadedError(TureenError):
    """The engine refuses new work for now (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, reason: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after
