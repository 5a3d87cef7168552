"""Counting a request's prompt tokens at the gateway, before it is sent anywhere.

With ``tureen_params.tokenizer`` set on a model's deployment (a checkpoint directory holding a
``tokenizer.json``, or a hub id already in the local Hugging Face cache: the gateway never downloads),
prompts are counted with that model's own tokenizer and, for chat requests,
its own chat template: the number the upstream will see. Otherwise, or when that tokenizer cannot
be loaded, the count is the documented estimate ``ceil(characters / token_estimate_chars_per_token)``
(4 characters per token by default, OpenAI's rule of thumb for English), counting every text part
of every message plus the names of tools.

Long prompts are tokenized on a worker thread, so the event loop never stalls on a huge request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path
from typing import Any, Protocol

from tureen.gateway.config import WILDCARD, GatewayConfig
from tureen.tokenizer import Tokenizer

logger = logging.getLogger("tureen.gateway")

THREAD_THRESHOLD_CHARS = 16_384  # shorter prompts tokenize in microseconds: not worth a thread hop


class TokenCounter(Protocol):
    source: str  # "tokenizer" or "estimate", for logs and docs

    def count(self, endpoint: str, body: dict) -> int: ...


def request_text(endpoint: str, body: dict) -> str:
    """Every piece of text a request sends as its prompt (for the estimate and for size checks)."""
    if endpoint == "completions":
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):
            return "".join(p for p in prompt if isinstance(p, str))  # token ids are counted by prompt_token_ids
        return str(prompt)
    parts: list[str] = []
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [str(p.get("text", "")) for p in content if isinstance(p, dict)]
        if message.get("tool_calls"):
            parts.append(json.dumps(message["tool_calls"]))
    if body.get("tools"):
        parts.append(json.dumps(body["tools"]))
    return "\n".join(parts)


def prompt_token_ids(endpoint: str, body: dict) -> int:
    """Tokens a completions prompt gives as ids: ``[1, 2, 3]`` or ``[[1, 2], [3]]`` (OpenAI's token-id forms)."""
    prompt = body.get("prompt") if endpoint == "completions" else None
    if not isinstance(prompt, list):
        return 0
    total = 0
    for part in prompt:
        if isinstance(part, int) and not isinstance(part, bool):
            total += 1
        elif isinstance(part, list):
            total += sum(1 for t in part if isinstance(t, int) and not isinstance(t, bool))
    return total


class EstimateCounter:
    source = "estimate"

    def __init__(self, chars_per_token: float = 4.0) -> None:
        self.chars_per_token = chars_per_token

    def count(self, endpoint: str, body: dict) -> int:
        return math.ceil(len(request_text(endpoint, body)) / self.chars_per_token) + prompt_token_ids(endpoint, body)


class TokenizerCounter:
    """The model's own tokenizer and chat template; falls back to the estimate for what it cannot render."""

    source = "tokenizer"

    def __init__(self, tokenizer: Tokenizer, fallback: EstimateCounter) -> None:
        self.tokenizer = tokenizer
        self.fallback = fallback

    def count(self, endpoint: str, body: dict) -> int:
        try:
            if endpoint == "completions":
                prompt = body.get("prompt", "")
                if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                    return len(prompt)  # already token ids
                if isinstance(prompt, str):
                    return len(self.tokenizer.encode(prompt))
                return self.fallback.count(endpoint, body)
            text = self.tokenizer.apply_chat_template(body.get("messages") or [], tools=body.get("tools"))
            return len(self.tokenizer.encode(text, add_special_tokens=False))
        except Exception:  # a template that rejects the messages: the upstream will say why; count roughly
            return self.fallback.count(endpoint, body)


class TokenCounters:
    """One counter per public model name, built once at start-up."""

    def __init__(self, by_model: dict[str, TokenCounter], default: TokenCounter) -> None:
        self.by_model = by_model
        self.default = default

    @classmethod
    def from_config(cls, config: GatewayConfig) -> TokenCounters:
        estimate = EstimateCounter(config.tureen_settings.token_estimate_chars_per_token)
        loaded: dict[str, Tokenizer] = {}
        by_model: dict[str, TokenCounter] = {}
        for entry in config.model_list:
            source = entry.tureen_params.tokenizer
            if source is None or entry.model_name in by_model:
                continue
            if source not in loaded:
                try:
                    loaded[source] = Tokenizer.from_pretrained(tokenizer_dir(source))
                except Exception as exc:  # a missing dir, a hub id without network: use the estimate, say so
                    logger.warning("model %s: cannot load tokenizer %r (%s); counting prompt tokens as "
                                   "characters / %g", entry.model_name, source, exc, estimate.chars_per_token)
                    continue
            by_model[entry.model_name] = TokenizerCounter(loaded[source], estimate)
        return cls(by_model, estimate)

    def for_model(self, model: str) -> TokenCounter:
        """The model's counter; a name served by the wildcard entry (``model_name: "*"``) uses that entry's."""
        return self.by_model.get(model) or self.by_model.get(WILDCARD) or self.default

    async def count(self, model: str, endpoint: str, body: dict) -> int:
        counter = self.for_model(model)
        if isinstance(counter, TokenizerCounter) and _approx_chars(body) > THREAD_THRESHOLD_CHARS:
            return await asyncio.to_thread(counter.count, endpoint, body)
        return counter.count(endpoint, body)


def tokenizer_dir(source: str) -> Path:
    """A checkpoint directory, or a hub id resolved from the local cache only (no network at start-up)."""
    path = Path(source).expanduser()
    if path.is_dir() or "/" not in source or source.startswith((".", "/", "~")):
        return path
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(source, local_files_only=True,
                                  allow_patterns=["tokenizer*", "*.jinja", "special_tokens_map.json",
                                                  "generation_config.json"]))


def _approx_chars(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    tools = len(json.dumps(body["tools"])) if body.get("tools") else 0
    if isinstance(messages, list):
        return tools + sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict))
    return len(str(body.get("prompt", "")))


def max_tokens_of(body: dict) -> int | None:
    """The completion budget the request asks for (``max_completion_tokens`` wins, as in OpenAI's API)."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value * max(1, _int(body.get("n"), 1))
    return None


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default
