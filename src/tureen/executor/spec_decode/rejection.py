"""Verifying drafted tokens so that the output distribution stays exactly the target's.

For a request with drafts ``d_1..d_k`` the runner has target logits at k + 1 positions: row j
predicts the token after ``d_j`` (row 0: after the last known token). Row j is sampled as if
``d_1..d_j`` were already output, so penalties, min_tokens and the seed stream act exactly as
they would without speculation. Then, position by position (Leviathan et al., Chen et al.)::

    accept d_{j+1} with probability min(1, p_j(d) / q_j(d))        q_j: the draft's distribution
    on the first rejection: emit a draw from normalise(max(0, p_j - q_j)) and stop
    if all k are accepted: emit a draw from p_k (the bonus token)

A proposer without probabilities (n-gram lookup) is a point mass, q_j = one_hot(d_{j+1}), so the
test is ``u < p_j(d)`` and the residual is p_j without d. Greedy rows are one-hot in p: a draft is
accepted iff it is the argmax, and the emitted token is the argmax, so greedy output is identical
with and without speculation.

Seeds: a seeded request draws its acceptance test and its emitted token at output index i from
generators seeded by its step seed for i (the acceptance test with a salted copy), so it
reproduces whatever the batch and however many tokens each step verifies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tureen.engine.messages import ScheduledRequest, TokenBitmask, TokenLogprobs
from tureen.executor.sampler import Sampler, SamplingMetadata, exponential_race, plain_greedy

_SEED_MASK = (1 << 64) - 1
_ACCEPT_SALT = 0x5851F42D4C957F2D  # the acceptance test's stream differs from the emitted token's


@dataclass
class Draft:
    """One request's proposal, as the rejection sampler sees it."""

    token_ids: list[int]  # k drafted tokens
    probs: torch.Tensor | None  # (k, V) draft distribution each was drawn from; None: point masses
    seeds: list[int | None]  # k + 1 step seeds (row j's), None for an unseeded request


def expand_rows(sr: ScheduledRequest) -> list[ScheduledRequest]:
    """The k + 1 sampling rows of a request with k drafts: row j as if d_1..d_j were output."""
    seeds = [sr.step_seed, *sr.spec_step_seeds]
    return [dataclasses.replace(sr, output_token_ids=sr.output_token_ids + sr.spec_token_ids[:j],
                                step_seed=seeds[j], spec_token_ids=[], draft_probs=None, spec_step_seeds=[])
            for j in range(len(sr.spec_token_ids) + 1)]


def verify_and_sample(sampler: Sampler, logits: torch.Tensor, reqs: list[ScheduledRequest], vocab_size: int,
                      device: torch.device, token_bitmask: TokenBitmask | None = None,
                      ) -> tuple[list[list[int]], list[list[TokenLogprobs | None]]]:
    """New tokens per request from a step whose logits rows are grouped by request (1 + k rows each).

    Requests without drafts go through the ordinary sampler (logprobs, token bitmask and all);
    requests with drafts through ``rejection_sample``. The engine keeps requests that want
    logprobs or a structured-output constraint out of speculation, so drafted rows need neither.
    """
    starts, row = [], 0
    for r in reqs:
        starts.append(row)
        row += r.num_sample_rows
    tokens: list[list[int]] = [[] for _ in reqs]
    logprobs: list[list[TokenLogprobs | None]] = [[] for _ in reqs]
    plain = [i for i, r in enumerate(reqs) if not r.spec_token_ids]
    if plain:
        meta = SamplingMetadata.from_requests([reqs[i] for i in plain], vocab_size, device, token_bitmask)
        sampled, lps = sampler(logits[[starts[i] for i in plain]], meta)
        for i, t, lp in zip(plain, sampled, lps):
            tokens[i], logprobs[i] = [t], [lp]
    spec = [i for i, r in enumerate(reqs) if r.spec_token_ids]
    # Row 0 has the shortest output: past min_tokens there, past it on every later row too.
    greedy_spec = [i for i in spec if plain_greedy([reqs[i]], None)]
    if greedy_spec:
        for i, new in zip(greedy_spec, greedy_verify(logits, [starts[i] for i in greedy_spec],
                                                     [reqs[i].spec_token_ids for i in greedy_spec])):
            tokens[i], logprobs[i] = new, [None] * len(new)
        spec = [i for i in spec if not plain_greedy([reqs[i]], None)]
    if spec:
        rows = [starts[i] + j for i in spec for j in range(reqs[i].num_sample_rows)]
        row_reqs = [row_req for i in spec for row_req in expand_rows(reqs[i])]
        meta = SamplingMetadata.from_requests(row_reqs, vocab_size, device)
        probs = sampler.probs(logits[rows], meta)  # (R, V)
        greedy = [reqs[i].sampling_params.temperature == 0.0 for i in spec]
        drafts = [Draft(reqs[i].spec_token_ids, reqs[i].draft_probs, [reqs[i].step_seed, *reqs[i].spec_step_seeds])
                  for i in spec]
        for i, new in zip(spec, rejection_sample(probs, drafts, greedy)):
            tokens[i], logprobs[i] = new, [None] * len(new)
    return tokens, logprobs


