"""Which requests speculate each step, and how many tokens they may draft. Pure Python.

A request speculates when it is decoding (its last token is the only one not computed) and
nothing about it needs more than the target's distribution at each position:

- requests that want ``logprobs`` fall back to normal decoding (their logprobs would have to be
  those of the target at each verified position, which the rejection path does not compute);
- requests with a structured-output constraint fall back too (their token bitmask would need
  k + 1 rows advanced along the drafts);
- penalties (repetition, frequency, presence) and min_tokens are exact with speculation: each
  verified position is sampled as if the drafts before it were already output.

Above ``disable_by_batch_size`` running requests nobody speculates: verification costs k + 1
positions per request, which a small batch hides and a large one pays for.
"""

from __future__ import annotations

from tureen.config import SpeculativeConfig
from tureen.engine.request import Request
from tureen.engine.spec_decode.proposer import NgramProposer, Proposer
from tureen.errors import ConfigError


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer, max_model_len: int) -> None:
        self.config = config
        self.proposer = proposer
        self.max_model_len = max_model_len
        self.num_spec_tokens = config.num_speculative_tokens

    def propose(self, running: list[Request]) -> None:
        """Write drafts onto the running requests that may speculate; clear everyone else's."""
        limit = self.config.disable_by_batch_size
        active = [] if limit is not None and len(running) > limit else [r for r in running if self._eligible(r)]
        chosen = {id(r) for r in active}
        for req in running:
            if id(req) not in chosen:
                req.clear_spec()
        budgets = [self._max_draft(r) for r in active]
        self.proposer.propose([r for r, k in zip(active, budgets) if k > 0], [k for k in budgets if k > 0])

    def release(self, req_id: str) -> None:
        self.proposer.release(req_id)

    def _eligible(self, req: Request) -> bool:
        params = req.sampling_params
        return (req.num_computed_tokens == req.num_tokens - 1 and params.logprobs is None
                and params.structured_outputs is None and req.grammar is None)

    def _max_draft(self, req: Request) -> int:
        """k, less where max_tokens or max_model_len leave room for fewer (the target adds one)."""
        room = min(req.max_tokens - len(req.output_token_ids), self.max_model_len - req.num_tokens) - 1
        return max(0, min(self.num_spec_tokens, room))


def build_speculator(config: SpeculativeConfig, max_model_len: int, draft_factory=None) -> Speculator:
    """The speculator for ``config``. ``draft_factory()`` builds the draft-model proposer (torch)."""
    if config.method == "ngram":
        return Speculator(config, NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max), max_model_len)
    if draft_factory is None:
        raise ConfigError("speculative method draft_model needs the model runner (not a fake executor)")
    return Speculator(config, draft_factory(), max_model_len)

