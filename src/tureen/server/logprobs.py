"""Engine logprobs in OpenAI's two shapes (legacy completions and chat).

A byte-level BPE token can hold part of a multi-byte character, so its text alone is not exact:
chat's ``bytes`` field carries the token's exact bytes (clients join them to rebuild characters),
and completions' ``text_offset`` is measured on the text actually returned, not on token strings.
"""

from __future__ import annotations

import functools
from typing import Any

from tureen.outputs import CompletionOutput, Logprob
from tureen.server.protocol import ChatLogprobs, ChatLogprobToken, CompletionLogprobs, TopLogprob

MIN_LOGPROB = -9999.0  # JSON has no -inf


def clamp(value: float) -> float:
    return max(value, MIN_LOGPROB)


@functools.cache
def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: each byte is drawn as a printable character; map it back."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenStrings:
    """Token id -> (text, exact bytes), cached per tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend", None), "decoder", None)
        self.byte_level = "ByteLevel" in type(decoder).__name__ or "ByteLevel" in repr(decoder)
        self._cache: dict[int, tuple[str, bytes]] = {}

    def get(self, token_id: int, lp: Logprob | None = None) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = lp.decoded_token if lp is not None and lp.decoded_token is not None else \
                self.tokenizer.decode([token_id], skip_special_tokens=False)
            hit = self._cache[token_id] = (text, self._bytes(token_id, text))
        return hit

    def _bytes(self, token_id: int, text: str) -> bytes:
        piece = self.tokenizer.id_to_token(token_id) if self.byte_level else None
        table = _byte_level_chars()
        if piece and all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return text.encode("utf-8")


def top_entries(entries: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The ``k`` most likely alternatives, by rank."""
    ranked = sorted(entries.items(), key=lambda kv: kv[1].rank)
    return [(tid, lp) for tid, lp in ranked if lp.rank <= k][:k]


def completion_logprobs(strings: TokenStrings, c: CompletionOutput, text_start: int) -> CompletionLogprobs:
    """tokens, token_logprobs, top_logprobs (the chosen token and the top-k), text_offset.

    ``text_start`` is where this output's text begins in the choice's text; each token's offset
    is clamped to the text actually released with it.
    """
    out = CompletionLogprobs()
    consumed = 0
    for token_id, entries in zip(c.token_ids, c.logprobs or []):
        chosen = entries.get(token_id)
        text, _ = strings.get(token_id, chosen)
        out.tokens.append(text)
        out.token_logprobs.append(None if chosen is None else clamp(chosen.logprob))
        ranked = sorted(entries.items(), key=lambda kv: kv[1].rank)
        out.top_logprobs.append({strings.get(tid, lp)[0]: clamp(lp.logprob) for tid, lp in ranked} or None)
        out.text_offset.append(text_start + min(consumed, len(c.text)))
        consumed += len(text)
    return out


def chat_logprobs(strings: TokenStrings, c: CompletionOutput, k: int) -> ChatLogprobs:
    """One entry per token with its exact bytes and its top-``k`` alternatives."""
    content = []
    for token_id, entries in zip(c.token_ids, c.logprobs or []):
        chosen = entries.get(token_id)
        text, raw = strings.get(token_id, chosen)
        tops = []
        for tid, lp in top_entries(entries, k):
            t_text, t_raw = strings.get(tid, lp)
            tops.append(TopLogprob(token=t_text, logprob=clamp(lp.logprob), bytes=list(t_raw)))
        content.append(ChatLogprobToken(token=text, logprob=clamp(chosen.logprob) if chosen else MIN_LOGPROB,
                                        bytes=list(raw), top_logprobs=tops))
    return ChatLogprobs(content=content)
