"""The planner's arithmetic: quantization, KV dtype, tensor parallelism, speed, cost and options."""

from __future__ import annotations

import math

import pytest

from tureen.errors import ConfigError
from tureen.plan import CATALOGUE, PlanOptions, count_params, estimate, find_gpu
from tureen.plan.memory import bytes_per_quantized_weight, valid_tensor_parallel
from tureen.plan.options import parse_count
from tureen.plan.source import load_arch

ISSUE_JSON_FIELDS = ("params", "weight_bytes", "kv_bytes_per_token", "kv_bytes_per_sequence", "kv_budget_bytes",
                     "max_concurrent_sequences", "fits", "min_gpus", "decode_tokens_per_s_batch1",
                     "decode_tokens_per_s_batch", "prefill_seconds", "cost_per_1k_output_tokens", "monthly_cost",
                     "breakeven_tokens_per_day", "num_kv_blocks")


def test_result_carries_every_named_field():
    d = estimate("qwen3-8b", gpu="H100-SXM").to_dict()
    for name in ISSUE_JSON_FIELDS:
        assert name in d and d[name] is not None, name


def test_quantization_shrinks_only_the_linear_weights():
    arch = load_arch("llama-3-8b")
    count = count_params(arch)
    bf16 = estimate(arch, dtype="bfloat16").weight_bytes
    int8 = estimate(arch, dtype="bfloat16", weight_quant="int8").weight_bytes
    assert bf16 == 2 * count.total
    assert int8 == count.linear_weights + 2 * (count.total - count.linear_weights)


def test_int4_group_scales_cost_more_for_smaller_groups():
    assert bytes_per_quantized_weight("int4", 2, 128) == 0.5 + 2 / 128
    g32 = estimate("llama-2-7b", weight_quant="int4", quant_group_size=32).weight_bytes
    g128 = estimate("llama-2-7b", weight_quant="int4", quant_group_size=128).weight_bytes
    count = count_params(load_arch("llama-2-7b"))
    assert g128 == round(count.linear_weights * (0.5 + 2 / 128) + 2 * (count.total - count.linear_weights))
    assert g32 > g128


def test_fp8_kv_cache_halves_bytes_per_token_plus_scales_and_nearly_doubles_blocks():
    bf16 = estimate("llama-3.1-8b", gpu="H100-SXM", max_model_len=8192)
    fp8 = estimate("llama-3.1-8b", gpu="H100-SXM", max_model_len=8192, kv_cache_dtype="fp8")
    # 1 byte per element plus one float32 scale per token, KV head (8) and K/V, in each of 32 layers
    assert fp8.kv_bytes_per_token == bf16.kv_bytes_per_token // 2 + 2 * 32 * 8 * 4
    ratio = bf16.kv_bytes_per_token / fp8.kv_bytes_per_token  # 128 / (64 + 2): about 1.94
    assert abs(fp8.num_kv_blocks - ratio * bf16.num_kv_blocks) <= 1
    assert fp8.max_concurrent_sequences >= int(ratio * bf16.max_concurrent_sequences) - 1


def test_tensor_parallel_splits_weights_and_kv_heads():
    one = estimate("llama-3.1-70b", gpu="H100-SXM", num_gpus=1, max_model_len=8192)
    four = estimate("llama-3.1-70b", gpu="H100-SXM", num_gpus=4, max_model_len=8192)
    assert four.weight_bytes_per_gpu == math.ceil(one.weight_bytes / 4)
    assert four.kv_bytes_per_token_per_gpu * 4 == four.kv_bytes_per_token
    assert four.kv_budget_bytes == 4 * four.kv_budget_bytes_per_gpu
    assert four.decode_tokens_per_s_batch1 > 0 and one.decode_tokens_per_s_batch1 is None  # one GPU: no fit


def test_kv_heads_are_replicated_when_fewer_than_gpus():
    e = estimate("llama-3-8b", gpu="L4", num_gpus=16, max_model_len=8192)  # 8 KV heads on 16 GPUs
    assert e.kv_bytes_per_token_per_gpu * 8 == e.kv_bytes_per_token


def test_invalid_tensor_parallel_size_is_refused():
    assert not valid_tensor_parallel(load_arch("llama-2-7b"), 3)
    with pytest.raises(ConfigError, match="tensor-parallel size 3"):
        estimate("llama-2-7b", gpu="A10", num_gpus=3)


@pytest.mark.parametrize("model, gpu", [("llama-3.1-405b", "H100-SXM"), ("llama-2-70b", "A100-40GB"),
                                        ("qwen2.5-72b", "L40S"), ("qwen3-32b", "RTX-4090")])
