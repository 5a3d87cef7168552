"""The orjson SSE fast path writes exactly the bytes the pydantic chunk models would."""

from __future__ import annotations

import pytest

from tureen.server.protocol import (ChatChunkChoice, ChatCompletionChunk, CompletionChoice, CompletionResponse,
                                    DeltaMessage)
from tureen.server.serving import sse
from tureen.server.sse import ChatChunks, CompletionChunks

CASES = [("hello", None, None), ("", "stop", "END"), ("café 東京 🙂 \"q\" \\ \n", "length", None),
         ("x", "stop", 7)]


@pytest.mark.parametrize("text,finish,stop", CASES)
def test_completion_chunk_bytes_equal_the_model(text, finish, stop):
    fast = CompletionChunks("cmpl-1", 1700000000, "m/ö").choice(3, text, finish, stop)
    slow = sse(CompletionResponse(id="cmpl-1", created=1700000000, model="m/ö", choices=[
        CompletionChoice(index=3, text=text, finish_reason=finish, stop_reason=stop)]))
    assert fast == slow


@pytest.mark.parametrize("text,finish,stop", CASES + [(None, "stop", None)])
@pytest.mark.parametrize("role", [None, "assistant"])
def test_chat_chunk_bytes_equal_the_model(text, finish, stop, role):
    fast = ChatChunks("chatcmpl-1", 1700000000, "m").choice(1, text, finish, stop, role=role)
    slow = sse(ChatCompletionChunk(id="chatcmpl-1", created=1700000000, model="m", choices=[
        ChatChunkChoice(index=1, delta=DeltaMessage(role=role, content=text), finish_reason=finish,
                        stop_reason=stop)]))
    assert fast == slow
