"""Tests for the batched sampler: exact checks plus fixed-seed statistical checks."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tureen.engine.messages import ScheduledRequest
from tureen.executor.sampler import (
    Sampler,
    SamplingMetadata,
    apply_frequency_presence_penalties,
    apply_min_p,
    apply_min_tokens,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_k_top_p,
)
from tureen.sampling_params import SamplingParams

CPU = torch.device("cpu")


def make_req(i: int = 0, *, prompt=(1, 2, 3), output=(), step_seed=None, eos=(), **params) -> ScheduledRequest:
    sp = SamplingParams(**params)
    sp.eos_token_ids = list(eos)
    return ScheduledRequest(req_id=f"r{i}", token_ids=[0], start_pos=0, block_ids=[0], sample=True,
                            sampling_params=sp, prompt_token_ids=list(prompt), output_token_ids=list(output),
                            step_seed=step_seed)


def sample(logits: torch.Tensor, reqs: list[ScheduledRequest]):
    meta = SamplingMetadata.from_requests(reqs, logits.shape[-1], CPU)
    return Sampler()(logits, meta)


def draw(logits_row: torch.Tensor, n: int, **params) -> Counter:
    """n independent draws for one logits row: n identical rows in a single batch."""
    reqs = [make_req(i, **params) for i in range(n)]
    tokens, _ = sample(logits_row.expand(n, -1).clone(), reqs)
    return Counter(tokens)


def chi_square_critical(df: int, z: float = 3.9) -> float:
    """Upper chi-square quantile (Wilson-Hilferty); z=3.9 is a one-sided tail of about 5e-5."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def chi_square(counts: Counter, probs: dict[int, float], n: int) -> float:
    assert all(n * p >= 5 for p in probs.values()), "expected counts too small for chi-square"
    return sum((counts.get(t, 0) - n * p) ** 2 / (n * p) for t, p in probs.items())


def assert_matches(counts: Counter, probs: dict[int, float], n: int) -> None:
    assert set(counts) <= set(probs), f"emitted tokens outside the support: {set(counts) - set(probs)}"
    stat, crit = chi_square(counts, probs, n), chi_square_critical(len(probs) - 1)
    assert stat < crit, f"chi-square {stat:.1f} >= {crit:.1f}: frequencies do not match"


def softmax_dict(logits: torch.Tensor, keep: list[int] | None = None) -> dict[int, float]:
    probs = torch.softmax(logits.double(), -1)
    keep = list(range(len(probs))) if keep is None else keep
    total = float(probs[keep].sum())
    return {t: float(probs[t]) / total for t in keep}


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(1234)


# ---- greedy -------------------------------------------------------------------------------

def test_all_greedy_batch_is_argmax_and_draws_no_randomness():
    logits = torch.randn(8, 50)
    rng_before = torch.get_rng_state()
    tokens, logprobs = sample(logits, [make_req(i, temperature=0.0) for i in range(8)])
    assert tokens == logits.argmax(-1).tolist()
    assert logprobs == [None] * 8
    assert torch.equal(torch.get_rng_state(), rng_before)  # argmax only: no random draw


def test_greedy_rows_in_a_mixed_batch_are_argmax():
    logits = torch.randn(6, 40)
    reqs = [make_req(i, temperature=0.0 if i % 2 == 0 else 1.3, top_k=5, top_p=0.9) for i in range(6)]
    for seed in range(5):
        torch.manual_seed(seed)
        tokens, _ = sample(logits, reqs)
        assert [tokens[i] for i in (0, 2, 4)] == logits[[0, 2, 4]].argmax(-1).tolist()


# ---- temperature, top_k, top_p, min_p ------------------------------------------------------

def test_temperature_sampling_matches_softmax_over_temperature():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, 1.5, -1.0, 0.2])
    n = 20_000
    counts = draw(logits, n, temperature=0.6)
    assert_matches(counts, softmax_dict(logits / 0.6), n)
    # The check has power: the same draws are rejected against the untempered distribution.
    assert chi_square(counts, softmax_dict(logits), n) > chi_square_critical(7)


def test_top_k_never_emits_outside_the_top_k_and_renormalises():
    logits = torch.randn(40) * 2
    k, n = 5, 20_000
    counts = draw(logits, n, temperature=1.5, top_k=k)
    top = logits.topk(k).indices.tolist()
    assert_matches(counts, softmax_dict(logits / 1.5, top), n)


def test_top_k_with_ties_at_the_boundary_keeps_exactly_k_tokens():
    logits = torch.zeros(30)
    logits[[3, 17]] = 2.0
    logits[[1, 5, 9, 22, 28]] = 1.0  # five-way tie straddling position k=4
    counts = draw(logits, 5_000, temperature=2.0, top_k=4)
    assert len(counts) == 4
    assert {3, 17} <= set(counts) and set(counts) <= {3, 17, 1, 5, 9, 22, 28}
    everything_tied = apply_top_k_top_p(torch.zeros(3, 16), torch.tensor([1, 3, 16]), None)
    assert torch.isfinite(everything_tied).sum(-1).tolist() == [1, 3, 16]


