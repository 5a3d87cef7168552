"""OpenAI tool calling against a real ``tureen serve`` (tiny random checkpoint, official client).

With tool_choice 'required' or a named function the output is grammar-constrained, so every
response carries well-formed calls whose arguments validate against the tool's schema, even from
random weights. 'auto' goes through the hermes parser.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import jsonschema
import openai
import pytest

from serve_process import ServerProcess
from structured_fixtures import build_json_checkpoint
from tureen.errors import InvalidRequestError
from tureen.server.protocol import ChatCompletionRequest
from tureen.server.serving_chat import render_chat
from tureen.server.tool_calling import check_tools

KEY = "sk-tools"
NAME = "json-llama"
# A Qwen-style (hermes) template: tools in the system turn, calls as <tool_call> JSON, tool results
# as user turns wrapped in <tool_response>.
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou can call these functions:\n{% for t in tools %}{{ t | tojson }}\n"
    "{% endfor %}Answer with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{%- elif m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "enum": ["paris", "tokyo", "oslo"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "units": {"enum": ["c", "f"]}}, "required": ["city", "days"]}
CONVERT = {"type": "object", "properties": {
    "amount": {"type": "number", "minimum": 0, "maximum": 1000},
    "to": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["amount", "to"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "convert", "parameters": CONVERT}}]
SCHEMAS = {"get_weather": WEATHER, "convert": CONVERT}
MESSAGES = [{"role": "user", "content": "weather in paris?"}]
N = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_json_checkpoint(tmp_path_factory.mktemp("json-llama"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "tools.jinja"
    template.write_text(TEMPLATE)
    s = ServerProcess(model_dir, tmp_path_factory.mktemp("serve") / "server.log", "--chat-template", str(template),
                      "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--max-model-len", "2048",
                      name=NAME, key=KEY)
    try:
        yield s.wait_healthy()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


def create(client, max_tokens: int = 1024, **kwargs):
    return client.chat.completions.create(model=NAME, messages=MESSAGES, tools=TOOLS, max_tokens=max_tokens,
                                          temperature=1.0, **kwargs)


def assert_valid_calls(calls, only: str | None = None) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in SCHEMAS and (only is None or call.function.name == only)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def collect_stream(stream) -> tuple[list[SimpleNamespace], str, str | None]:
    """Accumulate tool-call deltas the way OpenAI's SDK helpers do: by index, arguments appended."""
    calls: dict[int, SimpleNamespace] = {}
    content, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                if d.index not in calls:
                    calls[d.index] = SimpleNamespace(id=d.id, type=d.type, function=SimpleNamespace(name="", arguments=""))
                call = calls[d.index]
                call.id = d.id or call.id
                call.type = d.type or call.type
                call.function.name += (d.function.name or "") if d.function else ""
                call.function.arguments += (d.function.arguments or "") if d.function else ""
    return [calls[i] for i in sorted(calls)], content, finish


def test_required_tool_choice_always_returns_valid_calls(client):
    names = set()
    for seed in range(N):
        r = create(client, tool_choice="required", seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert_valid_calls(choice.message.tool_calls)
        names |= {c.function.name for c in choice.message.tool_calls}
    assert names == set(SCHEMAS)  # the grammar offers every tool, the model picks


def test_required_tool_choice_streamed(client):
    for seed in range(N // 2):
        calls, content, finish = collect_stream(create(client, tool_choice="required", seed=seed, stream=True))
        assert finish == "tool_calls" and content == ""
        assert_valid_calls(calls)


def test_required_without_parallel_calls_makes_exactly_one(client):
    for seed in range(N // 2):
        r = create(client, tool_choice="required", seed=seed, parallel_tool_calls=False)
        assert len(r.choices[0].message.tool_calls) == 1


@pytest.mark.parametrize("name", ["get_weather", "convert"])
def test_named_tool_choice_calls_that_function(client, name):
    named = {"type": "function", "function": {"name": name}}
    for seed in range(N // 2):
        r = create(client, tool_choice=named, seed=seed, n=2)
        for choice in r.choices:
            assert choice.finish_reason == "tool_calls"
            assert_valid_calls(choice.message.tool_calls, only=name)
        calls, content, finish = collect_stream(create(client, tool_choice=named, seed=seed, stream=True))
        assert finish == "tool_calls" and len(calls) == 1
        assert_valid_calls(calls, only=name)


def test_auto_with_a_random_model_answers_in_plain_content(client):
    for seed in range(4):
        r = create(client, tool_choice="auto", seed=seed, max_tokens=24)
        choice = r.choices[0]
        assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
        assert isinstance(choice.message.content, str)
        _, content, finish = collect_stream(create(client, seed=seed, max_tokens=24, stream=True))
        assert content == choice.message.content and finish == choice.finish_reason


def test_tools_reach_the_template_and_a_tool_conversation_renders(client):
    plain = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=1)
    with_tools = create(client, tool_choice="none", max_tokens=1)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 50
    convo = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "paris", "days": 2})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    # Seeded, with room to finish: unseeded sampling from random weights can wander past a short
    # limit inside the grammar and end on 'length' with no complete call.
    for seed in range(4):
        r = client.chat.completions.create(model=NAME, messages=convo, tools=TOOLS, tool_choice="required",
                                           max_tokens=1024, temperature=1.0, seed=seed)
        assert r.choices[0].finish_reason == "tool_calls"
        assert_valid_calls(r.choices[0].message.tool_calls)


def test_rendered_prompt_holds_the_tools_and_the_calls(model_dir):
    from tureen.tokenizer import Tokenizer

    state = SimpleNamespace(engine=SimpleNamespace(tokenizer=Tokenizer.from_pretrained(model_dir, chat_template=TEMPLATE)),
                            max_prompt_chars=1 << 30)  # the over-long-text bound is another test's subject
    req = ChatCompletionRequest(messages=MESSAGES + [
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                             "function": {"name": "convert", "arguments": '{"amount": 3}'}}]},
        {"role": "tool", "tool_call_id": "c", "content": "3 EUR"}], tools=TOOLS)
    text = render_chat(state, req).text
    assert '"name": "get_weather"' in text and '<tool_call>{"name": "convert", "arguments": {"amount": 3}}' in text
    assert "<tool_response>3 EUR</tool_response>" in text


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "integer", "multipleOf": 2}}}}}], "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
]


@pytest.mark.parametrize("body, param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_tool_requests_are_400_and_the_server_stays_healthy(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                   json={"model": NAME, "messages": MESSAGES, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"] or "").startswith(param), r.json()
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


def test_auto_needs_the_server_flags():
    req = ChatCompletionRequest(messages=MESSAGES, tools=TOOLS)
    with pytest.raises(InvalidRequestError, match="--enable-auto-tool-choice"):
        check_tools(req, None, False)
    check_tools(req, "hermes", True)
    check_tools(ChatCompletionRequest(messages=MESSAGES, tools=TOOLS, tool_choice="required"), None, False)
