"""The draft-model proposers: a draft drafts k tokens per request, autoregressively.

``DraftModelProposer`` runs a second, smaller checkpoint with its own paged KV cache;
``SelfDraftProposer`` runs the target's own weights, quantized, in the target's KV cache.

For a separate draft, each request has a *shadow* ``Request`` on the draft's side: the target's tokens plus the
drafts so far, with its own block table in the draft's ``KVCacheManager`` (no prefix caching).
Before drafting, the shadow's computed count moves back to the longest prefix it shares with
the target's tokens (rejected drafts are forgotten, their blocks returned), then one batched
draft forward pass catches every shadow up and drafts its first token; k - 1 more passes of
one token per request draft the rest.

Draft tokens are drawn from ``q``, the draft's logits put through the request's own sampling
pipeline (temperature, top-k, top-p, min-p, penalties; one-hot argmax when greedy), and ``q`` is
handed to the rejection sampler, which keeps the output distribution exactly the target's.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from tureen.config import EngineConfig, SpeculativeConfig
from tureen.engine.kv_cache import KVCacheManager
from tureen.engine.messages import ScheduledRequest, SchedulerOutput
from tureen.engine.request import Request
from tureen.errors import ConfigError
from tureen.executor.sampler import Sampler, SamplingMetadata, exponential_race, plain_greedy
from tureen.tokenizer import Tokenizer

logger = logging.getLogger("tureen.spec_decode")

_SEED_MASK = (1 << 64) - 1
_DRAFT_SALT = 0x2545F4914F6CDD1D  # the draft's stream differs from the target's for the same position


class DraftModelProposer:
    def __init__(self, runner, num_blocks: int, block_size: int) -> None:
        self.runner = runner  # a ModelRunner over the draft weights, with its KV cache allocated
        self.kv = KVCacheManager(num_blocks, block_size, enable_caching=False)
        self.sampler = Sampler()
        self.shadows: dict[str, Request] = {}
        self.synced: dict[str, int] = {}  # req_id -> target length at the last sync (a prefix known to match)

    @classmethod
    def load(cls, config: EngineConfig, spec: SpeculativeConfig, target_dir: Path, tokenizer: Tokenizer,
             target_vocab_size: int, num_blocks: int) -> DraftModelProposer:
        """Load the draft checkpoint (checking it shares the target's vocabulary) with as many KV
        blocks as the target (a shadow holds as many tokens as its request)."""
        from tureen.executor.loader import resolve_checkpoint
        from tureen.executor.model_runner import ModelRunner

        draft_dir = resolve_checkpoint(spec.model)
        check_same_vocabulary(tokenizer, Tokenizer.from_pretrained(draft_dir), spec.model)
        draft_config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, model=str(draft_dir), quantization=spec.quantization,
                                              quantize_lm_head=quantizes_lm_head(spec, draft_dir),
                                              # the target's activation scheme needs quantized weights: a draft
                                              # quantized at load time shares it, any other draft runs without
                                              quantization_activation=(config.model.quantization_activation
                                                                       if spec.quantization else "none")),
            cache=dataclasses.replace(config.cache, num_gpu_blocks_override=num_blocks, enable_prefix_caching=False),
            speculative_config=None)
        # A draft pass computes one token per request, or two after the target accepted every draft
        # (the last draft and the target's bonus token): both take the native decode stack.
        runner = ModelRunner(draft_config, draft_dir, max_decode_rows=2)
        if runner.vocab_size != target_vocab_size:
            raise ConfigError(f"the draft model {spec.model!r} has {runner.vocab_size} logits, the target "
                              f"{target_vocab_size}: a draft must share the target's vocabulary")
        runner.allocate_kv_cache(num_blocks)
        logger.info("draft model %s: %d KV blocks (%.1f MiB), weights %.1f MiB", draft_dir, num_blocks,
                    num_blocks * runner.block_size * runner.kv_bytes_per_token / 2**20, runner.weight_bytes() / 2**20)
        return cls(runner, num_blocks, config.cache.block_size)

    # ---- the Proposer interface ---------------------------------------------------------------
    def propose(self, reqs: list[Request], max_tokens: list[int]) -> None:
        live = {r.req_id for r in reqs}
        for req_id in [rid for rid in self.shadows if rid not in live]:
            self.release(req_id)
        active = [(req, self._sync(req), k) for req, k in zip(reqs, max_tokens)]
        drafts = Drafts(reqs)
        for step in range(max(max_tokens, default=0)):
            active = [(req, sh, k) for req, sh, k in active if k > step and self._allocate(sh)]
            if not active:
                break
            tokens, q = self._draft_step([(req, sh) for req, sh, _ in active], drafts.tokens, step)
            for i, ((req, sh, _), token) in enumerate(zip(active, tokens)):
                sh.num_computed_tokens = sh.num_tokens
                sh.all_token_ids.append(token)
                drafts.add(req, token, None if q is None else q[i])
        drafts.write_onto(reqs, self.runner.vocab_size)

    def release(self, req_id: str) -> None:
        shadow = self.shadows.pop(req_id, None)
        self.synced.pop(req_id, None)
        if shadow is not None:
            self.kv.free(shadow)

    # ---- helpers ------------------------------------------------------------------------------
    def _sync(self, req: Request) -> Request:
        """The request's shadow, holding the target's tokens, its computed count moved back to
        what it shares with them (the drafts the target rejected are forgotten)."""
        shadow = self.shadows.get(req.req_id)
        if shadow is None:
            shadow = Request(req.req_id, req.prompt_token_ids, req.sampling_params, max_tokens=req.max_tokens)
            self.shadows[req.req_id] = shadow
        old, new = shadow.all_token_ids, req.all_token_ids
        common = min(shadow.num_computed_tokens, len(new) - 1)
        for i in range(min(self.synced.get(req.req_id, 0), common), common):  # earlier tokens matched before
            if old[i] != new[i]:
                common = i
                break
        shadow.num_computed_tokens = common
        shadow.all_token_ids = list(new)
        self.synced[req.req_id] = len(new)
        self.kv.rollback(shadow)
        return shadow

    def _allocate(self, shadow: Request) -> bool:
        """Slots for the shadow's uncomputed tokens; a shadow the pool cannot serve stops drafting."""
        return self.kv.allocate_slots(shadow, shadow.num_tokens - shadow.num_computed_tokens)

    def _draft_step(self, pairs: list[tuple[Request, Request]], drafts: dict[str, list[int]],
                    step: int) -> tuple[list[int], torch.Tensor | None]:
        rows = [(req, sh.all_token_ids[sh.num_computed_tokens:], sh.num_computed_tokens, sh.block_ids)
                for req, sh in pairs]
        return draft_pass(self.runner, self.sampler, rows, drafts, step)


class SelfDraftProposer:
    """The target's own weights, quantized, drafting in the target's own KV cache.

    The draft shares the target's layers, heads and cache layout, so it needs no cache of its own
    and never prefills: the K/V of every verified token is already in the target's cache, exact.
    Each draft pass computes one token per request, at the request's first uncomputed position,
    in lookahead slots reserved on the target's block manager. Its K/V there is scratch: the
    verification pass writes the target's own K/V over every drafted position before it attends,
    and the computed count only moves over positions the target wrote, so the cache below it stays
    exactly the target's.
    """

    def __init__(self, runner, kv: KVCacheManager) -> None:
        self.runner = runner  # a ModelRunner over the quantized weights, sharing the target's KV cache
        self.kv = kv  # the target's block manager
        self.sampler = Sampler()

    @classmethod
    def load(cls, config: EngineConfig, spec: SpeculativeConfig, target_dir: Path, target,
             kv: KVCacheManager) -> SelfDraftProposer:
        """Quantize the target's checkpoint again as the draft and point it at ``target``'s KV cache."""
        from tureen.executor.model_runner import ModelRunner

        draft_config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, quantization=spec.quantization,
                                              quantize_lm_head=quantizes_lm_head(spec, Path(target_dir)),
                                              quantization_activation=self_draft_activation(config, spec, target)),
            speculative_config=None)
        runner = ModelRunner(draft_config, Path(target_dir), max_decode_rows=1)
        runner.share_kv_cache(target)
        logger.info("%s self-draft: weights %.1f MiB, sharing the target's KV cache", spec.quantization,
                    runner.weight_bytes() / 2**20)
        return cls(runner, kv)

    def propose(self, reqs: list[Request], max_tokens: list[int]) -> None:
        drafts = Drafts(reqs)
        active = [(req, k) for req, k in zip(reqs, max_tokens) if self._reserve(req, k, len(reqs))]
        for step in range(max(max_tokens, default=0)):
            active = [(req, k) for req, k in active if k > step]
            if not active:
                break
            rows = [(req, [drafts.tokens[req.req_id][-1] if step else req.all_token_ids[-1]],
                     req.num_computed_tokens + step, req.block_ids) for req, _ in active]
            tokens, q = draft_pass(self.runner, self.sampler, rows, drafts.tokens, step)
            for i, ((req, _), token) in enumerate(zip(active, tokens)):
                drafts.add(req, token, None if q is None else q[i])
        drafts.write_onto(reqs, self.runner.vocab_size)

    def release(self, req_id: str) -> None:
        pass  # no state of its own: the target's blocks are the target's to free

    def _reserve(self, req: Request, k: int, num_speculating: int) -> bool:
        """Slots for the k positions the draft passes write; the verification step then finds them
        allocated. Drafts that would leave fewer free blocks than there are speculating requests
        are not made: the pool keeps room for everyone's next token, so drafts never push anyone out."""
        need = self.kv.blocks_needed(req.num_computed_tokens + k) - len(req.block_ids)
        if need > 0 and self.kv.pool.num_free - need < num_speculating:
            return False
        return self.kv.allocate_slots(req, 0, num_lookahead_tokens=k)


