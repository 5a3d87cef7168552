"""The planner's options: one typed, validated dataclass; the CLI flags are generated from it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tureen.config import parse_size
from tureen.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
WEIGHT_QUANTS = ("none", "int8", "fp8", "int4")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "int8")
MEMORY_BASES = ("reported", "nominal")
DEFAULT_PROMPT_LEN = 512
DEFAULT_OUTPUT_LEN = 256

_COUNT_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(value: int | float | str) -> int:
    """Parse a parameter count such as ``7e9``, ``"7B"``, ``"1.5b"`` or ``"500M"``."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]?)\s*", str(value).lower())
    if not m or m.group(2) not in _COUNT_SUFFIX:
        raise ConfigError(f"cannot parse parameter count {value!r}; use e.g. 7e9, 7B or 500M")
    return int(float(m.group(1)) * _COUNT_SUFFIX[m.group(2)])


def _opt(help_text: str, **argparse_kwargs: Any) -> dict[str, Any]:
    """Field metadata: the help text (written once, reused by the CLI) and extra argparse kwargs."""
    return {"help": help_text, "argparse": argparse_kwargs}


@dataclass
class PlanOptions:
    """Everything the planner needs besides the model. Validated on construction."""

    gpu: str | None = field(default=None, metadata=_opt(
        "GPU model from the catalogue (RTX-4090, A10, L4, L40S, A100-40GB, A100-80GB, H100-PCIe, "
        "H100-SXM, H200; case-insensitive). Default: H100-SXM, or 'cpu' when --kv-cache-memory is "
        "given. 'cpu' mirrors the tureen engine on CPU: the KV budget is --kv-cache-memory.",
        metavar="GPU"))
    num_gpus: int | str = field(default=1, metadata=_opt(
        "GPUs per replica, i.e. the tensor-parallel size, or 'auto' for the fewest that fit.",
        flags=("--num-gpus", "--tensor-parallel-size", "-tp"), type=str, metavar="N"))
    dtype: str = field(default="auto", metadata=_opt(
        "Weight and activation dtype. auto: the checkpoint's torch_dtype (bfloat16 when it names "
        "none; like the engine, float16 becomes float32 on CPU).", choices=DTYPES))
    weight_quant: str = field(default="none", metadata=_opt(
        "Weight quantization of the linear layers: none (dtype), int8 or fp8 (1 byte per weight) "
        "or int4 (half a byte plus one float16 scale per --quant-group-size weights).",
        choices=WEIGHT_QUANTS))
    quant_group_size: int = field(default=128, metadata=_opt(
        "Weights sharing one int4 scale (GPTQ/AWQ group size).", type=int, metavar="N"))
    kv_cache_dtype: str = field(default="auto", metadata=_opt(
        "KV-cache element type: auto (the dtype), fp8 / fp8_e4m3 or int8 (1 byte, plus the engine's "
        "4-byte scale per token, head and K/V).", choices=KV_CACHE_DTYPES))
    max_model_len: int | None = field(default=None, metadata=_opt(
        "Longest sequence (prompt + output) in tokens; one sequence of this length must fit. "
        "Default: the config's max_position_embeddings, as the engine does.", type=int, metavar="TOKENS"))
    avg_prompt_len: int | None = field(default=None, metadata=_opt(
        f"Average prompt length in tokens (prefill time, KV read per step, API input cost). "
        f"Default: {DEFAULT_PROMPT_LEN}, shrunk to fit a shorter max_model_len.", type=int, metavar="TOKENS"))
    avg_output_len: int | None = field(default=None, metadata=_opt(
        f"Average output length in tokens. Default: {DEFAULT_OUTPUT_LEN}, shrunk to fit a shorter "
        f"max_model_len.", type=int, metavar="TOKENS"))
    gpu_memory_utilization: float = field(default=0.9, metadata=_opt(
        "Fraction of each GPU's memory the server may use (weights + overhead + KV cache), applied "
        "to the total of --memory-basis, as vLLM applies it to the device's total.",
        type=float, metavar="FRACTION"))
    memory_basis: str = field(default="reported", metadata=_opt(
        "Which GPU memory total to plan from: reported (what the device reports, as nvidia-smi "
        "prints it in MiB; what vLLM and tureen apply --gpu-memory-utilization to) or nominal (the "
        "spec sheet's decimal GB, e.g. 80 GB for an H100, as the sizing guides' worked examples use).",
        choices=MEMORY_BASES))
    overhead_gb: float = field(default=2.0, metadata=_opt(
        "Per-GPU memory for activations, CUDA context and framework buffers, in GB (10^9 bytes).",
        type=float, metavar="GB"))
    kv_cache_memory: int | str | None = field(default=None, metadata=_opt(
        "Fixed KV-cache budget per device (bytes or e.g. '512MiB', '4GiB') instead of the memory "
        "left over; without --gpu this is the engine's CPU mode (engine default 2GiB).",
        type=str, metavar="SIZE"))
    block_size: int = field(default=16, metadata=_opt(
        "Tokens per KV-cache block, as in the engine.", type=int, metavar="TOKENS"))
    batch_size: int | None = field(default=None, metadata=_opt(
        "Concurrent sequences decoded per step for the batched speed ceiling. Default: as many as "
        "fit at average context, at most the engine's max_num_seqs (128).", type=int, metavar="N"))
    utilization: float = field(default=0.7, metadata=_opt(
        "Average fraction of the serving capacity that traffic actually uses (cost per token).",
        type=float, metavar="FRACTION"))
    api_input_price: float = field(default=0.50, metadata=_opt(
        "API price of input tokens, US$ per 1M tokens (break-even).", type=float, metavar="USD"))
    api_output_price: float = field(default=1.50, metadata=_opt(
        "API price of output tokens, US$ per 1M tokens (break-even).", type=float, metavar="USD"))
    ops_hours_per_month: float = field(default=20.0, metadata=_opt(
        "Engineer hours per month spent operating the deployment.", type=float, metavar="HOURS"))
    ops_hourly_rate: float = field(default=100.0, metadata=_opt(
        "Loaded engineer cost, US$ per hour.", type=float, metavar="USD"))
    gpu_price: float | None = field(default=None, metadata=_opt(
        "GPU rental price, US$ per GPU-hour (default: the catalogue's price).", type=float, metavar="USD"))
    params: int | str | None = field(default=None, metadata=_opt(
        "Override the computed parameter count with a nominal size, e.g. 7e9 or 7B (= 7 x 10^9).",
        type=str, metavar="COUNT"))

    def __post_init__(self) -> None:
        if self.num_gpus != "auto":
            self.num_gpus = _int_at_least("num_gpus", self.num_gpus, 1)
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_size(self.kv_cache_memory)
            _check(self.kv_cache_memory > 0, f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if self.params is not None:
            self.params = parse_count(self.params)
            _check(self.params > 0, f"params must be positive, got {self.params}")
        self._check_choices()
        self._check_lengths()
        self._check_ranges()

    def _check_choices(self) -> None:
        for name, allowed in (("dtype", DTYPES), ("weight_quant", WEIGHT_QUANTS), ("kv_cache_dtype", KV_CACHE_DTYPES),
                              ("memory_basis", MEMORY_BASES)):
            value = getattr(self, name)
            _check(value in allowed, f"{name} must be one of {', '.join(allowed)}, got {value!r}")

    def _check_lengths(self) -> None:
        for name in ("block_size", "quant_group_size"):
            _int_at_least(name, getattr(self, name), 1)
        for name in ("max_model_len", "batch_size", "avg_prompt_len", "avg_output_len"):
            if getattr(self, name) is not None:
                _int_at_least(name, getattr(self, name), 1)

    def _check_ranges(self) -> None:
        for name in ("gpu_memory_utilization", "utilization"):
            value = getattr(self, name)
            _check(0.0 < value <= 1.0, f"{name} must be in (0, 1], got {value}")
        for name in ("overhead_gb", "api_input_price", "api_output_price", "ops_hours_per_month",
                     "ops_hourly_rate"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        if self.gpu_price is not None:
            _check(self.gpu_price >= 0, f"gpu_price must be >= 0, got {self.gpu_price}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _int_at_least(name: str, value: Any, low: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    _check(number == value or isinstance(value, str), f"{name} must be an integer, got {value!r}")
    _check(number >= low, f"{name} must be >= {low}, got {number}")
    return number


def average_lengths(prompt: int | None, output: int | None, max_model_len: int) -> tuple[int, int]:
    """The average prompt and output lengths: the given ones, with defaults for the others that
    leave both inside ``max_model_len`` (a 2:1 split when neither is given and the defaults don't fit)."""
    for name, value in (("avg_prompt_len", prompt), ("avg_output_len", output)):
        _check(value is None or value < max_model_len,
               f"{name} ({value}) must be shorter than max_model_len ({max_model_len})")
    if prompt is None and output is None:
        fits = DEFAULT_PROMPT_LEN + DEFAULT_OUTPUT_LEN <= max_model_len
        prompt = DEFAULT_PROMPT_LEN if fits else max(1, max_model_len * 2 // 3)
    if prompt is None:
        prompt = min(DEFAULT_PROMPT_LEN, max(1, max_model_len - output))
    if output is None:
        output = min(DEFAULT_OUTPUT_LEN, max(1, max_model_len - prompt))
    _check(prompt + output <= max_model_len,
           f"avg_prompt_len + avg_output_len ({prompt} + {output}) exceeds max_model_len ({max_model_len})")
    return prompt, output
