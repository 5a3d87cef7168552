"""Speculative-decoding counters, under the meanings of vLLM's ``vllm:spec_decode_*`` metrics."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class SpecDecodingStats:
    """Cumulative since start. A *draft* is one request's proposal verified in one step."""

    num_spec_tokens: int = 0  # the configured k: the length of accepted_per_pos
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # [j]: drafts whose token j was accepted

    def __post_init__(self) -> None:
        if len(self.accepted_per_pos) < self.num_spec_tokens:
            self.accepted_per_pos += [0] * (self.num_spec_tokens - len(self.accepted_per_pos))

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        if num_draft_tokens <= 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        for j in range(num_accepted):
            self.accepted_per_pos[j] += 1

    def snapshot(self) -> SpecDecodingStats:
        return replace(self, accepted_per_pos=list(self.accepted_per_pos))

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafted tokens over drafted tokens (0 before any draft)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens each verified draft produced, counting the target's own token (vLLM's definition)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def delta(self, earlier: SpecDecodingStats | None) -> SpecDecodingStats:
        """What happened since ``earlier`` (for an interval's log line)."""
        if earlier is None:
            return self.snapshot()
        return SpecDecodingStats(
            self.num_spec_tokens, self.num_drafts - earlier.num_drafts,
            self.num_draft_tokens - earlier.num_draft_tokens,
            self.num_accepted_tokens - earlier.num_accepted_tokens,
            [a - b for a, b in zip(self.accepted_per_pos, earlier.accepted_per_pos)])