def draft_pass(runner, sampler: Sampler, rows: list[tuple[Request, list[int], int, list[int]]],
               drafts: dict[str, list[int]], step: int) -> tuple[list[int], torch.Tensor | None]:
    """One batched draft forward pass over ``rows`` (request, token ids, first position, block
    table): a token per request and the (B, V) distributions they were drawn from (None: greedy
    argmax drafts, which the rejection sampler reads as point masses)."""
    sched = SchedulerOutput()
    for req, token_ids, start, block_ids in rows:
        seed = req.step_seed(step)
        sched.requests.append(ScheduledRequest(
            req_id=req.req_id, token_ids=token_ids, start_pos=start, block_ids=block_ids,
            sample=True, sampling_params=req.sampling_params, prompt_token_ids=req.prompt_token_ids,
            output_token_ids=req.output_token_ids + drafts[req.req_id],
            step_seed=None if seed is None else (seed ^ _DRAFT_SALT) & _SEED_MASK))
        sched.num_batched_tokens += len(token_ids)
    logits, sampled_rows = runner.compute_sample_logits(sched)  # (B, V)
    if plain_greedy(sampled_rows, None):  # argmax drafts: point masses say the same to the rejection sampler
        return logits.argmax(dim=-1).tolist(), None
    meta = SamplingMetadata.from_requests(sampled_rows, runner.vocab_size, runner.device)
    q = sampler.probs(logits, meta)  # (B, V); one-hot on greedy rows
    if meta.all_greedy:
        tokens = q.argmax(dim=-1)
    else:
        tokens = exponential_race(q, meta.seeds, meta.any_unseeded_random)
        if meta.greedy is not None:
            tokens = torch.where(meta.greedy, q.argmax(dim=-1), tokens)
    return tokens.tolist(), q


