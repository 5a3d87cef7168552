"""Batched token sampling: one step's logits in, one token (and optional logprobs) per row out.

The pipeline follows vLLM's order. Each stage is a small pure function over (B, V) tensors and is
skipped outright when no row in the batch needs it::

    raw logits ─► logprobs = log_softmax(raw)         only if some row asked for logprobs
        │
        ├─► logits processors  per-step batched callables (structured-output token bitmask)
        ├─► min_tokens   EOS and stop ids → -inf while the output is shorter than min_tokens
        ├─► penalties    repetition (prompt + output, HF), frequency / presence (output, OpenAI)
        ├─► greedy rows  argmax                          an all-greedy batch stops here
        └─► other rows   / temperature → top_k → top_p → min_p → exponential race

Invariants:
- Exactly one device→host copy per step: tokens and logprobs are packed into one tensor and read
  back with a single ``tolist()``. Nothing on the hot path calls ``.item()`` or branches on a
  tensor value; every stage decision is a Python flag computed while building the metadata.
- A seeded row's token depends only on its own logits, parameters and ``step_seed``: its noise
  comes from its own generator, and every stage acts row by row, so neighbours cannot move it.
- top_k and top_p cut by position in a stable descending sort, so ties never let more than k
  tokens (or more than the smallest nucleus) through. top_k alone skips the sort but keeps the
  very same set: tokens above the k-th value, then tied ones in index order.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from tureen.engine.messages import ScheduledRequest, TokenBitmask, TokenLogprobs

__all__ = [
    "Sampler", "SamplingMetadata", "LogitsProcessor", "TokenBitmaskProcessor", "apply_token_bitmask",
    "apply_token_bitmask_cpu_",
    "unpack_token_bitmask", "apply_min_tokens", "apply_repetition_penalty",
    "apply_frequency_presence_penalties", "apply_temperature", "apply_top_k", "apply_top_k_top_p", "apply_min_p",
    "exponential_race", "plain_greedy", "greedy_tokens",
]

_SEED_MASK = (1 << 64) - 1  # torch generators take 64-bit seeds; fold any Python int into range
_NEG_INF = float("-inf")

# A logits processor maps one step's (B, V) float32 logits to (B, V) logits; it may work in place,
# since the sampler owns its logits (the runner hands it a fresh tensor every step, and the raw
# logprobs are taken before). Processors are built per step from what the scheduler's output
# carries, so a batch that needs none runs none: the seam costs an empty-list check.
LogitsProcessor = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SamplingMetadata:
    """Batched sampling inputs for the rows that sample this step (row i is ``reqs[i]``).

    A tensor field is None when no row needs its stage, so the sampler skips the stage.
    Rows that do not use a stage hold its neutral value (temperature 1, top_k V, top_p 1, ...);
    greedy rows hold top_k 1, which is what greedy means and keeps the top_k fast path open.
    """

    batch_size: int
    vocab_size: int
    all_greedy: bool
    greedy: torch.Tensor | None  # (B,) bool; None when all rows or no row are greedy
    seeds: list[tuple[int, int]]  # (row, seed) of the random rows that carry a step seed
    any_unseeded_random: bool  # some random row draws from the default generator
    temperature: torch.Tensor | None  # (B,) float32
    top_k: torch.Tensor | None  # (B,) int64; vocab_size where disabled
    max_top_k: int  # largest k below vocab_size over the rows (vocab_size when none)
    top_p: torch.Tensor | None  # (B,) float32
    min_p: torch.Tensor | None  # (B,) float32
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None  # (rows (N,), token ids (N,))
    repetition_penalty: torch.Tensor | None  # (B,) float32
    seen_tokens: torch.Tensor | None  # (B, V) bool: token occurs in the prompt or the output
    frequency_penalty: torch.Tensor | None  # (B,) float32
    presence_penalty: torch.Tensor | None  # (B,) float32
    output_counts: torch.Tensor | None  # (B, V) float32: occurrences in the output so far
    num_logprobs: list[int | None]  # per row: alternatives wanted, None for no logprobs
    max_num_logprobs: int | None  # None when no row wants logprobs
    logits_processors: list[LogitsProcessor] = field(default_factory=list)  # applied in order, first

    @classmethod
    def from_requests(cls, reqs: list[ScheduledRequest], vocab_size: int, device: torch.device,
                      token_bitmask: TokenBitmask | None = None) -> SamplingMetadata:
        """Build the metadata for ``reqs``: the requests that sample this step, in logits-row order.

        ``token_bitmask`` (from the scheduler's output) becomes one batched processor over the rows
        it names; requests it names that do not sample this step are dropped from it.
        """
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        params = [r.sampling_params for r in reqs]
        greedy = [p.temperature == 0.0 for p in params]
        num_logprobs = [None if p.logprobs is None else min(p.logprobs, vocab_size) for p in params]
        wanted = [n for n in num_logprobs if n is not None]
        return cls(
            batch_size=len(reqs),
            vocab_size=vocab_size,
            all_greedy=all(greedy),
            greedy=_row_tensor(greedy, torch.bool, device) if any(greedy) and not all(greedy) else None,
            seeds=[(i, r.step_seed & _SEED_MASK) for i, (r, g) in enumerate(zip(reqs, greedy))
                   if not g and r.step_seed is not None],
            any_unseeded_random=any(not g and r.step_seed is None for r, g in zip(reqs, greedy)),
            **_filter_fields(params, greedy, vocab_size, device),
            min_tokens_mask=_min_tokens_mask(reqs, vocab_size, device),
            **_penalty_fields(reqs, vocab_size, device),
            num_logprobs=num_logprobs,
            max_num_logprobs=max(wanted) if wanted else None,
            logits_processors=_bitmask_processors(reqs, token_bitmask, device),
        )


def _bitmask_processors(reqs: list[ScheduledRequest], token_bitmask: TokenBitmask | None,
                        device: torch.device) -> list[LogitsProcessor]:
    if token_bitmask is None or not token_bitmask.req_ids:
        return []
    row_of = {r.req_id: i for i, r in enumerate(reqs)}
    pairs = [(row_of[rid], k) for k, rid in enumerate(token_bitmask.req_ids) if rid in row_of]
    if not pairs:
        return []
    rows, mask_rows = zip(*pairs)
    bitmask = token_bitmask.bitmask
    if len(mask_rows) != bitmask.shape[0]:
        bitmask = bitmask[list(mask_rows)]
    return [TokenBitmaskProcessor(_row_tensor(list(rows), torch.int64, device), bitmask.to(device), list(rows))]


def _row_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)  # (B,)


def _filter_fields(params: list, greedy: list[bool], vocab_size: int, device: torch.device) -> dict:
    """Temperature, top_k, top_p, min_p: neutral on greedy rows, None when no row uses them."""
    if all(greedy):
        return dict(temperature=None, top_k=None, max_top_k=vocab_size, top_p=None, min_p=None)
    rows = [(p, g) for p, g in zip(params, greedy)]
    temps = [1.0 if g else p.temperature for p, g in rows]
    top_k = [1 if g else p.top_k if 0 < p.top_k < vocab_size else vocab_size for p, g in rows]
    use_top_k = any(not g and 0 < p.top_k < vocab_size for p, g in rows)
    top_p = [1.0 if g else p.top_p for p, g in rows]
    min_p = [0.0 if g else p.min_p for p, g in rows]
    return dict(
        temperature=_row_tensor(temps, torch.float32, device) if any(t != 1.0 for t in temps) else None,
        top_k=_row_tensor(top_k, torch.int64, device) if use_top_k else None,
        max_top_k=max((k for k in top_k if k < vocab_size), default=vocab_size),
        top_p=_row_tensor(top_p, torch.float32, device) if any(p < 1.0 for p in top_p) else None,
        min_p=_row_tensor(min_p, torch.float32, device) if any(m > 0.0 for m in min_p) else None,
    )


def _min_tokens_mask(reqs: list[ScheduledRequest], vocab_size: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row, token) pairs to forbid: EOS and stop ids of rows still short of min_tokens.

    Like vLLM, EOS is masked even under ignore_eos: min_tokens promises that many non-stop tokens.
    """
    rows: list[int] = []
    cols: list[int] = []
    for i, r in enumerate(reqs):
        p = r.sampling_params
        if len(r.output_token_ids) >= p.min_tokens:
            continue
        ids = sorted({t for t in (*p.eos_token_ids, *p.stop_token_ids) if 0 <= t < vocab_size})
        rows += [i] * len(ids)
        cols += ids
    if not rows:
        return None
    return _row_tensor(rows, torch.int64, device), _row_tensor(cols, torch.int64, device)


def _penalty_fields(reqs: list[ScheduledRequest], vocab_size: int, device: torch.device) -> dict:
    """Penalty values and token statistics; only rows that use a penalty pay for counting."""
    params = [r.sampling_params for r in reqs]
    fields = dict.fromkeys(("repetition_penalty", "seen_tokens", "frequency_penalty",
                            "presence_penalty", "output_counts"))
    if not any(p.needs_penalties for p in params):
        return fields
    output_counts = _token_counts([r.output_token_ids if p.needs_penalties else []
                                   for r, p in zip(reqs, params)], vocab_size, device)
    if any(p.repetition_penalty != 1.0 for p in params):
        prompt_counts = _token_counts([r.prompt_token_ids if p.repetition_penalty != 1.0 else []
                                       for r, p in zip(reqs, params)], vocab_size, device)
        fields.update(
            repetition_penalty=_row_tensor([p.repetition_penalty for p in params], torch.float32, device),
            seen_tokens=(prompt_counts > 0) | (output_counts > 0))
    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
        fields.update(
            frequency_penalty=_row_tensor([p.frequency_penalty for p in params], torch.float32, device),
            presence_penalty=_row_tensor([p.presence_penalty for p in params], torch.float32, device),
            output_counts=output_counts)
    return fields


def _token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """(B, V) float32 counts of each token id per row. Out-of-range ids are ignored, not fatal."""
    batch, width = len(token_lists), vocab_size + 1  # one spare column absorbs bad ids
    flat = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.int64)  # (N,)
    lengths = torch.tensor([len(ids) for ids in token_lists], dtype=torch.int64)  # (B,)
    rows = torch.repeat_interleave(torch.arange(batch), lengths)  # (N,)
    flat = torch.where((flat >= 0) & (flat < vocab_size), flat, vocab_size)
    index = (rows * width + flat).to(device)  # (N,) positions in the flattened (B, V + 1) table
    counts = torch.zeros(batch * width, dtype=torch.float32, device=device)
    counts.scatter_add_(0, index, torch.ones(index.shape, dtype=torch.float32, device=device))
    return counts.view(batch, width)[:, :vocab_size]  # (B, V)