def test_top_k_fast_path_keeps_the_same_set_as_the_stable_sort():
    gen = torch.Generator().manual_seed(9)
    vocab = 50
    logits = torch.randint(0, 6, (12, vocab), generator=gen).float()  # (12, V), full of ties
    logits[3, :10] = -math.inf  # min_tokens-style masked entries
    top_k = torch.tensor([1, 2, 3, 5, 8, 13, 21, 34, 49, 50, 50, 7])
    fast = apply_top_k(logits, top_k, max_top_k=49)
    assert torch.equal(fast, apply_top_k_top_p(logits, top_k, None))
    kept = torch.isfinite(fast).sum(-1)
    assert kept[[0, 1, 2, 4, 11]].tolist() == [1, 2, 3, 8, 7] and kept[9:11].tolist() == [vocab, vocab]


def test_top_p_keeps_the_smallest_nucleus_and_renormalises():
    probs = torch.tensor([0.35, 0.25, 0.15, 0.10, 0.06, 0.05, 0.04])
    logits = probs.log()
    n = 20_000
    # mass 0.35 + 0.25 = 0.60 < 0.7 <= 0.75: the nucleus is exactly the first three tokens.
    counts = draw(logits, n, top_p=0.7)
    assert_matches(counts, softmax_dict(logits, [0, 1, 2]), n)
    assert set(draw(logits, 2_000, top_p=0.3)) == {0}  # the best token alone already has mass >= p


def test_top_p_with_ties_keeps_the_smallest_set():
    quarter = torch.full((2, 4), 0.25).log()
    kept = apply_top_k_top_p(quarter, None, torch.tensor([0.5, 0.51]))
    assert torch.isfinite(kept).sum(-1).tolist() == [2, 3]
    counts = draw(torch.tensor([0.3, 0.3, 0.3, 0.1]).log(), 4_000, top_p=0.5)
    assert len(counts) == 2  # two of the three tied tokens make mass 0.6 >= 0.5


def test_top_p_of_one_keeps_the_whole_tail():
    logits = torch.zeros(1, 12)
    logits[0, 0] = 20.0  # the head's float32 probability rounds to 1.0, the tail is ~2e-9 each
    kept = apply_top_k_top_p(logits, None, torch.tensor([1.0]))
    assert torch.isfinite(kept).all()
    assert torch.isfinite(apply_top_k_top_p(logits, None, torch.tensor([0.5]))).sum() == 1


def test_top_k_and_top_p_compose():
    probs = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.10])
    n = 20_000
    # top_k=3 renormalises to 0.40, 0.33, 0.27; then top_p=0.7 needs all three (0.40 + 0.33 < 0.75).
    counts = draw(probs.log(), n, top_k=3, top_p=0.75)
    assert_matches(counts, softmax_dict(probs.log(), [0, 1, 2]), n)
    assert set(draw(probs.log(), 4_000, top_k=3, top_p=0.7)) == {0, 1}


def test_min_p_drops_tokens_below_the_scaled_maximum():
    probs = torch.tensor([0.5, 0.2, 0.14, 0.1, 0.06])
    n = 20_000
    counts = draw(probs.log(), n, min_p=0.3)  # threshold 0.15: only tokens 0 and 1 survive
    assert_matches(counts, softmax_dict(probs.log(), [0, 1]), n)
    ties = apply_min_p(torch.zeros(1, 6), torch.tensor([1.0]))
    assert torch.isfinite(ties).all()  # min_p = 1 keeps every token tied at the maximum


# ---- seeds ---------------------------------------------------------------------------------

@pytest.mark.parametrize("params,min_distinct", [
    (dict(temperature=0.9, top_p=0.95), 10),
    (dict(temperature=0.9, top_k=6), 4),  # top_k fast path in batch A, sort path in batch B
])
def test_seeded_rows_reproduce_at_any_position_with_any_neighbours(params, min_distinct):
    torch.manual_seed(0)
    target = torch.randint(0, 4, (64,)).float() * 0.5  # (V,) many ties, like low-precision logits
    results = []
    for seed in range(30):
        batch_a = [make_req(0, step_seed=seed, **params), make_req(1, temperature=0.0),
                   make_req(2, step_seed=seed + 1000)]
        logits_a = torch.cat([target[None], torch.randn(2, 64)])  # (3, V)
        batch_b = [make_req(0, top_k=3, top_p=0.8, temperature=0.5), make_req(1, repetition_penalty=1.3, output=[4, 5]),
                   make_req(2, min_p=0.2), make_req(3, logprobs=2, step_seed=7),
                   make_req(4, step_seed=seed, **params), make_req(5, presence_penalty=0.5, output=[1])]
        logits_b = torch.cat([torch.randn(4, 64), target[None], torch.randn(1, 64)])  # (6, V)
        torch.manual_seed(seed + 1)
        token_a = sample(logits_a, batch_a)[0][0]
        torch.manual_seed(seed + 2)  # a different global RNG state must not matter either
        token_b = sample(logits_b, batch_b)[0][4]
        assert token_a == token_b, f"seed {seed}: {token_a} != {token_b}"
        results.append(token_a)
    assert len(set(results)) >= min_distinct  # the seed, not the logits alone, picks the token


