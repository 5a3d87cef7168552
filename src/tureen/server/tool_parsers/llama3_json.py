"""Llama 3.1 / 3.2 JSON tool calls: the whole output is one or more JSON objects, optionally after
``<|python_tag|>`` and separated by ``;``::

    {"name": "get_weather", "parameters": {"city": "Paris"}}
"""

from __future__ import annotations

import json

from tureen.server.tool_parsers.base import ExtractedToolCalls, ParsedCall, ToolParser, parse_call

BOT = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        start = self.region_start(text)
        if start is None:
            return ExtractedToolCalls(False, [], text)
        calls = _parse_all(text[start:].removeprefix(BOT))
        if not calls:
            return ExtractedToolCalls(False, [], text)
        return ExtractedToolCalls(True, calls, None)

    def region_start(self, text: str) -> int | None:
        stripped = text.lstrip()
        if stripped.startswith((BOT, "{")):
            return len(text) - len(stripped)
        return None

    def held_back(self, text: str) -> int:
        stripped = text.lstrip()
        return len(text) if BOT.startswith(stripped) else 0  # blank so far, or a partial <|python_tag|>


def _parse_all(text: str) -> list[ParsedCall]:
    """Every call in ``{...}; {...}``; an empty list when anything in it is not a well-formed call."""
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
        if pos == len(text):
            return calls
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return []
        call = parse_call(obj)
        if call is None:
            return []
        calls.append(call)