# ---- the stages: pure functions, each returns new logits and leaves its input untouched ----

# Bit j of an int32 word, as an int32 (bit 31 is the sign bit: -2**31).
_BIT_VALUES = torch.tensor([(1 << j) - (1 << 32 if j == 31 else 0) for j in range(32)], dtype=torch.int32)


def unpack_token_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(R, W) int32 packed bitmask -> (R, vocab_size) bool, True where the token is allowed."""
    bits = _BIT_VALUES.to(bitmask.device)
    allowed = (bitmask.unsqueeze(-1) & bits) != 0  # (R, W, 32)
    return allowed.view(bitmask.shape[0], -1)[:, :vocab_size]  # (R, V); tokens past 32 * W stay banned


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Ban, in each of ``rows``, every token its packed bitmask row does not allow (torch ops, new tensor)."""
    allowed = unpack_token_bitmask(bitmask, logits.shape[-1])  # (R, V)
    masked = torch.where(allowed, logits.index_select(0, rows), _NEG_INF)  # (R, V)
    return logits.index_copy(0, rows, masked)  # (B, V)


# float32 -inf as an int32 bit pattern (0xff800000), for the branch-free select below.
_NEG_INF_BITS = int(np.array([_NEG_INF], dtype=np.float32).view(np.int32)[0])