class Drafts:
    """Each request's drafted tokens and the distributions they were drawn from, pass by pass."""

    def __init__(self, reqs: list[Request]) -> None:
        self.tokens: dict[str, list[int]] = {req.req_id: [] for req in reqs}
        self.probs: dict[str, list[torch.Tensor | None]] = {req.req_id: [] for req in reqs}

    def add(self, req: Request, token: int, q: torch.Tensor | None) -> None:
        self.tokens[req.req_id].append(token)
        self.probs[req.req_id].append(q)

    def write_onto(self, reqs: list[Request], vocab: int) -> None:
        """The drafts onto the requests, for the scheduler's next step."""
        for req in reqs:
            req.spec_token_ids = self.tokens[req.req_id]
            req.draft_probs = stack_draft_probs(self.tokens[req.req_id], self.probs[req.req_id], vocab)


def stack_draft_probs(tokens: list[int], rows: list[torch.Tensor | None], vocab: int) -> torch.Tensor | None:
    """(k, V) draft distributions, or None when every draft was a greedy argmax (point masses).
    An argmax step among sampled ones (min_tokens just reached) is a one-hot row: its point mass."""
    if all(row is None for row in rows):
        return None
    return torch.stack([torch.nn.functional.one_hot(torch.tensor(t), vocab).float() if row is None else row
                        for t, row in zip(tokens, rows)])


def self_draft_activation(config: EngineConfig, spec: SpeculativeConfig, target) -> str:
    """A self-draft's activation scheme: int8 activations (W8A8, the fastest CPU kernels) for an
    int8 or int4 draft on the native kernels, since a draft only has to guess well; otherwise the
    target's own setting, or none."""
    if spec.quantization in ("int8", "int4") and getattr(target, "linear_backend", None) == "native":
        return "int8"
    return config.model.quantization_activation if spec.quantization else "none"


def quantizes_lm_head(spec: SpeculativeConfig, draft_dir: Path) -> bool:
    """A draft quantized at load time quantizes its LM head too: on a small model the head is a large
    share of a draft pass's weight bytes, and a draft only has to guess well, not be exact."""
    from tureen.executor.loader import load_hf_config
    from tureen.executor.quantization.config import load_quantization_config

    return spec.quantization is not None and load_quantization_config(load_hf_config(draft_dir), draft_dir) is None


def check_same_vocabulary(target: Tokenizer, draft: Tokenizer, name: str) -> None:
    """A draft must map every token id to the same token as the target, or its guesses mean nothing."""
    target_vocab = target.backend.get_vocab(with_added_tokens=True)
    draft_vocab = draft.backend.get_vocab(with_added_tokens=True)
    if target_vocab != draft_vocab:
        differ = sum(1 for tok, i in target_vocab.items() if draft_vocab.get(tok) != i)
        raise ConfigError(f"the draft model {name!r} has another vocabulary than the target ({len(draft_vocab)} "
                          f"tokens against {len(target_vocab)}, {differ} of the target's differ): a draft model must "
                          "use the target's tokenizer")
