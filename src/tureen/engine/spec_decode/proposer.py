"""The proposer seam and the n-gram (prompt lookup) proposer. Pure Python: no torch.

A proposer writes drafts onto requests: ``req.spec_token_ids`` (up to ``max_tokens[i]`` tokens
each) and, when it has them, ``req.draft_probs``, the (k, V) distribution each token was drawn
from. The scheduler sends the drafts with the request's next step; the rejection sampler decides
how many to keep.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from tureen.engine.request import Request


class Proposer(Protocol):
    def propose(self, reqs: list[Request], max_tokens: list[int]) -> None:
        """Draft up to ``max_tokens[i]`` tokens for ``reqs[i]``, each of which has just sampled.

        ``reqs`` is every request the engine speculates for this step: a proposer with per-request
        state (a draft model's KV cache) may drop the state of requests not in it.
        """

    def release(self, req_id: str) -> None:
        """Forget a request (finished or preempted)."""


class NgramProposer:
    """Prompt lookup: find the longest suffix of the sequence (between ``min_n`` and ``max_n``
    tokens) that occurred earlier in the prompt or output, and propose the tokens that followed
    its latest earlier occurrence (continuing the repetition past the end of the sequence). No draft probabilities: a point mass, which the rejection
    sampler accepts with the target's own probability, so the output stays exact."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, reqs: list[Request], max_tokens: list[int]) -> None:
        for req, k in zip(reqs, max_tokens):
            req.spec_token_ids = lookup(req.all_token_ids, self.min_n, self.max_n, k)
            req.draft_probs = None

    def release(self, req_id: str) -> None:
        pass


def lookup(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
    n_tokens = len(tokens)
    if k < 1 or n_tokens <= min_n:
        return []
    seq = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, n_tokens - 1), min_n - 1, -1):
        suffix = seq[-n:]
        # Windows starting at 0 .. n_tokens - n - 1: every occurrence that ends before the suffix does.
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # (n_tokens - n, n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            return _copy(tokens, int(hits[-1]) + n, k)
    return []


def _copy(tokens: list[int], start: int, k: int) -> list[int]:
    """k tokens from ``start`` on; past the end the copy reads its own output (LZ77-style overlap),
    so a sequence that repeats with period p is continued for k tokens, not just p."""
    out: list[int] = []
    n_tokens = len(tokens)
    for i in range(start, start + k):
        out.append(tokens[i] if i < n_tokens else out[i - n_tokens])
    return out