def apply_token_bitmask_cpu_(logits: torch.Tensor, rows: torch.Tensor | list[int],
                             bitmask: torch.Tensor) -> torch.Tensor:
    """``apply_token_bitmask`` in place on contiguous float32 CPU logits, several times faster.

    A JSON-schema mask mixes allowed and banned tokens at random-looking positions, so a per-token
    branch (``masked_fill``, ``torch.where``, xgrammar's CPU kernel) mispredicts on a large share
    of the vocabulary (``tureen bench structured --parts`` times them side by side). The bits are
    unpacked with numpy (SIMD) and turned, without a branch, into an additive mask whose float bits
    are 0 (+0.0) where a token is allowed and those of -inf where it is banned, added to each row in
    place. A finite logit plus 0.0 is itself, so allowed tokens keep their exact values. Everything
    runs on the calling thread: a torch op over the rows (``index_add_``) would fan out to the
    intra-op threads, which costs more than it saves for a few hundred thousand additions.
    """
    vocab = logits.shape[-1]
    packed = bitmask.contiguous().numpy().view(np.uint8)  # (R, 4W): little-endian words, bytes in bit order
    mask = np.unpackbits(packed, axis=-1, count=vocab, bitorder="little").astype(np.int32)  # (R, V) 0 / 1
    np.subtract(mask, 1, out=mask)  # 0 allowed, -1 (all ones) banned
    np.bitwise_and(mask, _NEG_INF_BITS, out=mask)  # the bits of +0.0 / -inf
    out = logits.numpy()  # (B, V), shares the logits' memory
    for row, add in zip(rows.tolist() if isinstance(rows, torch.Tensor) else rows, mask.view(np.float32)):
        out[row] += add
    return logits


