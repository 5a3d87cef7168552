"""One typed configuration tree for the whole engine.

Built once at the entry point (``LLM(...)`` or the CLI) and passed down explicitly.
Each field's ``help`` metadata is written once here and reused as CLI help text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

from tureen.errors import ConfigError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(value: int | str) -> int:
    """Parse a byte size such as ``536870912``, ``"512MiB"`` or ``"4GB"``."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(f"cannot parse byte size {value!r}; use e.g. 536870912, '512MiB' or '4GiB'")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class ModelConfig:
    model: str | None = field(default=None, metadata=_help(
        "Local checkpoint directory or Hugging Face hub id. None serves the built-in demo model "
        "(random weights)."))
    revision: str | None = field(default=None, metadata=_help("Hub revision (branch, tag or commit)."))
    dtype: str = field(default="auto", metadata=_help(
        "Weight and activation dtype: auto (checkpoint's torch_dtype; float32 on CPU when that is "
        "float16), float32, bfloat16 or float16.", choices=["auto", "float32", "bfloat16", "float16"]))
    max_model_len: int | None = field(default=None, metadata=_help(
        "Longest sequence (prompt + output) in tokens. Default: the checkpoint's max_position_embeddings."))
    seed: int = field(default=0, metadata=_help("Global random seed for requests without their own seed."))
    chat_template: str | None = field(default=None, metadata=_help(
        "Chat template (a Jinja file path or the template itself) overriding the checkpoint's."))
    served_model_name: str | None = field(default=None, metadata=_help(
        "Model name reported by the API. Default: the model argument."))

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass
class CacheConfig:
    block_size: int = field(default=16, metadata=_help("Tokens per KV-cache block."))
    kv_cache_memory: int | str = field(default="2GiB", metadata=_help(
        "KV-cache byte budget when running on CPU (e.g. 536870912, '512MiB', '4GiB')."))
    gpu_memory_utilization: float = field(default=0.9, metadata=_help(
        "Fraction of GPU memory the engine may use (weights + activations + KV cache) on CUDA."))
    enable_prefix_caching: bool = field(default=True, metadata=_help(
        "Reuse KV blocks of identical prompt prefixes across requests."))
    num_gpu_blocks_override: int | None = field(default=None, metadata=_help(
        "Use exactly this many KV blocks, ignoring the memory budget (testing and tuning)."))

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")
        self.kv_cache_memory = parse_size(self.kv_cache_memory)
        if self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ConfigError(f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = field(default=128, metadata=_help("Most sequences in one engine step."))
    max_num_batched_tokens: int = field(default=2048, metadata=_help(
        "Token budget of one engine step; longer prompts are prefilled in chunks."))

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass
class DeviceConfig:
    device: str = field(default="auto", metadata=_help("Device: auto (cuda when available), cpu or cuda."))
    cpu_kernels: str = field(default="auto", metadata=_help(
        "Native CPU kernels for float32 (linear layers on pre-packed weights, paged decode attention, KV "
        "writes, fused norms, RoPE and the MLP activation, in C): auto (use them when they build and load, "
        "else fall back to oneDNN linear layers and torch ops with a warning), on (fail when they cannot "
        "be used) or off (plain torch ops).",
        choices=["auto", "on", "off"]))

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.cpu_kernels not in ("auto", "on", "off"):
            raise ConfigError(f"cpu_kernels must be auto, on or off, got {self.cpu_kernels!r}")


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs: Any) -> "EngineConfig":
        """Build the tree from flat keyword arguments (``LLM(...)`` and the CLI use this)."""
        parts: dict[str, dict[str, Any]] = {}
        for section, sub in _SECTIONS.items():
            names = {f.name for f in fields(sub)}
            parts[section] = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        if kwargs:
            raise ConfigError(f"unknown engine option(s): {', '.join(sorted(kwargs))}")
        return cls(
            model=ModelConfig(model=model, **parts["model"]),
            cache=CacheConfig(**parts["cache"]),
            scheduler=SchedulerConfig(**parts["scheduler"]),
            device=DeviceConfig(**parts["device"]),
        )


_SECTIONS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "device": DeviceConfig}


def engine_fields() -> list[tuple[str, Any]]:
    """Every flat engine option as ``(section, dataclass Field)``, for building CLI flags."""
    return [(section, f) for section, sub in _SECTIONS.items() for f in fields(sub)]
