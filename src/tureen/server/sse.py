"""The per-token SSE path: chunk bytes built with orjson around a per-request prefix.

Every chunk of one streamed response shares its ``id``, ``object``, ``created`` and ``model``;
those are encoded once per request, and each token's chunk is one ``orjson.dumps`` of a small
choice dict. The bytes equal the pydantic models' compact JSON (protocol.py), field for field;
tests/test_sse.py checks that. Chunks with logprobs go through the pydantic models.
"""

from __future__ import annotations

import orjson

_END = b"]}\n\n"


def _prefix(request_id: str, kind: str, created: int, model: str) -> bytes:
    return (b'data: {"id":' + orjson.dumps(request_id) + b',"object":' + orjson.dumps(kind) + b',"created":'
            + str(int(created)).encode() + b',"model":' + orjson.dumps(model) + b',"choices":[')


class CompletionChunks:
    """``text_completion`` stream chunks without logprobs."""

    def __init__(self, request_id: str, created: int, model: str) -> None:
        self.prefix = _prefix(request_id, "text_completion", created, model)

    def choice(self, index: int, text: str, finish_reason: str | None, stop_reason: int | str | None) -> bytes:
        return self.prefix + orjson.dumps({"index": index, "text": text, "logprobs": None,
                                           "finish_reason": finish_reason, "stop_reason": stop_reason}) + _END


class ChatChunks:
    """``chat.completion.chunk`` stream chunks without logprobs."""

    def __init__(self, request_id: str, created: int, model: str) -> None:
        self.prefix = _prefix(request_id, "chat.completion.chunk", created, model)

    def choice(self, index: int, content: str | None, finish_reason: str | None,
               stop_reason: int | str | None, role: str | None = None) -> bytes:
        delta = {}
        if role is not None:
            delta["role"] = role
        if content is not None:
            delta["content"] = content
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        if stop_reason is not None:
            choice["stop_reason"] = stop_reason
        return self.prefix + orjson.dumps(choice) + _END