def _xgrammar_kernel():
    """xgrammar's fused bitmask kernel (CUDA/Triton on GPUs), or None without xgrammar."""
    global _KERNEL
    if _KERNEL is _UNSET:
        try:
            from xgrammar import apply_token_bitmask_inplace as _KERNEL  # noqa: N811
        except ImportError:
            _KERNEL = None
    return _KERNEL


_UNSET = object()
_KERNEL: object = _UNSET


@dataclass
class TokenBitmaskProcessor:
    """The logits processor for a per-step token bitmask (structured outputs): one batched call
    over the constrained rows, in place.

    On the CPU that is ``apply_token_bitmask_cpu_`` (the torch ops of ``apply_token_bitmask`` for
    other dtypes and layouts); elsewhere xgrammar's device kernel, or the torch ops without xgrammar.
    """

    rows: torch.Tensor  # (R,) int64 on the logits' device: rows the mask applies to
    bitmask: torch.Tensor  # (R, W) int32: row r's allowed tokens
    row_list: list[int] = field(default_factory=list)  # ``rows`` on the host (the device kernel's indices)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        narrow = self.bitmask.shape[-1] * 32 < logits.shape[-1]
        if logits.device.type == "cpu":
            if narrow or logits.dtype != torch.float32 or not logits.is_contiguous() or sys.byteorder != "little":
                return apply_token_bitmask(logits, self.rows, self.bitmask)
            return apply_token_bitmask_cpu_(logits, self.row_list or self.rows, self.bitmask)
        kernel = _xgrammar_kernel()
        if kernel is None or narrow:
            return apply_token_bitmask(logits, self.rows, self.bitmask)
        full = torch.full((logits.shape[0], self.bitmask.shape[-1]), -1, dtype=torch.int32,
                          device=logits.device)  # (B, W): all allowed, then the constrained rows
        full[self.rows] = self.bitmask
        kernel(logits, full, vocab_size=logits.shape[-1], indices=self.row_list or self.rows.tolist())
        return logits


def apply_min_tokens(logits: torch.Tensor, mask: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if mask is None:
        return logits
    rows, ids = mask
    out = logits.clone()
    out[rows, ids] = _NEG_INF
    return out


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor | None,
                             penalty: torch.Tensor | None) -> torch.Tensor:
    """HF semantics on every seen token: a positive logit is divided by p, any other multiplied."""
    if penalty is None or seen is None:
        return logits
    p = penalty[:, None]  # (B, 1)
    return torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)


