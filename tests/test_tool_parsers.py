"""The hermes and llama3_json tool-call parsers on hand-written model outputs, whole and streamed.

Malformed calls must come back as plain content, never raise, and a streamed output must come
back as the same content and calls as the whole one.
"""

from __future__ import annotations

import json

import pytest

from tureen.server.tool_parsers import ToolCallStream, get_tool_parser

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}'

HERMES_CASES = [
    # (model output, expected calls [(name, arguments)], expected content)
    (f"<tool_call>\n{WEATHER}\n</tool_call>", [("get_weather", {"city": "Paris", "days": 3})], None),
    (f"Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>", [("get_weather", {"city": "Paris", "days": 3})],
     "Let me check."),
    (f'<tool_call>{WEATHER}</tool_call>\n<tool_call>{{"name": "now", "arguments": {{}}}}</tool_call>',
     [("get_weather", {"city": "Paris", "days": 3}), ("now", {})], None),
    ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', [("f", {"x": 1})], None),  # string args
    (f"<tool_call>\n{WEATHER}", [("get_weather", {"city": "Paris", "days": 3})], None),  # stopped before the tag
    ("no tools here, just 42 words", [], "no tools here, just 42 words"),
    ('<tool_call>{"name": "f", "arguments": {"x": </tool_call>', [], '<tool_call>{"name": "f", "arguments": {"x": </tool_call>'),
    ('<tool_call>{"arguments": {}}</tool_call>', [], '<tool_call>{"arguments": {}}</tool_call>'),  # no name
    ('<tool_call>[1, 2]</tool_call>', [], '<tool_call>[1, 2]</tool_call>'),
    ("<tool_call>", [], "<tool_call>"),
]
HERMES_WHOLE_ONLY = [  # streamed, the good first call goes out before the bad one shows
    (f'<tool_call>{WEATHER}</tool_call><tool_call>{{oops</tool_call>', [],  # one bad call spoils the lot
     f'<tool_call>{WEATHER}</tool_call><tool_call>{{oops</tool_call>'),
]

LLAMA_CASES = [
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', [("get_weather", {"city": "Oslo"})], None),
    ('  <|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"k": [1]}}',
     [("a", {}), ("b", {"k": [1]})], None),
    ("The weather is fine.", [], "The weather is fine."),
    ('{"name": "a", "parameters": {"x": ', [], '{"name": "a", "parameters": {"x": '),
    ('{"city": "Oslo"}', [], '{"city": "Oslo"}'),  # JSON, but not a call
    ('{"name": "a", "parameters": 5}', [], '{"name": "a", "parameters": 5}'),
    ('{"name": "a", "parameters": {}} trailing words', [], '{"name": "a", "parameters": {}} trailing words'),
]


def calls_of(tool_calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in tool_calls]


@pytest.mark.parametrize("parser, text, calls, content",
                         [("hermes", *c) for c in HERMES_CASES + HERMES_WHOLE_ONLY]
                         + [("llama3_json", *c) for c in LLAMA_CASES])
def test_whole_output(parser, text, calls, content):
    found = get_tool_parser(parser).extract_tool_calls(text)
    assert found.tools_called == bool(calls)
    assert calls_of(found.tool_calls) == calls
    assert found.content == content
    assert len({c.id for c in found.tool_calls}) == len(calls)


@pytest.mark.parametrize("step", [1, 3, 7])
@pytest.mark.parametrize("parser, text, calls, content",
                         [("hermes", *c) for c in HERMES_CASES] + [("llama3_json", *c) for c in LLAMA_CASES])
def test_streamed_output_matches_the_whole(parser, text, calls, content, step):
    stream = ToolCallStream(get_tool_parser(parser))
    streamed, got = "", []
    for i in range(0, len(text), step):
        piece, new_calls = stream.feed(text[i:i + step])
        streamed += piece
        got += new_calls
        if calls:
            assert "<tool_call>" not in streamed and "{" not in streamed  # never leak call text as content
    piece, rest, called = stream.finish()
    streamed += piece
    got += rest
    assert called == bool(calls) and calls_of(got) == calls
    assert (streamed.strip() or None) == (content.strip() if content else None)
    if not calls:
        assert streamed == text  # nothing parsed: every character comes back, in order


def test_a_streamed_call_stays_sent_and_a_malformed_tail_becomes_content():
    stream = ToolCallStream(get_tool_parser("hermes"))
    content, calls = stream.feed(f"<tool_call>{WEATHER}</tool_call><tool_call>{{oops")
    assert content == "" and calls_of(calls) == [("get_weather", {"city": "Paris", "days": 3})]
    piece, rest, called = stream.finish()
    assert called and rest == [] and piece == "<tool_call>{oops"


def test_hermes_streams_a_closed_call_before_the_output_ends():
    stream = ToolCallStream(get_tool_parser("hermes"))
    content, calls = stream.feed(f"Sure. <tool_call>{WEATHER}</tool_call>\n<tool_call>")
    assert content == "Sure. " and calls_of(calls) == [("get_weather", {"city": "Paris", "days": 3})]
    assert stream.feed('{"name": "now", "arguments": {}}') == ("", [])
    _, rest, called = stream.finish()
    assert called and calls_of(rest) == [("now", {})]


def test_plain_text_streams_at_once():
    for parser in ("hermes", "llama3_json"):
        stream = ToolCallStream(get_tool_parser(parser))
        assert stream.feed("Hello") == ("Hello", [])
        assert stream.feed(" <tool") == (" ", []) if parser == "hermes" else (" <tool", [])
