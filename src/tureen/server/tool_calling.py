"""Tool calling the OpenAI way: the request's tool_choice picks how a choice's text becomes a message.

- ``none``: plain content.
- a named function: the output is constrained to the function's parameter schema, and is its
  arguments.
- ``required``: the output is constrained to a JSON array of ``{"name", "parameters"}`` calls,
  one of the given tools each, so the calls always parse.
- ``auto``: the model writes freely; ``--tool-call-parser`` finds the calls in its text.

Each way is a small ``ToolCallFormat``: it shapes a finished text into (content, tool calls), and
makes a per-choice stream object that turns text deltas into OpenAI delta messages.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from tureen.errors import InvalidRequestError
from tureen.sampling_params import StructuredOutputsParams
from tureen.server.protocol import (ChatCompletionRequest, DeltaFunctionCall, DeltaMessage, DeltaToolCall,
                                    FunctionCall, NamedToolChoice, ToolCall)
from tureen.server.tool_parsers import ParsedCall, ToolCallStream, ToolParser, get_tool_parser
from tureen.server.tool_parsers.base import new_call_id

_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolCallFormat(Protocol):
    def shape(self, text: str) -> tuple[str | None, list[ToolCall]]: ...

    def stream(self) -> "ChoiceStream": ...


class ChoiceStream(Protocol):
    def feed(self, text: str) -> DeltaMessage | None: ...

    def finish(self) -> tuple[DeltaMessage | None, bool]:
        """The last delta, and whether the choice called tools (finish_reason 'tool_calls')."""
        ...


def to_tool_calls(calls: list[ParsedCall]) -> list[ToolCall]:
    return [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def tool_call_deltas(calls: list[ParsedCall], first_index: int) -> list[DeltaToolCall]:
    return [DeltaToolCall(index=first_index + i, id=c.id, type="function",
                          function=DeltaFunctionCall(name=c.name, arguments=c.arguments)) for i, c in enumerate(calls)]


# ---- the four formats ------------------------------------------------------------------------

class PlainContent:
    def shape(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return text, []

    def stream(self) -> ChoiceStream:
        return _PlainStream()


class _PlainStream:
    def feed(self, text: str) -> DeltaMessage | None:
        return DeltaMessage(content=text) if text else None

    def finish(self) -> tuple[DeltaMessage | None, bool]:
        return None, False


class NamedFunctionCall:
    """The whole output is the named function's arguments; they stream as argument deltas."""

    def __init__(self, name: str) -> None:
        self.name = name

    def shape(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return None, [ToolCall(id=new_call_id(), function=FunctionCall(name=self.name, arguments=text))]

    def stream(self) -> ChoiceStream:
        return _NamedStream(self.name)


class _NamedStream:
    def __init__(self, name: str) -> None:
        self.name, self.started = name, False

    def feed(self, text: str) -> DeltaMessage | None:
        if self.started and not text:
            return None
        if not self.started:
            self.started = True
            return DeltaMessage(tool_calls=[DeltaToolCall(index=0, id=new_call_id(), type="function",
                                                          function=DeltaFunctionCall(name=self.name, arguments=text))])
        return DeltaMessage(tool_calls=[DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))])

    def finish(self) -> tuple[DeltaMessage | None, bool]:
        return self.feed("") if not self.started else None, True


class RequiredCalls:
    """The output is a JSON array of {"name", "parameters"} objects (the grammar guarantees it)."""

    def shape(self, text: str) -> tuple[str | None, list[ToolCall]]:
        calls = parse_required(text)
        return (text, []) if calls is None else (None, to_tool_calls(calls))

    def stream(self) -> ChoiceStream:
        return _BufferedStream(self)


class _BufferedStream:
    """Holds the text back and sends the calls when the output ends (a truncated array is content)."""

    def __init__(self, fmt: RequiredCalls) -> None:
        self.fmt, self.text = fmt, ""

    def feed(self, text: str) -> DeltaMessage | None:
        self.text += text
        return None

    def finish(self) -> tuple[DeltaMessage | None, bool]:
        calls = parse_required(self.text)
        if calls is None:
            return (DeltaMessage(content=self.text) if self.text else None), False
        return DeltaMessage(tool_calls=tool_call_deltas(calls, 0)), True


