"""The one owner of request validation: every rule a request must pass before it enters the engine.

The API server and the offline ``LLM`` both go through an ``InputProcessor``; the engine core,
the scheduler and the model runner trust what it lets through and never check again. The token
vocabulary is the smaller of the tokenizer's and the model's (a checkpoint's embedding table may
be padded past the tokenizer, or the tokenizer may carry added tokens the model lacks).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from tureen.engine.core_messages import EngineCoreRequest
from tureen.errors import ContextLengthExceededError, InvalidRequestError, KVCacheTooSmallError, PromptTooLongError
from tureen.sampling_params import SamplingParams


@dataclass(frozen=True)
class InputLimits:
    vocab_size: int  # min(tokenizer, model)
    max_model_len: int
    num_kv_blocks: int
    block_size: int

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size


class InputProcessor:
    def __init__(self, tokenizer, limits: InputLimits) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.eos_token_ids = list(tokenizer.eos_token_ids)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a text prompt; a token-id prompt is checked against the vocabulary."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        self.check_token_ids(prompt)
        return list(prompt)

    def check_token_ids(self, ids: list[int]) -> None:
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InvalidRequestError("a token-id prompt must be a list of integers", param="prompt")
        vocab = self.limits.vocab_size
        if ids and not (0 <= min(ids) and max(ids) < vocab):
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")

    def validate(self, ids: list[int], params: SamplingParams) -> int:
        """Check the request fits; return its resolved max_tokens. Raises typed errors, changes nothing."""
        self.check_token_ids(ids)
        n_prompt, limit = len(ids), self.limits.max_model_len
        if n_prompt == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if n_prompt >= limit:
            raise PromptTooLongError(
                f"the prompt has {n_prompt} tokens, but max_model_len is {limit} (prompt plus at least one "
                f"generated token must fit)", limit=limit, value=n_prompt)
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - n_prompt
        if n_prompt + max_tokens > limit:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} in the completion). "
                f"Please reduce the length of the prompt or max_tokens.",
                limit=limit, prompt_tokens=n_prompt, max_tokens=max_tokens)
        needed, capacity = n_prompt + max_tokens, self.limits.kv_capacity_tokens
        if -(-needed // self.limits.block_size) > self.limits.num_kv_blocks:
            raise KVCacheTooSmallError(
                f"the request needs up to {needed} tokens of KV cache, but the whole cache holds "
                f"{capacity}; raise the KV budget or lower max_tokens", limit=capacity, value=needed)
        return max_tokens

    def process(self, request_id: str, prompt: str | list[int], params: SamplingParams, *, priority: int = 0,
                arrival_time: float | None = None, prompt_token_ids: list[int] | None = None) -> EngineCoreRequest:
        """The request as the engine core takes it: validated once, parameters resolved."""
        ids = prompt_token_ids if prompt_token_ids is not None else self.tokenize(prompt)
        max_tokens = self.validate(ids, params)
        resolved = dataclasses.replace(params, max_tokens=max_tokens, eos_token_ids=self.eos_token_ids)
        return EngineCoreRequest(request_id, prompt if isinstance(prompt, str) else None, list(ids), resolved,
                                 priority, time.time() if arrival_time is None else arrival_time)
