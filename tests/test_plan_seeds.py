"""The planner reproduces the worked examples of the capacity-planning guides (the seeds).

The guides size GPUs by their spec-sheet memory (an A100 "80 GB" is 80 x 10^9 bytes), so the
examples that depend on the memory total plan with ``memory_basis="nominal"``; the planner's
default is the total the device reports (see ``test_plan_gpu_memory.py``)."""

from __future__ import annotations

import pytest

from tureen.plan import estimate
from tureen.plan.cost import DAYS_PER_MONTH, cost_per_1k_tokens

GB = 1e9


def test_7b_fp16_weights_are_about_14_gb():
    assert estimate("llama-2-7b", params="7B", dtype="float16").weight_bytes == 14 * GB
    # the real Llama-2-7B (6.74 B parameters) is "about 14 GB" too
    assert estimate("llama-2-7b", dtype="float16").weight_bytes == pytest.approx(14 * GB, rel=0.05)


@pytest.mark.parametrize("quant, expected_gb", [("int8", 7.0), ("fp8", 7.0), ("int4", 3.5)])
def test_7b_quantized_weights(quant, expected_gb):
    weights = estimate("llama-2-7b", params="7B", dtype="float16", weight_quant=quant).weight_bytes
    # int4 also stores one float16 scale per 128 weights: 3.5 GB x (1 + 1/32)
    assert weights == pytest.approx(expected_gb * GB, rel=0.035)


def test_70b_bf16_weights_are_about_140_gb():
    assert estimate("llama-3-70b", dtype="bfloat16").weight_bytes == pytest.approx(140 * GB, rel=0.01)


@pytest.mark.parametrize("seq_len, expected_gb", [(2048, 1.07), (4096, 2.15)])
def test_llama2_7b_kv_cache_per_sequence(seq_len, expected_gb):
    e = estimate("llama-2-7b", dtype="float16", max_model_len=seq_len)
    assert e.kv_bytes_per_sequence == 2 * 32 * 32 * 128 * seq_len * 2
    assert e.kv_bytes_per_sequence == pytest.approx(expected_gb * GB, rel=0.005)


def test_llama3_70b_kv_cache_is_about_033_mb_per_token():
    e = estimate("llama-3-70b", dtype="bfloat16")
    assert e.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2 == 327_680
    assert e.kv_bytes_per_token == pytest.approx(0.33e6, rel=0.01)
    # 32 sequences of 4K context: about 42 GB on top of the weights
    assert 32 * 4096 * e.kv_bytes_per_token == pytest.approx(42 * GB, rel=0.03)


def test_7b_fp16_on_a100_80gb_leaves_63_gb_for_about_59_sequences():
    e = estimate("llama-2-7b", params="7B", dtype="float16", gpu="A100-80GB", overhead_gb=2.8,
                 gpu_memory_utilization=1.0, max_model_len=2048, memory_basis="nominal")
    assert e.kv_budget_bytes == pytest.approx(63.2 * GB)
    assert abs(e.max_concurrent_sequences - 59) <= 1  # 63.2 / 1.07 = 58.9, whole blocks give 58
    assert e.fits and e.min_gpus == 1


def test_7b_int4_on_a100_80gb_fits_about_34_sequences_at_4k():
    e = estimate("llama-2-7b", params="7B", dtype="float16", weight_quant="int4", gpu="A100-80GB",
                 overhead_gb=3.0, gpu_memory_utilization=1.0, max_model_len=4096, memory_basis="nominal")
    assert e.kv_budget_bytes == pytest.approx(73.5 * GB, rel=0.005)
    assert abs(e.max_concurrent_sequences - 34) <= 1


def test_7b_fp16_decode_ceiling_on_h100_is_about_240_tokens_per_s():
    e = estimate("llama-2-7b", params="7B", dtype="float16", gpu="H100-SXM", avg_prompt_len=1, avg_output_len=1)
    assert e.decode_tokens_per_s_batch1 == pytest.approx(238, rel=0.02)  # 3.35 TB/s / 14 GB


def test_7b_fp16_decode_ceiling_on_a100_is_about_140_tokens_per_s():
    e = estimate("llama-2-7b", params="7B", dtype="float16", gpu="A100-80GB", avg_prompt_len=1, avg_output_len=1)
    assert e.decode_tokens_per_s_batch1 == pytest.approx(140, rel=0.05)  # ~2 TB/s / 14 GB


def test_a100_at_3_dollars_doing_1000_tokens_per_s_costs_0_00083_per_1k():
    assert cost_per_1k_tokens(3.0, 1000) == pytest.approx(0.00083, rel=0.01)
    e = estimate("llama-2-7b", gpu="A100-80GB", gpu_price=3.0, utilization=1.0)
    assert e.cost_per_1k_output_tokens == pytest.approx(cost_per_1k_tokens(3.0, e.serving_tokens_per_s))


def test_self_hosting_an_a100_at_2_dollars_breaks_even_near_50m_tokens_a_day():
    """Seed: a ~$2/hr A100 costs ~$1,500/month; self-hosting pays above ~50M tokens/day at $0.001/1K."""
    e = estimate("llama-2-7b", gpu="A100-80GB", gpu_price=2.0, api_input_price=0.0, api_output_price=1.0)
    assert e.monthly_cost == pytest.approx(1500, rel=0.05)
    assert e.breakeven_tokens_per_day == pytest.approx(48e6, rel=0.05)
    assert e.breakeven_tokens_per_day < 100e6  # the seed's 100M tokens/day is past break-even


def test_breakeven_with_ops_matches_the_seed_request_example():
    """Seed: 2 GPUs at $12/hr plus ~$2,000 ops against $0.0085 per request (500 in, 200 out at
    $5 / $30 per 1M) break even at ~1.25M requests a month."""
    e = estimate("llama-2-7b", gpu="A100-80GB", num_gpus=2, gpu_price=6.0, avg_prompt_len=500, avg_output_len=200,
                 api_input_price=5.0, api_output_price=30.0, ops_hours_per_month=20, ops_hourly_rate=100)
    assert e.monthly_ops_cost == 2000
    requests_per_month = e.breakeven_tokens_per_day_with_ops * DAYS_PER_MONTH / 200
    assert requests_per_month == pytest.approx(1.25e6, rel=0.02)


@pytest.mark.parametrize("basis", ["nominal", "reported"])
def test_70b_bf16_needs_two_80gb_gpus_at_least(basis):
    e = estimate("llama-3-70b", gpu="H100-SXM", gpu_memory_utilization=1.0, memory_basis=basis)
    assert not e.fits and e.min_gpus == 2
    assert estimate("llama-3-70b", gpu="H100-SXM", num_gpus=2, gpu_memory_utilization=1.0, memory_basis=basis).fits
