"""GPU memory as the device reports it, the nominal basis, and plans that fit only at average length.

Reference figures:
- reported totals: the ``nvidia-smi`` MiB figures cited per GPU in ``tureen/plan/gpus.py``;
- vLLM's KV budget for Llama-3.1-8B (bf16) on one H100 at ``gpu_memory_utilization=0.9``: the
  issue's "about 57 GB of KV after 16 GB of weights". vLLM logs "Model loading took 14.99 GiB"
  for this checkpoint (16.1 GB), and its budget is total x 0.9 - weights - profiled activations,
  non-torch memory and CUDA graphs: 79.65 GiB x 0.9 - 14.99 GiB - about 1.5-2.5 GiB = 54-55 GiB
  (58-59 GB). No startup log for exactly this setting was found in the public issue threads
  searched, so the check uses the issue's figure with the issue's 10% tolerance.
"""

from __future__ import annotations

import pytest

from tureen.cli import main
from tureen.errors import ConfigError
from tureen.plan import CATALOGUE, estimate, find_gpu
from tureen.plan.gpus import gpu_memory_bytes

GB = 1e9
MIB = 2**20


@pytest.mark.parametrize("name, mib", [("H100-SXM", 81_559), ("H100-PCIe", 81_559), ("A100-80GB", 81_920),
                                       ("A100-40GB", 40_960), ("L40S", 46_068), ("A10", 23_028), ("L4", 23_034),
                                       ("RTX-4090", 24_564), ("H200", 143_771)])
def test_reported_memory_is_the_nvidia_smi_total(name, mib):
    gpu = find_gpu(name)
    assert gpu.memory_mib == mib
    assert gpu_memory_bytes(gpu, "reported") == mib * MIB
    assert gpu_memory_bytes(gpu, "nominal") == int(gpu.nominal_gb * GB)


def test_every_gpu_reports_more_than_its_marketing_figure():
    for gpu in CATALOGUE.values():
        ratio = gpu.reported_memory_bytes / gpu.nominal_memory_bytes
        assert 1.0 < ratio < 1.08, gpu.name  # binary-sized chips sold in decimal GB
    assert find_gpu("H100-SXM").reported_memory_bytes / GB == pytest.approx(85.52, abs=0.01)


def test_gpu_memory_utilization_applies_to_the_reported_total():
    e = estimate("llama-3.1-8b", gpu="H100-SXM", max_model_len=8192, gpu_memory_utilization=0.9)
    assert e.memory_basis == "reported" and e.gpu_memory_bytes_per_gpu == 81_559 * MIB
    assert e.usable_memory_bytes_per_gpu == int(81_559 * MIB * 0.9)
    nominal = estimate("llama-3.1-8b", gpu="H100-SXM", max_model_len=8192, memory_basis="nominal")
    assert nominal.usable_memory_bytes_per_gpu == int(80e9 * 0.9)
    assert e.kv_budget_bytes - nominal.kv_budget_bytes == e.usable_memory_bytes_per_gpu - int(80e9 * 0.9)


def test_the_seeds_70b_deployment_fits_on_two_h100s():
    """Llama-3-70B bf16 on 2 x H100 at 8K context, as the seeds deploy it (vLLM runs it)."""
    for utilization in (0.9, 0.88):
        e = estimate("llama-3.1-70b", gpu="H100-SXM", num_gpus=2, max_model_len=8192,
                     gpu_memory_utilization=utilization)
        assert e.fits, utilization
        assert 1 <= e.max_concurrent_sequences <= 8  # small but positive at 8K
        assert e.decode_tokens_per_s_batch1 is not None and e.cost_per_1m_output_tokens is not None
    auto = estimate("llama-3.1-70b", gpu="H100-SXM", num_gpus="auto", max_model_len=8192)
    assert auto.min_gpus == 2 and auto.num_gpus == 2


def test_the_nominal_basis_reproduces_the_old_verdict_and_says_so():
    e = estimate("llama-3.1-70b", gpu="H100-SXM", num_gpus=2, max_model_len=8192, memory_basis="nominal")
    assert not e.fits and e.min_gpus == 4
    assert any("--memory-basis nominal" in note and "80 GB" in note for note in e.notes)


def test_llama31_8b_kv_budget_on_one_h100_is_within_10_percent_of_vllm():
    e = estimate("llama-3.1-8b", gpu="H100-SXM", gpu_memory_utilization=0.9, max_model_len=8192)
    assert e.weight_bytes == pytest.approx(16 * GB, rel=0.01)
    assert e.kv_budget_bytes == pytest.approx(57 * GB, rel=0.10)


def test_speed_and_cost_are_shown_when_only_the_average_context_fits():
    e = estimate("llama-3.1-70b", gpu="H100-SXM", num_gpus=2)  # max_model_len 131,072 does not fit
    assert not e.fits and e.max_concurrent_sequences == 0 and e.max_concurrent_sequences_avg >= 1
    assert e.decode_tokens_per_s_batch1 is not None and e.serving_tokens_per_s is not None
    assert e.cost_per_1m_output_tokens is not None and e.monthly_cost is not None
    assert e.batch_size == e.max_concurrent_sequences_avg
    assert any("max_model_len=131,072" in n and "lower --max-model-len" in n for n in e.notes)
    assert any("max_num_seqs 128 capped" in n for n in e.notes)


def test_speed_stays_blank_when_not_even_one_average_sequence_fits():
    e = estimate("llama-3.1-405b", gpu="RTX-4090")
    assert not e.weights_fit and e.decode_tokens_per_s_batch1 is None and e.cost_per_1m_output_tokens is None


def test_table_names_the_memory_basis(capsys):
    assert main(["plan", "llama-3.1-70b", "--gpu", "H100-SXM", "--num-gpus", "2", "--max-model-len", "8192"]) == 0
    out = capsys.readouterr().out
    assert "GPU memory (reported)" in out and "85.52 GB" in out and "171.04 GB" in out
    assert "fits" in out and "81,559 MiB as the device reports it" in out
    assert main(["plan", "llama-2-7b", "--gpu", "A100-80GB", "--memory-basis", "nominal"]) == 0
    out = capsys.readouterr().out
    assert "GPU memory (nominal)" in out and "80.00 GB" in out


def test_memory_basis_is_validated():
    with pytest.raises(ConfigError, match="memory_basis"):
        estimate("llama-2-7b", memory_basis="marketing")