class ParsedCalls:
    """tool_choice 'auto': the --tool-call-parser reads the calls out of free text."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser

    def shape(self, text: str) -> tuple[str | None, list[ToolCall]]:
        found = self.parser.extract_tool_calls(text)
        return (found.content, to_tool_calls(found.tool_calls)) if found.tools_called else (text, [])

    def stream(self) -> ChoiceStream:
        return _ParsedStream(ToolCallStream(self.parser))


class _ParsedStream:
    def __init__(self, stream: ToolCallStream) -> None:
        self.s, self.num_calls = stream, 0

    def _delta(self, content: str, calls: list[ParsedCall]) -> DeltaMessage | None:
        if not content and not calls:
            return None
        deltas = tool_call_deltas(calls, self.num_calls) if calls else None
        self.num_calls += len(calls)
        return DeltaMessage(content=content or None, tool_calls=deltas)

    def feed(self, text: str) -> DeltaMessage | None:
        return self._delta(*self.s.feed(text))

    def finish(self) -> tuple[DeltaMessage | None, bool]:
        content, calls, called = self.s.finish()
        return self._delta(content, calls), called


def parse_required(text: str) -> list[ParsedCall] | None:
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(items, list) or not items:
        return None
    calls = [ParsedCall(i["name"], json.dumps(i.get("parameters", {}), ensure_ascii=False))
             for i in items if isinstance(i, dict) and isinstance(i.get("name"), str)]
    return calls if len(calls) == len(items) else None


# ---- choosing a format and its constraint ----------------------------------------------------

def check_tools(req: ChatCompletionRequest, tool_call_parser: str | None, enable_auto_tool_choice: bool) -> None:
    """400 for tool requests that cannot be served as asked."""
    from jsonschema import Draft202012Validator, SchemaError

    choice = req.effective_tool_choice
    if not req.tools:
        if choice != "none":
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return
    for i, tool in enumerate(req.tools):
        try:
            Draft202012Validator.check_schema(tool.function.parameters or _EMPTY_PARAMETERS)
        except SchemaError as exc:
            raise InvalidRequestError(f"tools[{i}].function.parameters ({tool.function.name}) is not a valid JSON "
                                      f"schema: {exc.message}", param=f"tools.{i}.function.parameters") from None
    if isinstance(choice, NamedToolChoice) and _find(req, choice.function.name) is None:
        raise InvalidRequestError(f"tool_choice names {choice.function.name!r}, which is not among the tools",
                                  param="tool_choice")
    if choice == "auto" and not (enable_auto_tool_choice and tool_call_parser):
        raise InvalidRequestError('"auto" tool choice requires the server to run with --enable-auto-tool-choice '
                                  "and --tool-call-parser", param="tool_choice")
    if choice not in ("none", "auto") and req.structured_outputs_params() is not None:
        raise InvalidRequestError("a required or named tool_choice cannot be combined with another output "
                                  "constraint (response_format, structured_outputs)", param="tool_choice")


def tool_call_format(req: ChatCompletionRequest, tool_call_parser: str | None) -> ToolCallFormat:
    choice = req.effective_tool_choice
    if not req.tools or choice == "none":
        return PlainContent()
    if isinstance(choice, NamedToolChoice):
        return NamedFunctionCall(choice.function.name)
    if choice == "required":
        return RequiredCalls()
    assert tool_call_parser is not None
    return ParsedCalls(get_tool_parser(tool_call_parser))


def tool_choice_constraint(req: ChatCompletionRequest) -> StructuredOutputsParams | None:
    """The grammar for required and named tool choices; None for the others."""
    choice = req.effective_tool_choice
    if not req.tools or choice in ("none", "auto"):
        return None
    if isinstance(choice, NamedToolChoice):
        tool = _find(req, choice.function.name)
        assert tool is not None
        return StructuredOutputsParams(json=tool.function.parameters or _EMPTY_PARAMETERS)
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                               "parameters": t.function.parameters or _EMPTY_PARAMETERS},
              "required": ["name", "parameters"]} for t in req.tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not req.parallel_tool_calls:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema)


def _find(req: ChatCompletionRequest, name: str):
    return next((t for t in req.tools or [] if t.function.name == name), None)
