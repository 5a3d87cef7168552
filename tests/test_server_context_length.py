"""Over-long requests get OpenAI's 400: code ``context_length_exceeded`` and "maximum context length",
whether the prompt alone is too long or the prompt plus ``max_tokens`` is, streamed or not."""

from __future__ import annotations

import openai
import pytest

from serve_process import ServerProcess

KEY = "sk-ctx"
LIMIT = 64


@pytest.fixture(scope="module")
def client(llama_dir, tmp_path_factory):
    server = ServerProcess(llama_dir, tmp_path_factory.mktemp("ctx") / "server.log", "--max-model-len", str(LIMIT),
                           key=KEY).wait_healthy()
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as c:
            yield c
    finally:
        server.stop()


def _completion(client, stream: bool, prompt, max_tokens: int):
    result = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=max_tokens, stream=stream)
    if stream:
        list(result)


def _chat(client, stream: bool, text: str, max_tokens: int):
    result = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": text}],
                                            max_tokens=max_tokens, stream=stream)
    if stream:
        list(result)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", ["prompt_alone", "prompt_plus_max_tokens"])
def test_completions_over_the_context_length(client, stream, case):
    prompt, max_tokens = ([7] * (LIMIT + 10), 4) if case == "prompt_alone" else ([7] * 40, 40)
    with pytest.raises(openai.BadRequestError) as info:
        _completion(client, stream, prompt, max_tokens)
    err = info.value
    assert err.status_code == 400 and err.code == "context_length_exceeded"
    assert f"maximum context length is {LIMIT} tokens" in err.message
    if case == "prompt_alone":
        assert f"{LIMIT + 10} tokens" in err.message and err.param == "prompt"
    else:
        assert "80 tokens" in err.message and err.param == "max_tokens"


@pytest.mark.parametrize("stream", [False, True])
def test_chat_prompt_alone_over_the_context_length(client, stream):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, stream, "word " * (2 * LIMIT), 4)
    assert info.value.code == "context_length_exceeded"
    assert f"maximum context length is {LIMIT} tokens" in info.value.message


def test_a_request_that_fits_still_works(client):
    out = client.completions.create(model="tiny-llama", prompt=[7] * 40, max_tokens=4)
    assert out.usage.prompt_tokens == 40 and out.usage.completion_tokens <= 4
