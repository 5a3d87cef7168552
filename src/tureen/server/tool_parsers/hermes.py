"""Hermes-style tool calls, as Qwen2.5 / Qwen3 and NousResearch Hermes templates ask for them::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""

from __future__ import annotations

import json
import re

from tureen.server.tool_parsers.base import ExtractedToolCalls, ParsedCall, ToolParser, parse_call

START, END = "<tool_call>", "</tool_call>"
_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_CLOSED = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


class HermesToolParser(ToolParser):
    name = "hermes"

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        start = text.find(START)
        if start < 0:
            return ExtractedToolCalls(False, [], text)
        calls = [_parse(body) for body in _CALL.findall(text[start:])]
        if not calls or any(c is None for c in calls):  # one malformed call: hand back the text untouched
            return ExtractedToolCalls(False, [], text)
        content = text[:start].strip() or None
        return ExtractedToolCalls(True, [c for c in calls if c is not None], content)

    def region_start(self, text: str) -> int | None:
        start = text.find(START)
        return None if start < 0 else start

    def held_back(self, text: str) -> int:
        return next((k for k in range(min(len(START) - 1, len(text)), 0, -1) if START.startswith(text[-k:])), 0)

    def complete_calls(self, region: str) -> tuple[list[ParsedCall], int]:
        calls, end = [], 0
        for match in _CLOSED.finditer(region):
            call = _parse(match.group(1))
            if call is None:
                break
            calls.append(call)
            end = match.end()
        return calls, end


def _parse(body: str) -> ParsedCall | None:
    try:
        return parse_call(json.loads(body.strip()))
    except json.JSONDecodeError:
        return None
