"""Request and response schemas of the OpenAI-compatible API (pydantic).

Requests ignore unknown fields: OpenAI clients keep adding new ones. Responses follow the OpenAI
shapes field for field; vLLM's extras (``stop_reason``, ``top_k`` ...) sit beside them.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from tureen.errors import InvalidRequestError
from tureen.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

MAX_N = 128  # completions per request; more would only let one request crowd out the rest


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """Many clients send ``"field": null`` for "not set"; treat it exactly like an absent field."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(_Request):
    include_usage: bool = False


class JSONSchemaFormat(_Request):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def structured_outputs(self) -> StructuredOutputsParams | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise InvalidRequestError("response_format of type json_schema needs json_schema.schema",
                                      param="response_format.json_schema")
        return StructuredOutputsParams(json=self.json_schema.schema_)  # type: ignore[arg-type]


class StructuredOutputsRequest(_Request):
    """vLLM's ``structured_outputs`` request field (the fields of StructuredOutputsParams)."""

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def params(self) -> StructuredOutputsParams:
        if self.structural_tag is not None:
            raise InvalidRequestError("structured_outputs.structural_tag is not supported",
                                      param="structured_outputs.structural_tag")
        return StructuredOutputsParams(
            json=self.json_, regex=self.regex, choice=self.choice, grammar=self.grammar, json_object=self.json_object,
            disable_any_whitespace=self.disable_any_whitespace,
            disable_additional_properties=self.disable_additional_properties,
            whitespace_pattern=self.whitespace_pattern)


# Integers that cross to the engine process (msgpack: 64 bits); larger ones are a 400, not an OverflowError (500).
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class SamplingRequest(_Request):
    """The sampling fields both endpoints share (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extras
    top_k: Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[Int64] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: Int64 = 0
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    # vLLM's older spellings of structured_outputs
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The one output constraint the request asks for, from whichever field spells it."""
        found = self._constraints()
        if len(found) > 1:
            raise InvalidRequestError(f"set only one output constraint; got {', '.join(name for name, _ in found)}",
                                      param=found[1][0])
        return found[0][1] if found else None

    @property
    def constraint_field(self) -> str:
        """The request field the output constraint came from, for error messages."""
        found = self._constraints()
        name = found[0][0] if found else "structured_outputs"
        if name == "response_format" and self.response_format and self.response_format.type == "json_schema":
            return "response_format.json_schema.schema"
        return name

    def _constraints(self) -> list[tuple[str, StructuredOutputsParams]]:
        found: list[tuple[str, StructuredOutputsParams]] = []
        if self.structured_outputs is not None:
            found.append(("structured_outputs", self.structured_outputs.params()))
        if self.response_format is not None and (fmt := self.response_format.structured_outputs()) is not None:
            found.append(("response_format", fmt))
        legacy = {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice,
                  "grammar": self.guided_grammar}
        for kind, value in legacy.items():
            if value is not None:
                found.append((f"guided_{kind}", StructuredOutputsParams(**{kind: value})))
        return found

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        defaults: dict[str, float | int],
                        structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
        """Unset fields take the checkpoint's generation_config defaults, then SamplingParams'."""
        picked = {key: getattr(self, key) if getattr(self, key) is not None else defaults.get(key)
                  for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
        return SamplingParams(
            n=self.n, **{k: v for k, v in picked.items() if v is not None},
            seed=self.seed, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs, skip_special_tokens=self.skip_special_tokens, output_kind=RequestOutputKind.DELTA,
            structured_outputs=structured_outputs, cache_salt=self.cache_salt)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]  # token ids: true is not token 1
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise InvalidRequestError("echo is not supported", param="echo")
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of other than n is not supported", param="best_of")
        if isinstance(self.prompt, list) and not self.prompt:
            raise InvalidRequestError("prompt must not be an empty list", param="prompt")

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of single prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one token-id prompt
        return list(p)

    def to_sampling_params(self, defaults: dict[str, float | int],
                           structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
        constraint = structured_outputs or self.structured_outputs_params()
        return self.sampling_params(self.max_tokens, self.logprobs, defaults, constraint)


class TextPart(_Request):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_parts_have_text(self) -> "TextPart":
        if self.type == "text" and self.text is None:
            raise ValueError("a part of type 'text' needs a string 'text' field")
        return self


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    # Checked (with its own message) when the chat is rendered; the enum documents the accepted roles.
    role: str = Field(json_schema_extra={"enum": ["system", "developer", "user", "assistant", "tool"]})
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # on assistant messages
    tool_call_id: str | None = None  # on tool messages


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    add_special_tokens: bool = False

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        """OpenAI's default: 'auto' when tools are given, else 'none'."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def chat_messages(self) -> list[dict[str, Any]]:
        """Messages as the chat template sees them; OpenAI's 'developer' role is a system message.

        Tool-call arguments reach the template as objects (what Hugging Face templates index into).
        """
        out = []
        for m in self.messages:
            content: Any = m.content
            if isinstance(content, list):
                content = [part.model_dump(exclude_none=True) for part in content]
            role = "system" if m.role == "developer" else m.role
            message = {"role": role, "content": content if content is not None else ""}
            if m.name:
                message["name"] = m.name
            if m.tool_calls:
                message["tool_calls"] = [_template_tool_call(c) for c in m.tool_calls]
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            out.append(message)
        return out

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tool definitions for the chat template (the model sees them even under 'none', as in vLLM)."""
        if not self.tools:
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def to_sampling_params(self, defaults: dict[str, float | int],
                           structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens, logprobs, defaults, structured_outputs or self.structured_outputs_params())


def _template_tool_call(call: ToolCall) -> dict[str, Any]:
    try:
        arguments: Any = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        arguments = call.function.arguments
    return {"id": call.id, "type": call.type, "function": {"name": call.function.name, "arguments": arguments}}


class TokenizeRequest(_Request):
    """vLLM's /tokenize: either ``prompt`` or chat ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[StrictInt]


# ------------------------------------------------------------------------------------ responses


def _now() -> int:
    return int(time.time())


def _omit_none(value: Any) -> bool:
    return value is None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(default=None, exclude_if=_omit_none)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None = None


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunctionCall(BaseModel):
    name: str | None = Field(default=None, exclude_if=_omit_none)
    arguments: str | None = Field(default=None, exclude_if=_omit_none)


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = Field(default=None, exclude_if=_omit_none)
    type: Literal["function"] | None = Field(default=None, exclude_if=_omit_none)
    function: DeltaFunctionCall | None = Field(default=None, exclude_if=_omit_none)


class DeltaMessage(BaseModel):
    role: str | None = Field(default=None, exclude_if=_omit_none)
    content: str | None = Field(default=None, exclude_if=_omit_none)
    tool_calls: list[DeltaToolCall] | None = Field(default=None, exclude_if=_omit_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = Field(default=None, exclude_if=_omit_none)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(default=None, exclude_if=_omit_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "tureen"
    root: str | None = None
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[StrictInt]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