def test_min_gpus_is_the_smallest_fitting_tensor_parallel_size(model, gpu):
    e = estimate(model, gpu=gpu, max_model_len=8192)
    n = e.min_gpus
    assert n is not None and estimate(model, gpu=gpu, max_model_len=8192, num_gpus=n).fits
    arch = load_arch(model)
    smaller = [m for m in range(1, n) if valid_tensor_parallel(arch, m)]
    assert all(not estimate(model, gpu=gpu, max_model_len=8192, num_gpus=m).fits for m in smaller)
    assert estimate(model, gpu=gpu, max_model_len=8192, num_gpus="auto").num_gpus == n


def test_model_that_does_not_fit_reports_why_and_no_speed():
    e = estimate("llama-3.1-405b", gpu="RTX-4090")
    assert not e.fits and not e.weights_fit and e.max_concurrent_sequences == 0
    assert e.decode_tokens_per_s_batch1 is None and e.monthly_cost is None
    assert any("do not fit" in note for note in e.notes)


def test_decode_batch1_is_bandwidth_over_bytes_read():
    e = estimate("qwen3-8b", gpu="H200", avg_prompt_len=1000, avg_output_len=200)
    read = e.weight_bytes + (1000 + 100) * e.kv_bytes_per_token  # weights + the average context's KV
    assert e.decode_tokens_per_s_batch1 == pytest.approx(find_gpu("H200").bandwidth_bytes_s / read)


def test_longer_context_slows_decode():
    short = estimate("llama-2-7b", gpu="A10", avg_prompt_len=64, avg_output_len=64)
    long = estimate("llama-2-7b", gpu="A10", avg_prompt_len=3000, avg_output_len=64)
    assert long.decode_tokens_per_s_batch1 < short.decode_tokens_per_s_batch1


def test_batched_decode_is_faster_but_capped_by_compute():
    e = estimate("qwen3-0.6b", gpu="L4", max_model_len=1024, batch_size=128)
    assert e.batch_size == 128
    assert e.decode_tokens_per_s_batch > 10 * e.decode_tokens_per_s_batch1
    assert e.decode_tokens_per_s_batch <= find_gpu("L4").flops_per_s(False) / (2 * e.params)


def test_batch_size_is_capped_by_the_kv_budget():
    e = estimate("llama-2-7b", gpu="RTX-4090", batch_size=500)
    assert e.batch_size == e.max_concurrent_sequences_avg < 500
    assert any("capped" in note for note in e.notes)


def test_prefill_grows_faster_than_linearly_with_prompt_length():
    short = estimate("llama-3-8b", gpu="H100-SXM", avg_prompt_len=2048, avg_output_len=1)
    long = estimate("llama-3-8b", gpu="H100-SXM", avg_prompt_len=6144, avg_output_len=1)
    assert long.prefill_seconds > 3 * short.prefill_seconds


def test_fp8_weights_use_fp8_tensor_cores_where_they_exist():
    bf16 = estimate("llama-3-8b", gpu="H100-SXM", avg_prompt_len=4096)
    fp8 = estimate("llama-3-8b", gpu="H100-SXM", avg_prompt_len=4096, weight_quant="fp8")
    assert fp8.prefill_seconds < 0.6 * bf16.prefill_seconds
    a100 = estimate("llama-3-8b", gpu="A100-80GB", avg_prompt_len=4096, weight_quant="fp8")
    assert any("no FP8" in note for note in a100.notes)


def test_cost_figures_follow_their_formulas():
    e = estimate("mistral-7b", gpu="L40S", num_gpus=2, gpu_price=1.25, utilization=0.5)
    assert e.hourly_cost == 2.5 and e.monthly_cost == pytest.approx(2.5 * 730)
    assert e.monthly_cost_per_gpu == pytest.approx(1.25 * 730)
    assert e.cost_per_1k_output_tokens == pytest.approx(2.5 / 3600 / (e.serving_tokens_per_s * 0.5) * 1000)
    assert e.cost_per_1m_output_tokens == pytest.approx(1000 * e.cost_per_1k_output_tokens)
    busier = estimate("mistral-7b", gpu="L40S", num_gpus=2, gpu_price=1.25, utilization=1.0)
    assert busier.cost_per_1k_output_tokens == pytest.approx(e.cost_per_1k_output_tokens / 2)


