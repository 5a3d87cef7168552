"""What every tool-call parser provides, and the streaming driver they share.

A parser reads a model's raw output for the calls a chat template taught it to write. Output it
cannot parse (a malformed call) comes back as plain content: a parser never raises on model text.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=new_call_id)


@dataclass
class ExtractedToolCalls:
    tools_called: bool
    tool_calls: list[ParsedCall]
    content: str | None  # text outside the calls (None when there is none)


def parse_call(obj: Any, argument_keys: tuple[str, ...] = ("arguments", "parameters")) -> ParsedCall | None:
    """{"name": ..., "arguments" | "parameters": {...}} -> ParsedCall; None when it is not that shape."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in argument_keys if k in obj), {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolParser(ABC):
    name: str

    @abstractmethod
    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        """Parse a finished output."""

    @abstractmethod
    def region_start(self, text: str) -> int | None:
        """Where the tool-call part of a partial output begins, or None while none has begun."""

    def held_back(self, text: str) -> int:
        """How many trailing characters might begin a tool-call marker (not streamed as content yet)."""
        return 0

    def complete_calls(self, region: str) -> tuple[list[ParsedCall], int]:
        """The calls already complete at the start of a partial tool-call region (sent before the
        output ends), and how many characters of the region they span."""
        return [], 0


class ToolCallStream:
    """Splits one choice's streamed text into content deltas and whole tool calls.

    Content before the tool-call region streams as it comes (minus a possible partial marker);
    calls are sent as soon as the parser sees them complete, and the rest when the output ends.
    If the output ends without a parseable call, the held-back text is sent as content. A call
    once sent stays sent: when the text after it turns out malformed, that text ends as content.
    """

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.sent = 0  # characters of text sent as content
        self.start: int | None = None
        self.calls_sent = 0
        self.consumed = 0  # characters of the tool-call region the sent calls span

    def feed(self, delta: str) -> tuple[str, list[ParsedCall]]:
        self.text += delta
        if self.start is None:
            self.start = self.parser.region_start(self.text)
            if self.start is None:
                return self._content_until(len(self.text) - self.parser.held_back(self.text)), []
        content = self._content_until(self.start)
        complete, consumed = self.parser.complete_calls(self.text[self.start:])
        calls = complete[self.calls_sent:]
        self.calls_sent, self.consumed = len(complete), max(self.consumed, consumed)
        return content, calls

    def finish(self) -> tuple[str, list[ParsedCall], bool]:
        """(remaining content, remaining calls, whether the output called tools)."""
        final = self.parser.extract_tool_calls(self.text)
        if final.tools_called:
            return "", final.tool_calls[self.calls_sent:], True
        if self.calls_sent:
            assert self.start is not None
            return self.text[self.start + self.consumed:].strip(), [], True
        return self._content_until(len(self.text)), [], False

    def _content_until(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece
