"""The two typed messages between the scheduler and the model runner.

Exactly one ``SchedulerOutput`` goes to the runner each step and one ``ModelRunnerOutput``
comes back. Pure Python: no torch here, so the scheduler is testable with fake outputs.

KV layout the runner relies on: a request's token at position ``p`` lives in physical block
``block_ids[p // block_size]`` at offset ``p % block_size``, i.e. in cache slot
``block_ids[p // block_size] * block_size + p % block_size``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    requests: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted_req_ids: list[str] = field(default_factory=list)

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
    # Parallel lists over the scheduled requests that sampled, in SchedulerOutput order.
    req_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