def apply_frequency_presence_penalties(logits: torch.Tensor, counts: torch.Tensor | None,
                                       frequency: torch.Tensor | None,
                                       presence: torch.Tensor | None) -> torch.Tensor:
    """OpenAI semantics over output tokens: logit -= frequency * count + presence * (count > 0)."""
    if counts is None or frequency is None or presence is None:
        return logits
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor | None) -> torch.Tensor:
    return logits if temperature is None else logits / temperature[:, None]  # (B, V) / (B, 1)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor | None, max_top_k: int) -> torch.Tensor:
    """top_k without a full sort; keeps exactly the set the stable sort in apply_top_k_top_p keeps.

    That set is every token above the row's k-th value, then tokens tied with it in index order
    until k are kept. Rows with k >= V keep everything; ``max_top_k`` is the largest smaller k.
    """
    vocab = logits.shape[-1]
    if top_k is None or max_top_k >= vocab:
        return logits
    k = top_k.clamp(max=max_top_k)[:, None]  # (B, 1)
    kth = logits.topk(max_top_k, dim=-1).values.gather(-1, k - 1)  # (B, 1)
    above = logits > kth  # (B, V)
    tied = logits == kth  # (B, V)
    room = k - above.sum(dim=-1, keepdim=True)  # (B, 1): tied tokens that still fit
    keep = above | (tied & (tied.cumsum(dim=-1) <= room)) | (top_k[:, None] >= vocab)
    return torch.where(keep, logits, _NEG_INF)  # (B, V)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Keep the k best tokens, then the smallest prefix of what remains with mass >= p.

    Both cut by position in one stable descending sort, so tied logits cannot widen the set.
    """
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # (B, V) each
    if top_k is not None:
        positions = torch.arange(logits.shape[-1], device=logits.device)  # (V,)
        sorted_logits = sorted_logits.masked_fill(positions >= top_k[:, None], _NEG_INF)
    if top_p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V), monotone by construction
        # Drop a token once the strictly better ones already reach p; position 0 always stays.
        # Rows with p == 1 keep everything: rounding can make cum hit 1.0 before the tail.
        reached = (cum[:, :-1] >= top_p[:, None]) & (top_p[:, None] < 1.0)  # (B, V - 1)
        drop = torch.cat([torch.zeros_like(reached[:, :1]), reached], dim=-1)  # (B, V)
        sorted_logits = sorted_logits.masked_fill(drop, _NEG_INF)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor | None) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability."""
    if min_p is None:
        return logits
    probs = logits.softmax(dim=-1)  # (B, V)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]  # (B, 1)
    return torch.where(probs >= threshold, logits, _NEG_INF)  # (B, V)


def exponential_race(probs: torch.Tensor, seeds: list[tuple[int, int]], any_unseeded: bool) -> torch.Tensor:
    """Sample each row from ``probs`` as argmax(probs / q) with q ~ Exp(1) per entry.

    Unseeded rows share one batched draw from the default generator; each seeded row draws its
    own q from a generator seeded with its step seed, so its token ignores its neighbours.
    """
    u = torch.rand_like(probs) if any_unseeded else torch.full_like(probs, 0.5)  # (B, V)
    for row, seed in seeds:
        u[row].uniform_(generator=torch.Generator(device=probs.device).manual_seed(seed))
    # Exp(1) by inversion, a few times faster than exponential_() on CPU. U = 0 gives q = inf, a
    # sure loss; the clamp keeps q > 0 so a zero-probability token never scores 0/0 = NaN.
    q = u.log_().neg_().clamp_min_(torch.finfo(u.dtype).tiny)  # (B, V)
    return (probs / q).argmax(dim=-1)  # (B,)


