"""``estimate()``: resolve the inputs, then run the memory, speed and cost plans in turn."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tureen.config import CacheConfig, SchedulerConfig
from tureen.errors import ConfigError
from tureen.plan.arch import SUPPORTED_MODEL_TYPES, ModelArch, ParamCount, count_params
from tureen.plan.cost import CostInputs, plan_cost
from tureen.plan.gpus import DEFAULT_GPU, GpuSpec, find_gpu, gpu_memory_bytes
from tureen.plan.memory import (DTYPE_BYTES, GB, KV_SCALE_BYTES, MemoryInputs, MemoryPlan, plan_memory,
                                valid_tensor_parallel, weight_bytes)
from tureen.plan.options import PlanOptions, average_lengths
from tureen.plan.source import load_arch
from tureen.plan.speed import SpeedInputs, SpeedPlan, plan_speed

MAX_GPUS_SEARCHED = 64
_ENGINE_CACHE_DEFAULTS = CacheConfig()
_ENGINE_MAX_NUM_SEQS = SchedulerConfig().max_num_seqs


@dataclass
class PlanEstimate:
    """Every figure of a plan. ``*_per_gpu`` are per GPU; the others are for the whole replica.
    Speed and cost figures are None on CPU and when not even one sequence of average length fits;
    when the model fits at average length but not at max_model_len they are shown, with a note."""

    model: str
    model_type: str
    device: str  # "cuda" or "cpu"
    gpu: str | None
    num_gpus: int
    memory_basis: str | None  # "reported" or "nominal"; None on CPU
    gpu_memory_bytes_per_gpu: int | None  # the GPU's total under memory_basis
    dtype: str
    weight_quant: str
    kv_cache_dtype: str
    max_model_len: int
    avg_prompt_len: int
    avg_output_len: int
    block_size: int
    params: int
    params_per_gpu: float
    # memory
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
    min_gpus: int | None
    # speed
    batch_size: int | None = None
    decode_tokens_per_s_batch1: float | None = None
    decode_tokens_per_s_batch: float | None = None
    decode_tokens_per_s_batch_per_gpu: float | None = None
    prefill_seconds: float | None = None
    serving_tokens_per_s: float | None = None
    # cost
    gpu_hourly_price: float | None = None
    hourly_cost: float | None = None
    cost_per_1k_output_tokens: float | None = None
    cost_per_1m_output_tokens: float | None = None
    monthly_cost: float | None = None
    monthly_cost_per_gpu: float | None = None
    monthly_ops_cost: float | None = None
    monthly_cost_with_ops: float | None = None
    api_cost_per_1m_output_tokens: float | None = None
    breakeven_tokens_per_day: float | None = None
    breakeven_tokens_per_day_with_ops: float | None = None
    output_tokens_per_day_capacity: float | None = None
    breakeven_reachable: bool | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Resolved:
    """The inputs after defaults and lookups: what the three plans are computed from."""

    arch: ModelArch
    count: ParamCount | None  # None when --params overrides the count
    params: int
    gpu: GpuSpec | None  # None: the engine's CPU mode
    dtype: str
    max_model_len: int
    avg_prompt_len: int
    avg_output_len: int
    kv_budget: int | None


def resolve_dtype(requested: str, checkpoint_dtype: str | None, on_cpu: bool) -> str:
    """The engine's rule: auto is the checkpoint's dtype, and float16 runs as float32 on CPU."""
    dtype = requested
    if dtype == "auto":
        dtype = str(checkpoint_dtype or ("float32" if on_cpu else "bfloat16")).removeprefix("torch.")
        dtype = dtype if dtype in DTYPE_BYTES else "bfloat16"
        if on_cpu and dtype == "float16":
            dtype = "float32"
    return dtype


def _resolve_gpu(opts: PlanOptions) -> GpuSpec | None:
    if opts.gpu is None:
        return None if opts.kv_cache_memory is not None else find_gpu(DEFAULT_GPU)
    return None if opts.gpu.strip().lower() == "cpu" else find_gpu(opts.gpu)


def _resolve(model: str | os.PathLike | ModelArch, opts: PlanOptions) -> _Resolved:
    arch = model if isinstance(model, ModelArch) else load_arch(os.fspath(model), allow_unknown=opts.params is not None)
    gpu = _resolve_gpu(opts)
    max_model_len = opts.max_model_len or arch.max_position_embeddings
    prompt_len, output_len = average_lengths(opts.avg_prompt_len, opts.avg_output_len, max_model_len)
    kv_budget = opts.kv_cache_memory
    if gpu is None and kv_budget is None:
        kv_budget = _ENGINE_CACHE_DEFAULTS.kv_cache_memory
    count = None if opts.params is not None else count_params(arch)
    return _Resolved(arch=arch, count=count, params=opts.params or count.total, gpu=gpu,
                     dtype=resolve_dtype(opts.dtype, arch.torch_dtype, on_cpu=gpu is None),
                     max_model_len=max_model_len, avg_prompt_len=prompt_len, avg_output_len=output_len,
                     kv_budget=kv_budget)


def _memory_inputs(r: _Resolved, opts: PlanOptions, num_gpus: int) -> MemoryInputs:
    dtype_bytes = DTYPE_BYTES[r.dtype]
    return MemoryInputs(
        arch=r.arch,
        weight_bytes=weight_bytes(r.params, r.count, dtype_bytes, opts.weight_quant, opts.quant_group_size),
        num_gpus=num_gpus,
        kv_element_bytes=dtype_bytes if opts.kv_cache_dtype == "auto" else 1,
        kv_scale_bytes=0 if opts.kv_cache_dtype == "auto" else KV_SCALE_BYTES,
        max_model_len=r.max_model_len,
        avg_context=r.avg_prompt_len + r.avg_output_len,
        block_size=opts.block_size,
        usable_bytes_per_gpu=None if r.gpu is None else int(
            gpu_memory_bytes(r.gpu, opts.memory_basis) * opts.gpu_memory_utilization),
        overhead_bytes=0 if r.gpu is None else round(opts.overhead_gb * GB),
        fixed_kv_budget=r.kv_budget,
    )


def find_min_gpus(r: _Resolved, opts: PlanOptions) -> int | None:
    """The fewest GPUs (a valid tensor-parallel size) on which the model fits; None on CPU or if none do."""
    if r.gpu is None:
        return None
    for n in range(1, MAX_GPUS_SEARCHED + 1):
        if valid_tensor_parallel(r.arch, n) and plan_memory(_memory_inputs(r, opts, n)).fits:
            return n
    return None


def _choose_num_gpus(r: _Resolved, opts: PlanOptions, min_gpus: int | None, notes: list[str]) -> int:
    if r.gpu is None:
        if opts.num_gpus not in (1, "auto"):
            raise ConfigError("the CPU mode plans one device; drop --num-gpus or pass --gpu")
        return 1
    if opts.num_gpus == "auto":
        if min_gpus is None:
            notes.append(f"does not fit on up to {MAX_GPUS_SEARCHED} x {r.gpu.name}; showing 1 GPU")
        return min_gpus or 1
    if not valid_tensor_parallel(r.arch, opts.num_gpus):
        raise ConfigError(
            f"tensor-parallel size {opts.num_gpus} must divide the {r.arch.num_attention_heads} attention heads "
            f"and divide or be a multiple of the {r.arch.num_key_value_heads} KV heads")
    return opts.num_gpus


def _choose_batch(opts: PlanOptions, memory: MemoryPlan, notes: list[str]) -> int:
    wanted = opts.batch_size or _ENGINE_MAX_NUM_SEQS
    held = memory.max_concurrent_sequences_avg
    if wanted > held:
        asked = "batch size" if opts.batch_size is not None else "the engine's max_num_seqs"
        notes.append(f"{asked} {wanted} capped at {held}: the KV budget holds that many sequences of "
                     f"average length, so the speed and cost figures assume {held} at a time")
    return max(1, min(wanted, held))


def _speed_inputs(r: _Resolved, opts: PlanOptions, memory: MemoryPlan, n: int, batch: int) -> SpeedInputs:
    use_fp8 = opts.weight_quant == "fp8"
    peak = r.gpu.flops_per_s(use_fp8) / (2 if r.dtype == "float32" else 1)  # TF32 runs at half the bf16 rate
    return SpeedInputs(
        arch=r.arch, params=r.params, gpu=r.gpu, num_gpus=n, flops_per_s_per_gpu=peak,
        weight_bytes_per_gpu=memory.weight_bytes_per_gpu,
        kv_bytes_per_token_per_gpu=memory.kv_bytes_per_token_per_gpu,
        avg_prompt_len=r.avg_prompt_len, avg_output_len=r.avg_output_len, batch_size=batch,
    )


def _cost_inputs(r: _Resolved, opts: PlanOptions, speed: SpeedPlan, n: int) -> CostInputs:
    return CostInputs(
        gpu_hourly_price=r.gpu.hourly_price if opts.gpu_price is None else opts.gpu_price,
        num_gpus=n, serving_tokens_per_s=speed.serving_tokens_per_s, utilization=opts.utilization,
        api_input_price=opts.api_input_price, api_output_price=opts.api_output_price,
        avg_prompt_len=r.avg_prompt_len, avg_output_len=r.avg_output_len,
        ops_hours_per_month=opts.ops_hours_per_month, ops_hourly_rate=opts.ops_hourly_rate,
    )


def _notes(r: _Resolved, opts: PlanOptions, memory: MemoryPlan) -> list[str]:
    notes = []
    if opts.params is not None:
        notes.append(f"parameter count overridden: {r.params:,} (all counted as quantizable linear weights)")
    if r.arch.model_type not in SUPPORTED_MODEL_TYPES:
        notes.append(f"model_type {r.arch.model_type!r} read as a llama-style decoder for the KV cache")
    if r.gpu is not None and opts.weight_quant == "fp8" and r.gpu.fp8_tflops is None:
        notes.append(f"{r.gpu.name} has no FP8 tensor cores: compute ceiling uses bf16 TFLOPS")
    if not memory.weights_fit:
        notes.append("the weights and overhead do not fit in the usable GPU memory")
    elif not memory.fits and memory.max_concurrent_sequences_avg >= 1:
        notes.append(f"no room for one sequence of max_model_len={r.max_model_len:,} tokens in the KV budget; "
                     f"{memory.max_concurrent_sequences_avg} of average length "
                     f"({r.avg_prompt_len + r.avg_output_len:,} tokens) fit, and the speed and cost figures "
                     f"assume those: lower --max-model-len to serve it as planned")
    elif not memory.fits:
        notes.append(f"no room for one sequence of max_model_len={r.max_model_len:,} tokens in the KV budget")
    if r.gpu is not None:
        notes.append(_basis_note(r.gpu, opts))
    return notes


def _basis_note(gpu: GpuSpec, opts: PlanOptions) -> str:
    reported = f"{gpu.memory_mib:,} MiB as the device reports it ({gpu.reported_memory_bytes / GB:.2f} GB)"
    nominal = f"the spec sheet's {gpu.nominal_gb:g} GB"
    if opts.memory_basis == "reported":
        return (f"GPU memory: {reported} per {gpu.name}, x {opts.gpu_memory_utilization:g} utilization; "
                f"--memory-basis nominal plans from {nominal}")
    return (f"GPU memory: {nominal} per {gpu.name} (--memory-basis nominal), x "
            f"{opts.gpu_memory_utilization:g} utilization; the device reports {reported}")


def _serves_something(r: _Resolved, memory: MemoryPlan) -> bool:
    """Speed and cost are meaningful once one average-length sequence fits, even if max_model_len doesn't."""
    return r.gpu is not None and memory.weights_fit and memory.max_concurrent_sequences_avg >= 1


