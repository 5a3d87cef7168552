"""Tool-call parsers for ``tool_choice="auto"``, chosen with ``--tool-call-parser`` (vLLM's names)."""

from __future__ import annotations

from tureen.server.tool_parsers.base import ExtractedToolCalls, ParsedCall, ToolCallStream, ToolParser
from tureen.server.tool_parsers.hermes import HermesToolParser
from tureen.server.tool_parsers.llama3_json import Llama3JsonToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesToolParser, Llama3JsonToolParser)}


def get_tool_parser(name: str) -> ToolParser:
    return TOOL_PARSERS[name]()


__all__ = ["TOOL_PARSERS", "ExtractedToolCalls", "ParsedCall", "ToolCallStream", "ToolParser", "get_tool_parser"]