def test_seeded_draws_follow_the_distribution():
    logits = torch.tensor([0.0, 1.0, 0.5, -0.5, 1.5])
    n = 4_000
    reqs = [make_req(i, step_seed=i, temperature=1.0) for i in range(n)]
    tokens, _ = sample(logits.expand(n, -1).clone(), reqs)
    assert_matches(Counter(tokens), softmax_dict(logits), n)


def test_any_integer_seed_is_accepted():
    logits = torch.randn(3, 10)
    reqs = [make_req(i, step_seed=s) for i, s in enumerate((-1, 2**70 + 3, 0))]
    first, _ = sample(logits, reqs)
    again, _ = sample(logits, reqs)
    assert first == again


# ---- penalties and min_tokens ----------------------------------------------------------------

def reference_penalties(row: list[float], prompt: list[int], output: list[int], rep: float, freq: float,
                        pres: float) -> list[float]:
    out = list(row)
    for t in set(prompt) | set(output):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in set(output):
        out[t] -= freq * output.count(t) + pres
    return out


def test_penalties_match_a_reference_implementation():
    gen = torch.Generator().manual_seed(3)
    vocab = 30
    cases = [(1.0, 0.0, 0.0), (1.5, 0.0, 0.0), (0.7, 0.4, 0.0), (1.0, 0.6, 1.2), (2.0, -0.5, -1.0), (1.2, 0.0, 0.3)]
    logits = torch.randn(len(cases), vocab, generator=gen) * 3
    reqs, expected = [], []
    for i, (rep, freq, pres) in enumerate(cases):
        prompt = torch.randint(0, vocab, (12,), generator=gen).tolist()
        output = torch.randint(0, vocab, (9,), generator=gen).tolist()
        reqs.append(make_req(i, prompt=prompt, output=output, temperature=0.0, repetition_penalty=rep,
                             frequency_penalty=freq, presence_penalty=pres))
        expected.append(reference_penalties(logits[i].tolist(), prompt, output, rep, freq, pres))
    meta = SamplingMetadata.from_requests(reqs, vocab, CPU)
    got = apply_repetition_penalty(logits, meta.seen_tokens, meta.repetition_penalty)
    got = apply_frequency_presence_penalties(got, meta.output_counts, meta.frequency_penalty,
                                             meta.presence_penalty)
    torch.testing.assert_close(got, torch.tensor(expected))
    tokens, _ = Sampler()(logits, meta)
    assert tokens == torch.tensor(expected).argmax(-1).tolist()


def test_penalties_change_greedy_choices():
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0]] * 3)
    reqs = [make_req(0, prompt=[0], temperature=0.0, repetition_penalty=1.2),  # 3.0/1.2 < 2.9
            make_req(1, prompt=[], output=[0], temperature=0.0, presence_penalty=0.2),
            make_req(2, prompt=[], output=[1, 1, 1], temperature=0.0, frequency_penalty=0.01)]
    assert sample(logits, reqs)[0] == [1, 1, 0]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 1.0, 0.5, 5.0, 0.0, 4.0]] * 4)  # EOS 3 and stop id 5 lead
    common = dict(temperature=0.0, min_tokens=2, eos=[3], stop_token_ids=[5])
    reqs = [make_req(0, output=[], **common), make_req(1, output=[1], **common),
            make_req(2, output=[1, 2], **common), make_req(3, output=[], ignore_eos=True, **common)]
    assert sample(logits, reqs)[0] == [1, 1, 3, 1]
    counts = draw(logits[0], 3_000, min_tokens=1, eos=[3], stop_token_ids=[5])
    assert 3 not in counts and 5 not in counts and len(counts) == 4
    out = apply_min_tokens(logits, (torch.tensor([0, 2]), torch.tensor([3, 5])))
    assert out[0, 3] == -math.inf and out[2, 5] == -math.inf and torch.isfinite(logits).all()