def _filtered_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Penalised logits -> temperature, top_k / top_p, min_p: the logits random rows sample from."""
    logits = apply_temperature(logits, meta.temperature)
    if meta.top_p is None:
        logits = apply_top_k(logits, meta.top_k, meta.max_top_k)
    else:
        logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
    return apply_min_p(logits, meta.min_p)


def _sample(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """(B,) int64 tokens from penalised logits: argmax for greedy rows, the race for the rest."""
    if meta.all_greedy:
        return logits.argmax(dim=-1)
    greedy_tokens = logits.argmax(dim=-1) if meta.greedy is not None else None  # (B,)
    probs = _filtered_logits(logits, meta).softmax(dim=-1)
    sampled = exponential_race(probs, meta.seeds, meta.any_unseeded_random)
    if greedy_tokens is None:
        return sampled
    return torch.where(meta.greedy, greedy_tokens, sampled)  # greedy rows drew nothing of use


def plain_greedy(reqs: list[ScheduledRequest], token_bitmask: TokenBitmask | None) -> bool:
    """True when argmax is the whole pipeline for these rows: every row greedy, no logprobs, no
    penalties, no min_tokens still pending and no token bitmask. Then ``greedy_tokens`` gives the
    very tokens ``Sampler`` would, without building ``SamplingMetadata``."""
    if token_bitmask is not None and token_bitmask.req_ids:
        return False
    for r in reqs:
        p = r.sampling_params
        if (p.temperature != 0.0 or p.logprobs is not None or p.needs_penalties
                or len(r.output_token_ids) < p.min_tokens):
            return False
    return True


def greedy_tokens(logits: torch.Tensor) -> tuple[list[int], list[TokenLogprobs | None]]:
    """(B, V) logits -> the argmax of each row (one host copy), and no logprobs."""
    return logits.argmax(dim=-1).tolist(), [None] * logits.shape[0]


def _probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """(B, V) float32: the distribution ``_sample`` draws each row from; one-hot argmax on greedy rows."""
    greedy = torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)  # (B, V)
    if meta.all_greedy:
        return greedy
    probs = _filtered_logits(logits, meta).softmax(dim=-1)
    return probs if meta.greedy is None else torch.where(meta.greedy[:, None], greedy, probs)


class Sampler:
    """Turns one step's logits into tokens; a plain callable with no state between steps."""

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits: (B, V) raw model logits, one row per request in ``reqs`` order; logits
        processors may overwrite them.

        Returns the sampled token ids and per-row logprobs (None where not requested).
        """
        self._check_shape(logits, meta)
        if meta.batch_size == 0:
            return [], []
        logits = logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if meta.max_num_logprobs is not None else None
        tokens = _sample(_process(logits, meta), meta)
        return _to_host(tokens, raw_logprobs, meta)

    def probs(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """(B, V) float32 probabilities each row would be sampled from (one-hot argmax for greedy rows).

        The rejection sampler of speculative decoding needs the distribution, not a draw from it.
        """
        self._check_shape(logits, meta)
        return _probs(_process(logits.float(), meta), meta)

    @staticmethod
    def _check_shape(logits: torch.Tensor, meta: SamplingMetadata) -> None:
        if logits.dim() != 2 or tuple(logits.shape) != (meta.batch_size, meta.vocab_size):
            raise ValueError(f"logits must have shape ({meta.batch_size}, {meta.vocab_size}), "
                             f"got {tuple(logits.shape)}")


def _process(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Logits processors, min_tokens and penalties, in vLLM's order."""
    for process in meta.logits_processors:
        logits = process(logits)
    logits = apply_min_tokens(logits, meta.min_tokens_mask)
    logits = apply_repetition_penalty(logits, meta.seen_tokens, meta.repetition_penalty)
    return apply_frequency_presence_penalties(logits, meta.output_counts, meta.frequency_penalty,
                                              meta.presence_penalty)


def _to_host(tokens: torch.Tensor, raw_logprobs: torch.Tensor | None,
             meta: SamplingMetadata) -> tuple[list[int], list[TokenLogprobs | None]]:
    """The step's single device→host copy, then plain-Python unpacking."""
    if raw_logprobs is None or meta.max_num_logprobs is None:
        return tokens.tolist(), [None] * meta.batch_size
    n = meta.max_num_logprobs
    rows = _pack_logprobs(tokens, raw_logprobs, n).tolist()
    token_ids = [int(row[0]) for row in rows]
    logprobs = [None if k is None else _token_logprobs(row, k, n) for row, k in zip(rows, meta.num_logprobs)]
    return token_ids, logprobs


def _pack_logprobs(tokens: torch.Tensor, raw_logprobs: torch.Tensor, n: int) -> torch.Tensor:
    """(B, 3 + 2n) float64: token, its logprob, its rank, n top logprobs, n top ids.

    float64 holds every token id and float32 logprob exactly, so one copy carries them all.
    """
    chosen = raw_logprobs.gather(-1, tokens[:, None])  # (B, 1)
    rank = (raw_logprobs > chosen).sum(dim=-1, keepdim=True) + 1  # (B, 1); 1 = most likely
    top_values, top_ids = raw_logprobs.topk(n, dim=-1)  # (B, n) each
    parts = (tokens[:, None], chosen, rank, top_values, top_ids)
    return torch.cat([p.to(torch.float64) for p in parts], dim=-1)


def _token_logprobs(row: list[float], k: int, n: int) -> TokenLogprobs:
    top_values, top_ids = row[3:3 + k], row[3 + n:3 + n + k]
    return TokenLogprobs(token_ids=[int(row[0]), *(int(t) for t in top_ids)],
                         logprobs=[row[1], *top_values], chosen_rank=int(row[2]))