def test_breakeven_against_the_api_price():
    e = estimate("llama-3-8b", gpu="H100-SXM", api_input_price=1.0, api_output_price=3.0,
                 avg_prompt_len=600, avg_output_len=200, ops_hours_per_month=10, ops_hourly_rate=150)
    api_per_output_token = (3.0 + 1.0 * 600 / 200) / 1e6
    assert e.api_cost_per_1m_output_tokens == pytest.approx(6.0)
    assert e.breakeven_tokens_per_day == pytest.approx(e.monthly_cost / (365 / 12) / api_per_output_token)
    assert e.breakeven_tokens_per_day_with_ops == pytest.approx((e.monthly_cost + 1500) / (365 / 12)
                                                                / api_per_output_token)
    assert e.breakeven_reachable
    cheap_api = estimate("llama-3-8b", gpu="H100-SXM", api_input_price=0.0, api_output_price=0.01)
    assert not cheap_api.breakeven_reachable
    free_api = estimate("llama-3-8b", gpu="H100-SXM", api_input_price=0.0, api_output_price=0.0)
    assert free_api.breakeven_tokens_per_day is None and not free_api.breakeven_reachable


def test_fixed_kv_budget_on_a_gpu():
    e = estimate("llama-2-7b", gpu="A100-80GB", kv_cache_memory="8GiB", max_model_len=2048)
    assert e.kv_budget_bytes_per_gpu == 8 * 2**30
    assert e.num_kv_blocks == 8 * 2**30 // (16 * e.kv_bytes_per_token)
    too_big = estimate("llama-2-7b", gpu="A100-80GB", kv_cache_memory="70GiB")
    assert not too_big.weights_fit and not too_big.fits


def test_cpu_mode_mirrors_the_engine():
    e = estimate("llama-2-7b", kv_cache_memory="1GiB", block_size=32, max_model_len=1000)
    assert e.device == "cpu" and e.gpu is None and e.min_gpus is None
    assert e.dtype == "float32"  # the float16 checkpoint runs in float32 on CPU, as in the engine
    assert e.num_kv_blocks == 2**30 // (32 * e.kv_bytes_per_token)
    assert e.max_concurrent_sequences == e.num_kv_blocks // math.ceil(1000 / 32)
    assert e.decode_tokens_per_s_batch1 is None and e.monthly_cost is None
    default_budget = estimate("qwen3-0.6b", gpu="cpu", max_model_len=512)
    assert default_budget.kv_budget_bytes == 2 * 2**30  # the engine's default kv_cache_memory
    with pytest.raises(ConfigError, match="CPU mode"):
        estimate("qwen3-0.6b", gpu="cpu", num_gpus=2)


def test_dtype_resolution():
    assert estimate("llama-2-7b").dtype == "float16"
    assert estimate("qwen3-8b").dtype == "bfloat16"
    assert estimate("qwen3-8b", dtype="float32").weight_bytes == 4 * estimate("qwen3-8b").params


def test_default_average_lengths_shrink_to_fit_a_short_max_model_len():
    e = estimate("qwen3-0.6b", max_model_len=300)
    assert e.avg_prompt_len + e.avg_output_len <= 300
    with pytest.raises(ConfigError, match="shorter than max_model_len"):
        estimate("qwen3-0.6b", max_model_len=300, avg_prompt_len=400)


@pytest.mark.parametrize("text, value", [("7B", 7 * 10**9), ("7e9", 7 * 10**9), ("1.5b", 15 * 10**8),
                                         ("500M", 5 * 10**8), (" 70 B ", 70 * 10**9), (123, 123)])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("kwargs, message", [
    ({"params": "seven"}, "parameter count"), ({"params": "0"}, "params must be positive"),
    ({"avg_prompt_len": -5}, "avg_prompt_len must be >= 1"), ({"max_model_len": 0}, "max_model_len"),
    ({"utilization": 0}, "utilization"), ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"api_output_price": -1}, "api_output_price"), ({"num_gpus": 0}, "num_gpus"),
    ({"num_gpus": "two"}, "num_gpus must be an integer"), ({"dtype": "int3"}, "dtype"),
    ({"weight_quant": "int2"}, "weight_quant"), ({"kv_cache_memory": "lots"}, "byte size"),
    ({"block_size": 0}, "block_size"),
])
def test_bad_options_raise_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PlanOptions(**kwargs)


def test_gpu_lookup_is_case_insensitive_with_aliases_and_suggestions():
    assert find_gpu("a100-80gb").name == "A100-80GB"
    assert find_gpu("h100").name == "H100-SXM" and find_gpu("H100 PCIe").name == "H100-PCIe"
    assert find_gpu("rtx 4090").name == "RTX-4090"
    with pytest.raises(ConfigError, match="Did you mean L40S"):
        find_gpu("L40")
    with pytest.raises(ConfigError, match="unknown GPU 'TPUv5'"):
        find_gpu("TPUv5")
    for gpu in CATALOGUE.values():  # spec sheet sanity: FP8 doubles BF16 where it exists
        assert gpu.fp8_tflops is None or gpu.fp8_tflops == pytest.approx(2 * gpu.bf16_tflops, rel=0.03)
