"""Structured outputs over HTTP: a real ``tureen serve`` on a tiny random checkpoint, the official
openai client, every request shape, streaming, n = 2, and bad input answered with 400."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from serve_process import ServerProcess
from structured_fixtures import build_json_checkpoint

KEY = "sk-structured"
NAME = "json-llama"
MESSAGES = [{"role": "user", "content": "give me a record"}]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["tokyo", "paris", "oslo"]},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,5}$"}, "maxItems": 2},
        "ok": {"type": "boolean"},
    },
    "required": ["city", "score", "ok"],
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA, "strict": True}}
N = 24


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = build_json_checkpoint(tmp_path_factory.mktemp("json-llama"))
    s = ServerProcess(model, tmp_path_factory.mktemp("serve") / "server.log", "--max-num-seqs", "64",
                      name=NAME, key=KEY)
    try:
        yield s.wait_healthy()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


def chat(client, n: int = 1, **kwargs):
    return client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=256, temperature=1.0, n=n,
                                          **kwargs)


def streamed_texts(stream) -> dict[int, str]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert set(finish.values()) == {"stop"}, finish
    return texts


def test_response_format_json_schema_validates(client):
    for seed in range(N):
        r = chat(client, seed=seed, response_format=RESPONSE_FORMAT)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_response_format_json_schema_streamed_with_n2(client):
    for seed in range(N // 2):
        texts = streamed_texts(chat(client, n=2, seed=seed, stream=True, response_format=RESPONSE_FORMAT))
        assert set(texts) == {0, 1}
        for text in texts.values():
            jsonschema.validate(json.loads(text), SCHEMA)


def test_response_format_json_object_parses(client):
    stopped = 0
    for seed in range(N):
        r = chat(client, seed=seed, response_format={"type": "json_object"})
        if r.choices[0].finish_reason == "stop":
            stopped += 1
            assert isinstance(json.loads(r.choices[0].message.content), dict)
    assert stopped >= 0.75 * N


@pytest.mark.parametrize("body, check", [
    ({"structured_outputs": {"regex": r"[a-z]{2,5}@[a-z]{2,4}\.(com|org)"}},
     lambda t: re.fullmatch(r"[a-z]{2,5}@[a-z]{2,4}\.(com|org)", t)),
    ({"structured_outputs": {"choice": ["positive", "negative", "neutral"]}},
     lambda t: t in ("positive", "negative", "neutral")),
    ({"structured_outputs": {"grammar": 'root ::= "(" [0-9]{1,3} ("," [0-9]{1,3})* ")"'}},
     lambda t: re.fullmatch(r"\([0-9]{1,3}(,[0-9]{1,3})*\)", t)),
    ({"structured_outputs": {"json": SCHEMA}}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
], ids=["regex", "choice", "ebnf", "json", "guided_choice"])
def test_vllm_structured_outputs_on_both_endpoints(client, body, check):
    for seed in range(8):
        r = chat(client, seed=seed, extra_body=body)
        assert r.choices[0].finish_reason == "stop" and check(r.choices[0].message.content), \
            r.choices[0].message.content
        c = client.completions.create(model=NAME, prompt="value:", max_tokens=256, seed=seed, extra_body=body)
        assert c.choices[0].finish_reason == "stop" and check(c.choices[0].text), c.choices[0].text


def test_completion_stream_concatenates_to_a_match(client):
    body = {"structured_outputs": {"regex": r"(red|blue)-[0-9]{3}"}}
    for seed in range(8):
        stream = client.completions.create(model=NAME, prompt="x", max_tokens=64, seed=seed, stream=True,
                                           extra_body=body)
        text = "".join(c.choices[0].text for c in stream)
        assert re.fullmatch(r"(red|blue)-[0-9]{3}", text), text


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", "not a valid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array",
                                                                                       "uniqueItems": True}}}},
     "response_format", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "xml"}}, "response_format", "type"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs", "undefined_rule"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "choice"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs", "not valid JSON"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "response_format", "only one"),
]


@pytest.mark.parametrize("body, param, needle", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_constraints_are_400_naming_the_problem_and_the_server_stays_healthy(server, body, param, needle):
    headers = {"Authorization": f"Bearer {KEY}"}
    for path, extra in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "x"})):
        r = httpx.post(server.url + path, json={"model": NAME, "max_tokens": 8, **extra, **body}, headers=headers,
                       timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "BadRequestError" or error["type"] == "invalid_request_error"
        assert needle in error["message"] and (error["param"] or "").startswith(param), error
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    ok = httpx.post(server.url + "/v1/completions", headers=headers, timeout=60,
                    json={"model": NAME, "prompt": "x", "max_tokens": 8, "structured_outputs": {"choice": ["a", "b"]}})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] in ("a", "b")