def greedy_verify(logits: torch.Tensor, starts: list[int], drafts: list[list[int]]) -> list[list[int]]:
    """New tokens for greedy requests whose sampling is the argmax alone (``plain_greedy``): the
    drafts up to the first that is not the target's argmax, then the argmax there (or the bonus
    token after the last row). What ``rejection_sample`` gives for one-hot target rows, whatever the
    draft distribution, at the cost of one argmax and one host copy."""
    rows = [start + j for start, d in zip(starts, drafts) for j in range(len(d) + 1)]
    best = logits[rows].argmax(dim=-1).tolist()
    out, row = [], 0
    for d in drafts:
        new = []
        for j, token in enumerate(d):
            new.append(best[row + j])
            if token != best[row + j]:
                break
        else:
            new.append(best[row + len(d)])
        out.append(new)
        row += len(d) + 1
    return out


def rejection_sample(target_probs: torch.Tensor, drafts: list[Draft], greedy: list[bool]) -> list[list[int]]:
    """New tokens for each draft: its accepted prefix, then one recovered or bonus token.

    ``target_probs`` is (R, V) with R = sum(k + 1): each draft's k + 1 rows in order (one-hot on
    greedy rows). One device-to-host copy for the whole batch.
    """
    device, vocab = target_probs.device, target_probs.shape[-1]
    spec_rows, bonus_rows, row = [], [], 0
    for d in drafts:
        spec_rows += range(row, row + len(d.token_ids))
        bonus_rows.append(row + len(d.token_ids))
        row += len(d.token_ids) + 1
    draft_ids = torch.tensor([t for d in drafts for t in d.token_ids], dtype=torch.long, device=device)  # (S,)
    q = _draft_probs(drafts, draft_ids, vocab)  # (S, V)
    p = target_probs[spec_rows]  # (S, V)
    p_x = p.gather(-1, draft_ids[:, None]).squeeze(-1)  # (S,)
    q_x = q.gather(-1, draft_ids[:, None]).squeeze(-1).clamp_min(torch.finfo(q.dtype).tiny)  # (S,)
    row_seeds = [s for d in drafts for s in d.seeds[:-1]]
    accept = _uniform(len(spec_rows), row_seeds, device) < p_x / q_x  # (S,)
    residual = (p - q).clamp_min_(0.0)  # (S, V); where p <= q everywhere rejection cannot happen
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    row_greedy = [g for d, g in zip(drafts, greedy) for _ in d.token_ids]
    recovered = _draw(residual, row_seeds, row_greedy, p)  # (S,)
    bonus = _draw(target_probs[bonus_rows], [d.seeds[-1] for d in drafts], greedy, target_probs[bonus_rows])  # (G,)
    host = torch.cat([accept.long(), recovered, bonus]).tolist()
    s = len(spec_rows)
    acc, rec, bon = host[:s], host[s:2 * s], host[2 * s:]
    out, pos = [], 0
    for g, d in enumerate(drafts):
        k = len(d.token_ids)
        new = []
        for j in range(k):
            if not acc[pos + j]:
                new.append(rec[pos + j])
                break
            new.append(d.token_ids[j])
        else:
            new.append(bon[g])
        out.append(new)
        pos += k
    return out


def _draft_probs(drafts: list[Draft], draft_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """(S, V) draft distributions: the proposer's where it has them, point masses elsewhere."""
    q = torch.nn.functional.one_hot(draft_ids, vocab).float()  # (S, V)
    row = 0
    for d in drafts:
        k = len(d.token_ids)
        if d.probs is not None:
            q[row:row + k] = d.probs[:k].to(q.device, q.dtype)
        row += k
    return q


def _uniform(n: int, seeds: list[int | None], device: torch.device) -> torch.Tensor:
    """(n,) U[0, 1): seeded rows from their own salted generator, the rest from the default one."""
    u = torch.rand(n, device=device) if any(s is None for s in seeds) else torch.empty(n, device=device)
    for i, seed in enumerate(seeds):
        if seed is not None:
            gen = torch.Generator(device=device).manual_seed((seed ^ _ACCEPT_SALT) & _SEED_MASK)
            u[i:i + 1].uniform_(generator=gen)
    return u


def _draw(weights: torch.Tensor, seeds: list[int | None], greedy: list[bool],
          greedy_probs: torch.Tensor) -> torch.Tensor:
    """(B,) one draw per row from unnormalised ``weights``; the argmax of ``greedy_probs`` on greedy rows."""
    if all(greedy):
        return greedy_probs.argmax(dim=-1)
    seeded = [(i, s & _SEED_MASK) for i, (s, g) in enumerate(zip(seeds, greedy)) if s is not None and not g]
    sampled = exponential_race(weights, seeded, any(s is None and not g for s, g in zip(seeds, greedy)))
    if not any(greedy):
        return sampled
    mask = torch.tensor(greedy, dtype=torch.bool, device=weights.device)
    return torch.where(mask, greedy_probs.argmax(dim=-1), sampled)
