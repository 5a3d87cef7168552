"""Speed ceilings from the roofline: a step takes the longer of its memory traffic and its math.

    decode step  = max(bytes read / bandwidth, FLOPs / peak FLOP/s)
                   bytes read = weights + batch x context x kv_bytes_per_token   (per GPU)
                   FLOPs      = batch x (2 x params + 4 x layers x context x heads x head_dim)
    prefill      = max(2 x params x prompt + 2 x layers x prompt^2 x heads x head_dim  FLOPs / peak,
                       weights / bandwidth)
    serving rate = batch x output / (prefill of batch prompts + output x decode step)

Under tensor parallelism every GPU reads its own slice of weights and KV at the same time and
does 1/tp of the FLOPs, so the per-GPU figures set the pace. Communication is ignored: these are
ceilings, which real servers reach at some 50-80 %.
"""

from __future__ import annotations

from dataclasses import dataclass

from tureen.plan.arch import ModelArch
from tureen.plan.gpus import GpuSpec


def decode_flops_per_token(params: int, arch: ModelArch, context: float) -> float:
    """2 FLOPs per parameter, plus attention over ``context`` cached tokens (QK^T and AV)."""
    return 2 * params + 4 * arch.num_hidden_layers * context * arch.attention_width


def prefill_flops(params: int, arch: ModelArch, prompt_len: int) -> float:
    """2 FLOPs per parameter per token, plus causal attention (half of the prompt^2 score matrix)."""
    return 2 * params * prompt_len + 2 * arch.num_hidden_layers * prompt_len**2 * arch.attention_width


@dataclass(frozen=True)
class SpeedInputs:
    arch: ModelArch
    params: int
    gpu: GpuSpec
    num_gpus: int
    flops_per_s_per_gpu: float
    weight_bytes_per_gpu: int
    kv_bytes_per_token_per_gpu: int
    avg_prompt_len: int
    avg_output_len: int
    batch_size: int

    @property
    def decode_context(self) -> float:
        """Average tokens in the cache while decoding: the prompt plus half the output."""
        return self.avg_prompt_len + self.avg_output_len / 2


@dataclass(frozen=True)
class SpeedPlan:
    batch_size: int
    decode_tokens_per_s_batch1: float
    decode_tokens_per_s_batch: float
    decode_tokens_per_s_batch_per_gpu: float
    prefill_seconds: float
    serving_tokens_per_s: float


def decode_step_seconds(s: SpeedInputs, batch: int) -> float:
    """One decode step for ``batch`` sequences: the slower of the memory reads and the math."""
    kv_read = batch * s.decode_context * s.kv_bytes_per_token_per_gpu
    memory_time = (s.weight_bytes_per_gpu + kv_read) / s.gpu.bandwidth_bytes_s
    flops = batch * decode_flops_per_token(s.params, s.arch, s.decode_context) / s.num_gpus
    return max(memory_time, flops / s.flops_per_s_per_gpu)


def prefill_seconds(s: SpeedInputs, num_prompts: int = 1) -> float:
    """Prefill of ``num_prompts`` average prompts: compute-bound, but never faster than one weight read."""
    flops = num_prompts * prefill_flops(s.params, s.arch, s.avg_prompt_len) / s.num_gpus
    return max(flops / s.flops_per_s_per_gpu, s.weight_bytes_per_gpu / s.gpu.bandwidth_bytes_s)


def serving_tokens_per_s(s: SpeedInputs) -> float:
    """Output tokens per second when each batch of requests is prefilled and then decoded."""
    step = decode_step_seconds(s, s.batch_size)
    cycle = prefill_seconds(s, s.batch_size) + s.avg_output_len * step
    return s.batch_size * s.avg_output_len / cycle


def plan_speed(s: SpeedInputs) -> SpeedPlan:
    batched = s.batch_size / decode_step_seconds(s, s.batch_size)
    return SpeedPlan(
        batch_size=s.batch_size,
        decode_tokens_per_s_batch1=1 / decode_step_seconds(s, 1),
        decode_tokens_per_s_batch=batched,
        decode_tokens_per_s_batch_per_gpu=batched / s.num_gpus,
        prefill_seconds=prefill_seconds(s),
        serving_tokens_per_s=serving_tokens_per_s(s),
    )
