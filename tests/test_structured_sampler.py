"""The sampler's logits-processor seam: a per-step packed token bitmask from the scheduler's output."""

from __future__ import annotations

import torch

from tureen.engine.messages import ScheduledRequest, TokenBitmask
from tureen.executor.sampler import (Sampler, SamplingMetadata, TokenBitmaskProcessor, apply_token_bitmask,
                                     unpack_token_bitmask)
from tureen.sampling_params import SamplingParams

CPU = torch.device("cpu")


def make_req(i: int, **params) -> ScheduledRequest:
    return ScheduledRequest(req_id=f"r{i}", token_ids=[0], start_pos=0, block_ids=[0], sample=True,
                            sampling_params=SamplingParams(**params), prompt_token_ids=[1], output_token_ids=[])


def pack(allowed: list[list[int]], vocab: int) -> torch.Tensor:
    """Reference packing, bit by bit: bit j of word w allows token 32 w + j."""
    words = -(-vocab // 32)
    out = torch.zeros(len(allowed), words, dtype=torch.int64)
    for r, ids in enumerate(allowed):
        for t in ids:
            out[r, t // 32] |= 1 << (t % 32)
    out = torch.where(out >= 2**31, out - 2**32, out)  # as signed 32-bit words
    return out.to(torch.int32)


def test_unpack_matches_the_bit_layout_including_the_sign_bit():
    allowed = [[0, 31, 32, 63, 69], [5], []]
    mask = unpack_token_bitmask(pack(allowed, 70), 70)
    assert mask.shape == (3, 70)
    for r, ids in enumerate(allowed):
        assert mask[r].nonzero().flatten().tolist() == sorted(ids)


def test_apply_bans_only_the_listed_rows_and_leaves_the_input_alone():
    logits = torch.randn(3, 40)
    before = logits.clone()
    out = apply_token_bitmask(logits, torch.tensor([2, 0]), pack([[7, 8], [39]], 40))
    assert torch.equal(logits, before)
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [7, 8]
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [39]
    assert torch.equal(out[1], before[1])


def test_sampler_draws_only_allowed_tokens_greedy_and_random():
    vocab = 50
    logits = torch.randn(4, vocab)
    reqs = [make_req(0, temperature=0.0), make_req(1, temperature=1.0), make_req(2, temperature=0.7, top_p=0.9),
            make_req(3, temperature=0.0)]
    allowed = {"r0": [3, 4], "r1": [10, 20, 30], "r2": [49]}
    bitmask = TokenBitmask(list(allowed), pack(list(allowed.values()), vocab))
    for _ in range(20):
        meta = SamplingMetadata.from_requests(reqs, vocab, CPU, bitmask)
        tokens, _ = Sampler()(logits, meta)
        assert tokens[0] == max(allowed["r0"], key=lambda t: logits[0, t].item())
        assert tokens[1] in allowed["r1"] and tokens[2] == 49
        assert tokens[3] == int(logits[3].argmax())  # unconstrained row: plain greedy


def test_no_bitmask_builds_no_processor_and_unscheduled_rows_are_dropped():
    reqs = [make_req(0), make_req(1)]
    assert SamplingMetadata.from_requests(reqs, 16, CPU).logits_processors == []
    gone = TokenBitmask(["elsewhere"], pack([[1]], 16))
    assert SamplingMetadata.from_requests(reqs, 16, CPU, gone).logits_processors == []
    partly = TokenBitmask(["elsewhere", "r1"], pack([[1], [2, 3]], 16))
    (proc,) = SamplingMetadata.from_requests(reqs, 16, CPU, partly).logits_processors
    assert proc.rows.tolist() == [1]
    assert unpack_token_bitmask(proc.bitmask, 16)[0].nonzero().flatten().tolist() == [2, 3]


def test_logprobs_stay_the_models_own_under_a_mask():
    logits = torch.randn(1, 20)
    expected = logits.log_softmax(-1)[0, 5].item()
    meta = SamplingMetadata.from_requests([make_req(0, temperature=0.0, logprobs=2)], 20, CPU,
                                          TokenBitmask(["r0"], pack([[5]], 20)))
    tokens, logprobs = Sampler()(logits, meta)  # the sampler may mask its logits in place
    assert tokens == [5]
    assert abs(logprobs[0].logprobs[0] - expected) < 1e-5


def test_the_cpu_path_the_xgrammar_kernel_and_the_torch_reference_agree():
    import xgrammar

    vocab = 1000  # not a multiple of 32: the last word's high bits lie past the vocabulary
    logits = torch.randn(6, vocab)
    allowed = [[int(t) for t in torch.randperm(vocab)[:k]] + [992, 999] for k in (1, 40, 997)]
    bitmask = TokenBitmask(["r1", "r3", "r4"], pack(allowed, vocab))
    reqs = [make_req(i) for i in range(6)]
    (proc,) = SamplingMetadata.from_requests(reqs, vocab, CPU, bitmask).logits_processors
    reference = apply_token_bitmask(logits, proc.rows, proc.bitmask)
    cpu = proc(logits.clone())
    assert torch.equal(cpu, reference)
    full = torch.full((6, bitmask.bitmask.shape[1]), -1, dtype=torch.int32)
    full[proc.rows] = proc.bitmask
    kernel = logits.clone()
    xgrammar.apply_token_bitmask_inplace(kernel, full, vocab_size=vocab, indices=proc.row_list)
    assert torch.equal(kernel, reference)
    assert torch.equal(torch.isfinite(cpu[3]).nonzero().flatten(), torch.tensor(sorted(set(allowed[1]))))
    assert torch.equal(cpu[0], logits[0]) and torch.equal(cpu[5], logits[5])


def test_the_cpu_path_masks_in_place_and_other_layouts_fall_back():
    vocab = 70
    logits = torch.randn(3, vocab)
    proc = TokenBitmaskProcessor(torch.tensor([2, 0]), pack([[7, 8], [69]], vocab), [2, 0])
    out = proc(logits)
    assert out is logits  # in place: the sampler owns its logits
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [7, 8]
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [69]
    wide = torch.randn(vocab, 3).t()  # non-contiguous rows: the torch ops, same bans
    masked = proc(wide)
    assert torch.isfinite(masked[2]).nonzero().flatten().tolist() == [7, 8]
    assert torch.equal(masked[1], wide[1])
