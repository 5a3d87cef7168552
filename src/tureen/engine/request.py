"""A request owns its state: token ids, status, computed-token count and block table."""

from __future__ import annotations

import enum
import time
from typing import Protocol

from tureen.engine.messages import TokenLogprobs
from tureen.sampling_params import SamplingParams

_MASK63 = (1 << 63) - 1


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {3: "stop", 4: "length", 5: "abort"}.get(int(self))


class Grammar(Protocol):
    """A structured-output constraint's state for one sequence (built by ``executor/structured``).

    The scheduler advances it with every accepted token, so it always describes the sequence's
    output so far: a preempted request keeps it (its tokens are recomputed, not resampled), and a
    speculative run can feed drafted tokens one at a time and roll back the rejected ones.
    """

    def accept_tokens(self, token_ids: list[int]) -> bool: ...

    def is_terminated(self) -> bool: ...

    def rollback(self, num_tokens: int) -> None: ...


class Request:
    """One sequence being generated. ``n > 1`` requests are fanned out into one Request per sample."""

    def __init__(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        max_tokens: int,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        self.req_id = req_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.max_tokens = max_tokens  # resolved: never None
        self.priority = priority
        self.arrival_time = time.time() if arrival_time is None else arrival_time

        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs | None] = []
        self.status = RequestStatus.WAITING
        self.stop_reason: str | int | None = None

        # Invariant: num_computed_tokens < num_tokens while running; a step that computes up to
        # num_tokens samples one new token, which is appended and not yet computed.
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []  # the block table: logical block i -> physical block id
        self.block_hashes: list[int] = []  # chained hashes of the full blocks of all_token_ids
        self.num_registered_blocks = 0  # how many of block_ids the prefix cache has seen full
        self.num_cached_tokens = -1  # prompt tokens served from the prefix cache (-1: not scheduled yet)
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.grammar: Grammar | None = None  # set once its structured-output constraint has compiled
        # Speculative decoding: tokens a proposer drafted after the last sampled one. They are not in
        # all_token_ids until the target accepts them; draft_probs is their (k, V) draft distribution
        # when the proposer has one. The scheduler may send fewer than drafted (budget, length).
        self.spec_token_ids: list[int] = []
        self.draft_probs = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int, logprobs: TokenLogprobs | None) -> None:
        self.all_token_ids.append(token_id)
        self.output_token_ids.append(token_id)
        self.logprobs.append(logprobs)

    def clear_spec(self) -> None:
        self.spec_token_ids = []
        self.draft_probs = None

    def truncate_output(self, num_output_tokens: int) -> None:
        """Drop output tokens past the first ``num_output_tokens`` (a stop string ended the text there)."""
        drop = len(self.output_token_ids) - num_output_tokens
        if drop > 0:
            del self.all_token_ids[-drop:], self.output_token_ids[-drop:], self.logprobs[-drop:]

    def step_seed(self, offset: int = 0) -> int | None:
        """Seed for the output token ``offset`` places after the next one, for a seeded request.

        Derived from (seed, output index) alone, so a seeded request samples the same tokens
        whatever else is in the batch, after a preemption-by-recompute and, with speculation,
        whichever step verifies the token.
        """
        seed = self.sampling_params.seed
        if seed is None:
            return None
        step = len(self.output_token_ids) + offset
        return (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & _MASK63

    def sort_key(self) -> tuple[int, float, str]:
        """Scheduling order: lower priority value first, then earlier arrival (FCFS)."""
        return (self.priority, self.arrival_time, self.req_id)

    def __repr__(self) -> str:
        return (f"Request({self.req_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})")