def _header(r: _Resolved, opts: PlanOptions, n: int) -> dict[str, Any]:
    return {
        "model": r.arch.name, "model_type": r.arch.model_type, "device": "cpu" if r.gpu is None else "cuda",
        "gpu": None if r.gpu is None else r.gpu.name, "num_gpus": n,
        "memory_basis": None if r.gpu is None else opts.memory_basis,
        "gpu_memory_bytes_per_gpu": None if r.gpu is None else gpu_memory_bytes(r.gpu, opts.memory_basis),
        "dtype": r.dtype,
        "weight_quant": opts.weight_quant, "kv_cache_dtype": opts.kv_cache_dtype,
        "max_model_len": r.max_model_len, "avg_prompt_len": r.avg_prompt_len,
        "avg_output_len": r.avg_output_len, "block_size": opts.block_size,
        "params": r.params, "params_per_gpu": r.params / n,
    }


def estimate(model: str | os.PathLike | ModelArch, options: PlanOptions | None = None, **kwargs: Any) -> PlanEstimate:
    """Plan serving ``model`` (a checkpoint path, config.json, preset, hub id or ``ModelArch``).

    Options are a ``PlanOptions`` or its fields as keyword arguments, e.g.
    ``estimate("llama-2-7b", gpu="A100-80GB", max_model_len=2048)``.
    """
    if options is not None and kwargs:
        raise ConfigError("pass either a PlanOptions or option keywords, not both")
    opts = options if options is not None else PlanOptions(**kwargs)
    r = _resolve(model, opts)
    min_gpus = find_min_gpus(r, opts)
    extra_notes: list[str] = []
    n = _choose_num_gpus(r, opts, min_gpus, extra_notes)
    memory = plan_memory(_memory_inputs(r, opts, n))
    result = PlanEstimate(**_header(r, opts, n), **asdict(memory), min_gpus=min_gpus,
                          notes=_notes(r, opts, memory) + extra_notes)
    if not _serves_something(r, memory):
        return result
    speed = plan_speed(_speed_inputs(r, opts, memory, n, _choose_batch(opts, memory, result.notes)))
    cost = plan_cost(_cost_inputs(r, opts, speed, n))
    return replace(result, **asdict(speed), **asdict(cost))