# ---- logprobs ------------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_with_correct_ranks():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 25, generator=gen) * 2
    reqs = [make_req(0, logprobs=3, temperature=0.8, repetition_penalty=1.5, prompt=[0, 1, 2], top_k=10),
            make_req(1),
            make_req(2, logprobs=0, temperature=0.0),
            make_req(3, logprobs=5, temperature=2.0, step_seed=11)]
    expected = torch.log_softmax(logits, -1)
    for seed in range(10):
        torch.manual_seed(seed)
        tokens, logprobs = sample(logits, reqs)
        assert logprobs[1] is None
        assert tokens[2] == int(logits[2].argmax()) and logprobs[2].token_ids == [tokens[2]]
        assert logprobs[2].chosen_rank == 1
        for row, k in ((0, 3), (3, 5)):
            lp = logprobs[row]
            assert lp.token_ids[0] == tokens[row] and len(lp.token_ids) == len(lp.logprobs) == k + 1
            assert lp.logprobs[0] == pytest.approx(float(expected[row, tokens[row]]), abs=1e-6)
            assert lp.chosen_rank == 1 + int((expected[row] > expected[row, tokens[row]]).sum())
            top = expected[row].topk(k)
            assert lp.token_ids[1:] == top.indices.tolist()
            assert lp.logprobs[1:] == pytest.approx(top.values.tolist(), abs=1e-6)


# ---- the hot path --------------------------------------------------------------------------

class _CountScalarReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:  # .item(), bool(t), int(t)
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("with_logprobs", [False, True])
def test_one_host_transfer_per_step(monkeypatch, with_logprobs):
    logits = torch.randn(6, 32)
    lp = 2 if with_logprobs else None
    reqs = [make_req(0, temperature=0.0, logprobs=lp), make_req(1, top_k=4, step_seed=1),
            make_req(2, top_p=0.8, repetition_penalty=1.2, output=[3]), make_req(3, min_p=0.1, min_tokens=3, eos=[2]),
            make_req(4, temperature=0.7, frequency_penalty=0.5, output=[1, 1]), make_req(5, logprobs=lp)]
    meta = SamplingMetadata.from_requests(reqs, 32, CPU)
    copies = Counter()
    for name in ("tolist", "cpu", "numpy", "item"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **kw):
            copies[_name] += 1
            return _original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    with _CountScalarReads() as mode:
        tokens, logprobs = Sampler()(logits, meta)
    assert copies == Counter(tolist=1) and mode.reads == 0
    assert len(tokens) == 6 and (logprobs[0] is not None) == with_logprobs


def test_stages_are_skipped_when_no_row_needs_them():
    plain = SamplingMetadata.from_requests([make_req(i) for i in range(3)], 16, CPU)
    skipped = ("greedy", "temperature", "top_k", "top_p", "min_p", "min_tokens_mask", "repetition_penalty",
               "seen_tokens", "frequency_penalty", "presence_penalty", "output_counts", "max_num_logprobs")
    assert all(getattr(plain, f) is None for f in skipped)
    assert plain.any_unseeded_random and not plain.all_greedy and plain.seeds == []
    greedy = SamplingMetadata.from_requests([make_req(i, temperature=0.0, top_k=3) for i in range(2)], 16, CPU)
    assert greedy.all_greedy and greedy.top_k is None and not greedy.any_unseeded_random
    presence_only = SamplingMetadata.from_requests([make_req(0, presence_penalty=1.0, output=[1])], 16, CPU)
    assert presence_only.seen_tokens is None and presence_only.output_counts is not None


def test_input_logits_are_not_modified():
    logits = torch.randn(3, 20)
    before = logits.clone()
    sample(logits, [make_req(0, repetition_penalty=2.0, output=[1]), make_req(1, min_tokens=2, eos=[0]),
                    make_req(2, top_k=2, top_p=0.5, min_p=0.3, temperature=0.3)])
    assert torch.equal(logits, before)


# ---- bad input -----------------------------------------------------------------------------

def test_bad_shapes_and_sizes_raise_clear_errors():
    meta = SamplingMetadata.from_requests([make_req(0), make_req(1)], 10, CPU)
    with pytest.raises(ValueError, match=r"shape \(2, 10\)"):
        Sampler()(torch.randn(3, 10), meta)
    with pytest.raises(ValueError, match=r"shape \(2, 10\)"):
        Sampler()(torch.randn(2, 11), meta)
    with pytest.raises(ValueError, match="vocab_size"):
        SamplingMetadata.from_requests([make_req(0)], 0, CPU)


def test_empty_batch_and_out_of_range_ids_do_not_crash():
    assert sample(torch.empty(0, 8), []) == ([], [])
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    req = make_req(0, prompt=[1, 99, -4], output=[1, 1000], temperature=0.0, repetition_penalty=10.0,
                   min_tokens=5, stop_token_ids=[4000], eos=[77])
    assert sample(logits, [req])[0] == [3]  # token 1 penalised to 0.3; bad ids ignored
