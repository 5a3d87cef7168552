"""Memory arithmetic: weight bytes, KV cache per token, the KV budget, blocks and concurrency.

The KV formulas are the engine's (see the brief's "Engine KV sizing"), so that for the same
model, budget and block size the planner and ``tureen serve`` report the same numbers:

    kv_bytes_per_token = 2 (K and V) x layers x kv_heads x (head_dim x element_bytes + scale_bytes)
    num_kv_blocks      = kv_budget // (block_size x kv_bytes_per_token)
    max_concurrency    = num_kv_blocks // ceil(seq_len / block_size)

With tensor parallelism each GPU holds ``kv_heads / tp`` heads (at least one: heads are
replicated when there are fewer KV heads than GPUs), and its own slice of the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tureen.plan.arch import ModelArch, ParamCount

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANT_BYTES = {"int8": 1.0, "fp8": 1.0, "int4": 0.5}
INT4_SCALE_BYTES = 2  # one float16 scale per group of int4 weights
GB = 10**9


def bytes_per_quantized_weight(quant: str, dtype_bytes: int, group_size: int) -> float:
    """Bytes one linear-layer weight takes under ``quant`` (int4 pays a scale per group)."""
    if quant == "none":
        return float(dtype_bytes)
    if quant == "int4":
        return QUANT_BYTES["int4"] + INT4_SCALE_BYTES / group_size
    return QUANT_BYTES[quant]


def weight_bytes(params: int, count: ParamCount | None, dtype_bytes: int, quant: str, group_size: int) -> int:
    """Bytes of all weights. Quantization shrinks the layers' linear weights; embeddings, the
    LM head, norms and biases stay in ``dtype``. A nominal count (``count`` None) is all linear."""
    per_linear = bytes_per_quantized_weight(quant, dtype_bytes, group_size)
    linear = params if count is None else count.linear_weights
    return round(linear * per_linear + (params - linear) * dtype_bytes)


def kv_heads_per_gpu(arch: ModelArch, num_gpus: int) -> int:
    return max(1, arch.num_key_value_heads // num_gpus)


KV_SCALE_BYTES = 4  # a quantized KV cache (fp8 / int8) keeps one float32 scale per token, head and K/V


def kv_bytes_per_token(arch: ModelArch, kv_heads: int, element_bytes: int, scale_bytes: int = 0) -> int:
    """2 (K and V) x layers x kv_heads x (head_dim x bytes per element + bytes of its scale)."""
    return 2 * arch.num_hidden_layers * kv_heads * (arch.head_dim * element_bytes + scale_bytes)


def blocks_per_sequence(seq_len: int, block_size: int) -> int:
    return math.ceil(seq_len / block_size)


def num_kv_blocks(kv_budget: int, block_size: int, bytes_per_token: int) -> int:
    return max(0, kv_budget) // (block_size * bytes_per_token)


def max_concurrency(num_blocks: int, seq_len: int, block_size: int) -> int:
    """Sequences of ``seq_len`` tokens that fit in ``num_blocks`` blocks."""
    return num_blocks // blocks_per_sequence(seq_len, block_size)


def valid_tensor_parallel(arch: ModelArch, num_gpus: int) -> bool:
    """Tensor parallelism splits attention heads evenly, and KV heads evenly or by replication."""
    kv = arch.num_key_value_heads
    return arch.num_attention_heads % num_gpus == 0 and (kv % num_gpus == 0 or num_gpus % kv == 0)


@dataclass(frozen=True)
class MemoryInputs:
    """What the memory plan depends on, resolved (``usable_bytes_per_gpu`` None on CPU)."""

    arch: ModelArch
    weight_bytes: int
    num_gpus: int
    kv_element_bytes: int
    max_model_len: int
    avg_context: int  # prompt + output: the context a typical finished sequence holds
    block_size: int
    usable_bytes_per_gpu: int | None  # memory x gpu_memory_utilization
    overhead_bytes: int
    fixed_kv_budget: int | None  # --kv-cache-memory
    kv_scale_bytes: int = 0  # per token, head and K/V: KV_SCALE_BYTES for a quantized cache


@dataclass(frozen=True)
class MemoryPlan:
    weight_bytes: int
    weight_bytes_per_gpu: int
    kv_bytes_per_token: int
    kv_bytes_per_token_per_gpu: int
    kv_bytes_per_sequence: int
    kv_bytes_per_sequence_per_gpu: int
    usable_memory_bytes_per_gpu: int | None
    kv_budget_bytes: int
    kv_budget_bytes_per_gpu: int
    num_kv_blocks: int
    max_concurrent_sequences: int
    max_concurrent_sequences_avg: int
    weights_fit: bool
    fits: bool


def _kv_budget_per_gpu(m: MemoryInputs, weights_per_gpu: int) -> int:
    """The fixed budget when given, else what is left of the usable memory after weights and overhead."""
    if m.fixed_kv_budget is not None:
        return m.fixed_kv_budget
    return max(0, m.usable_bytes_per_gpu - weights_per_gpu - m.overhead_bytes)


def _weights_fit(m: MemoryInputs, weights_per_gpu: int, kv_budget_per_gpu: int) -> bool:
    if m.usable_bytes_per_gpu is None:  # CPU: only the KV budget is modelled
        return True
    fixed_kv = m.fixed_kv_budget or 0
    return weights_per_gpu + m.overhead_bytes + fixed_kv <= m.usable_bytes_per_gpu


def plan_memory(m: MemoryInputs) -> MemoryPlan:
    n = m.num_gpus
    weights_per_gpu = math.ceil(m.weight_bytes / n)
    per_token = kv_bytes_per_token(m.arch, m.arch.num_key_value_heads, m.kv_element_bytes, m.kv_scale_bytes)
    per_token_gpu = kv_bytes_per_token(m.arch, kv_heads_per_gpu(m.arch, n), m.kv_element_bytes, m.kv_scale_bytes)
    budget_gpu = _kv_budget_per_gpu(m, weights_per_gpu)
    blocks = num_kv_blocks(budget_gpu, m.block_size, per_token_gpu)
    weights_fit = _weights_fit(m, weights_per_gpu, budget_gpu)
    concurrency = max_concurrency(blocks, m.max_model_len, m.block_size) if weights_fit else 0
    return MemoryPlan(
        weight_bytes=m.weight_bytes,
        weight_bytes_per_gpu=weights_per_gpu,
        kv_bytes_per_token=per_token,
        kv_bytes_per_token_per_gpu=per_token_gpu,
        kv_bytes_per_sequence=per_token * m.max_model_len,
        kv_bytes_per_sequence_per_gpu=per_token_gpu * m.max_model_len,
        usable_memory_bytes_per_gpu=m.usable_bytes_per_gpu,
        kv_budget_bytes=budget_gpu * n,
        kv_budget_bytes_per_gpu=budget_gpu,
        num_kv_blocks=blocks,
        max_concurrent_sequences=concurrency,
        max_concurrent_sequences_avg=max_concurrency(blocks, m.avg_context, m.block_size) if weights_fit else 0,
        weights_fit=weights_fit,
        fits=weights_fit and concurrency >= 1,
    )
