"""The two typed messages between the scheduler and the model runner.

Exactly one ``SchedulerOutput`` goes to the runner each step and one ``ModelRunnerOutput``
comes back. Pure Python: no torch here, so the scheduler is testable with fake outputs.

KV layout the runner relies on: a request's token at position ``p`` lives in physical block
``block_ids[p // block_size]`` at offset ``p % block_size``, i.e. in cache slot
``block_ids[p // block_size] * block_size + p % block_size``.

Several tokens per request per step (speculative decoding): a request that samples may carry
``spec_token_ids``, drafted tokens that are known but not verified. They ride at the end of
``token_ids``, so their KV is written like any other token's, and the runner samples at each of
the last ``1 + len(spec_token_ids)`` positions. ``ModelRunnerOutput`` returns a list of tokens per
request: the accepted drafts and one token the target chose. The rejected drafts' KV slots are
garbage the scheduler rolls back (their positions are recomputed before they are ever read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tureen.sampling_params import SamplingParams


@dataclass
class ScheduledRequest:
    req_id: str
    token_ids: list[int]  # the tokens whose KV is computed this step (a chunk of the sequence)
    start_pos: int  # position of token_ids[0]; equals the request's computed-token count
    block_ids: list[int]  # the request's whole block table, covering start_pos + len(token_ids)
    sample: bool  # True when this chunk reaches the end of the known tokens: sample one token
    sampling_params: SamplingParams
    prompt_token_ids: list[int]  # for the repetition penalty (read-only)
    output_token_ids: list[int]  # generated so far, for penalties and min_tokens (read-only)
    step_seed: int | None = None  # seed for this token when the request is seeded (see Request)
    spec_token_ids: list[int] = field(default_factory=list)  # drafted tokens, the tail of token_ids
    draft_probs: Any = None  # (len(spec_token_ids), V) float32 draft distribution; None: no probabilities
    spec_step_seeds: list[int | None] = field(default_factory=list)  # step_seed of each later position

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_sample_rows(self) -> int:
        """Logits rows this request samples at: the last 1 + len(spec_token_ids) positions, or none."""
        return 1 + len(self.spec_token_ids) if self.sample else 0


@dataclass
class TokenBitmask:
    """The tokens some sampling rows may take this step, packed 32 to an int32 word.

    Row ``r`` of ``bitmask`` belongs to ``req_ids[r]``; bit ``j`` (least significant first) of word
    ``w`` allows token ``32 * w + j``. Sampling rows whose request is not listed are unconstrained.
    ``bitmask`` is an ``(R, ceil(V / 32))`` int32 tensor built by whoever owns the constraint (the
    engine's structured-output manager); the scheduler and this module never look inside it.
    """

    req_ids: list[str]
    bitmask: Any  # (R, ceil(V / 32)) int32 torch tensor on the CPU


@dataclass
class SchedulerOutput:
    requests: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted_req_ids: list[str] = field(default_factory=list)
    token_bitmask: TokenBitmask | None = None  # per-step logits mask; None costs the runner nothing

    @property
    def is_empty(self) -> bool:
        return not self.requests


@dataclass
class TokenLogprobs:
    """Log-probabilities at one sampling step: the chosen token first, then the top-k."""

    token_ids: list[int]
    logprobs: list[float]
    chosen_rank: int  # rank of the chosen token among the whole vocabulary (1 = best)


@dataclass
class ModelRunnerOutput:
    # Parallel lists over the scheduled requests that sampled, in SchedulerOutput order. Each request
    # gets one or more new tokens: the drafted tokens it accepted, then the target's own token.
    req_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[TokenLogprobs | None]] = field(default_factory=list)  # parallel to sampled_token_ids
