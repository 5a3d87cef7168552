"""One typed configuration tree for the whole engine.

Built once at the entry point (``LLM(...)`` or the CLI) and passed down explicitly.
Each field's ``help`` metadata is written once here and reused as CLI help text.
"""

from __future__ import annotations

import json
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


QUANTIZATION_METHODS = ["gptq", "awq", "compressed-tensors", "fp8", "int8", "int4"]
LM_HEAD_QUANTIZATIONS = ["int8", "int4", "fp8"]  # the on-the-fly methods
QUANTIZATION_ACTIVATIONS = ["none", "int8"]
KV_CACHE_DTYPES = ["auto", "fp8", "fp8_e4m3", "int8"]


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
    quantization: str | None = field(default=None, metadata=_help(
        "Weight quantization (vLLM's names). Pre-quantized checkpoints (gptq, awq, compressed-tensors, fp8) "
        "are detected from their config; naming one that contradicts the checkpoint is an error. On an "
        "unquantized checkpoint: int8 (weight-only, per output channel; tureen's own), int4 (weight-only, "
        "asymmetric, per group of quantization_group_size inputs; tureen's own) or fp8 (e4m3, per output "
        "channel) quantize the weights at load time.", choices=QUANTIZATION_METHODS))
    quantization_group_size: int = field(default=128, metadata=_help(
        "Group size of on-the-fly int4 quantization (inputs per scale and zero point; -1: one group per row)."))
    quantize_lm_head: bool = field(default=False, metadata=_help(
        "With on-the-fly quantization (int8, int4, fp8), quantize the LM head too, as llama.cpp's Q8_0 and "
        "Q4_0 files do. It is read at every decode step (on small models as many bytes as all the layers), "
        "so it speeds up batch-1 decode; off by default, since it moves the logits more than the layers do."))
    lm_head_quantization: str | None = field(default=None, metadata=_help(
        "With on-the-fly quantization: quantize the LM head with this method (int8, int4 or fp8) instead of "
        "--quantization's; implies --quantize-lm-head. An int4 model with an int8 head keeps most of the "
        "batch-1 speed of a fully int4 one and nearly the fidelity of a float32 head.",
        choices=LM_HEAD_QUANTIZATIONS))
    quantization_activation: str = field(default="none", metadata=_help(
        "Activations of quantized linear layers: none (float32 times the weight dequantized in registers; "
        "exact against dequantize-then-matmul) or int8 (W8A8-dynamic: each row quantized to int8 per block "
        "of up to 128 inputs on every call, integer dot products with VNNI, as llama.cpp's Q8_0/Q4_0 do; "
        "faster, numerically different). Needs a quantized model and the native CPU kernels.",
        choices=QUANTIZATION_ACTIVATIONS))

    def __post_init__(self) -> None:
        if self.quantization is not None:
            self.quantization = self.quantization.lower().replace("_", "-")
            if self.quantization not in QUANTIZATION_METHODS:
                raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}, "
                                  f"got {self.quantization!r}")
        if self.lm_head_quantization is not None:
            if self.lm_head_quantization not in LM_HEAD_QUANTIZATIONS:
                raise ConfigError(f"lm_head_quantization must be one of {', '.join(LM_HEAD_QUANTIZATIONS)}, "
                                  f"got {self.lm_head_quantization!r}")
            self.quantize_lm_head = True
        if self.quantization_activation not in QUANTIZATION_ACTIVATIONS:
            raise ConfigError(f"quantization_activation must be one of {', '.join(QUANTIZATION_ACTIVATIONS)}, "
                              f"got {self.quantization_activation!r}")
        if self.quantization_group_size != -1 and self.quantization_group_size < 1:
            raise ConfigError(f"quantization_group_size must be -1 or >= 1, got {self.quantization_group_size}")
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
    prefix_caching_hash_algo: str = field(default="sha256", metadata=_help(
        "How the prefix cache hashes a full block: sha256 (collision-resistant, over the token bytes), blake2b "
        "(keyed BLAKE2b with a random per-process key: collision-resistant and unpredictable) or builtin "
        "(Python's hash(): fastest, neither; trusted single-tenant use only). A request's cache_salt is "
        "mixed into its first block either way.", choices=["sha256", "blake2b", "builtin"]))
    num_gpu_blocks_override: int | None = field(default=None, metadata=_help(
        "Use exactly this many KV blocks, ignoring the memory budget (testing and tuning)."))
    kv_cache_dtype: str = field(default="auto", metadata=_help(
        "KV cache storage: auto (the model dtype), fp8 / fp8_e4m3 (float8 e4m3) or int8, each with one float32 "
        "scale per token and KV head (dynamic, set when the token is written). Quantized KV takes "
        "head_dim + 4 bytes per token, head and K/V instead of head_dim x the dtype's size.",
        choices=KV_CACHE_DTYPES))

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")
        if self.prefix_caching_hash_algo not in ("sha256", "blake2b", "builtin"):
            raise ConfigError("prefix_caching_hash_algo must be sha256, blake2b or builtin, got "
                              f"{self.prefix_caching_hash_algo!r}")
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
    decode_stack: str = field(default="native", metadata=_help(
        "How steps where every request decodes one token run on the native CPU kernels: native (the whole "
        "decoder stack in one C call, fed from persistent batch state; falls back to layers when the model, "
        "its quantization or the KV cache dtype is not supported) or layers (layer by layer from Python, "
        "like prefill).",
        choices=["native", "layers"]))
    decode_runtime: str = field(default="pool", metadata=_help(
        "How the native decode step's threads share its work: pool (tureen's own threads run the whole step "
        "as one program; a thread that another process has taken the core of is not waited for, its task "
        "is recomputed by the others) or openmp (one OpenMP region per kernel, each waiting for every "
        "thread). Both give the same tokens. With pool, sampling after such a step runs on one thread.",
        choices=["pool", "openmp"]))

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.cpu_kernels not in ("auto", "on", "off"):
            raise ConfigError(f"cpu_kernels must be auto, on or off, got {self.cpu_kernels!r}")
        if self.decode_stack not in ("native", "layers"):
            raise ConfigError(f"decode_stack must be native or layers, got {self.decode_stack!r}")
        if self.decode_runtime not in ("pool", "openmp"):
            raise ConfigError(f"decode_runtime must be pool or openmp, got {self.decode_runtime!r}")


STRUCTURED_OUTPUTS_BACKENDS = ["auto", "xgrammar"]


@dataclass
class StructuredOutputsConfig:
    structured_outputs_backend: str = field(default="auto", metadata=_help(
        "Grammar backend that enforces structured outputs (response_format, structured_outputs, tool_choice "
        "required or named): auto (xgrammar) or xgrammar.", choices=STRUCTURED_OUTPUTS_BACKENDS,
        aliases=["--structured-outputs-config.backend"]))
    structured_outputs_compile_threads: int = field(default=2, metadata=_help(
        "Threads that compile grammars in the background and fill each step's token bitmask."))
    structured_outputs_cache_size: int = field(default=1024, metadata=_help(
        "Compiled grammars kept, keyed by a hash of the constraint (least recently used go first)."))

    def __post_init__(self) -> None:
        if self.structured_outputs_backend not in STRUCTURED_OUTPUTS_BACKENDS:
            raise ConfigError(f"structured_outputs_backend must be one of {STRUCTURED_OUTPUTS_BACKENDS}, "
                              f"got {self.structured_outputs_backend!r}")
        if self.structured_outputs_compile_threads < 1:
            raise ConfigError("structured_outputs_compile_threads must be >= 1, "
                              f"got {self.structured_outputs_compile_threads}")
        if self.structured_outputs_cache_size < 1:
            raise ConfigError(f"structured_outputs_cache_size must be >= 1, got {self.structured_outputs_cache_size}")


SPEC_METHODS = ["ngram", "draft_model"]
SELF_DRAFT_QUANTIZATIONS = ["int8", "int4", "fp8"]


@dataclass
class SpeculativeConfig:
    """Speculative decoding, with vLLM's ``--speculative-config`` keys (plus ``disable_by_batch_size``)."""

    method: str = field(default="ngram", metadata=_help(
        "Proposer: ngram (prompt lookup) or draft_model (a separate small checkpoint, or \"self\" for the "
        "target's own weights quantized).", choices=SPEC_METHODS))
    num_speculative_tokens: int = field(default=0, metadata=_help("Tokens drafted per request and step (k >= 1)."))
    model: str | None = field(default=None, metadata=_help(
        "draft_model: the draft checkpoint (same tokenizer as the target), or \"self\" for the quantized self-draft."))
    quantization: str | None = field(default=None, metadata=_help(
        "draft_model: quantize the draft's weights at load time (int8, int4 or fp8); required for model \"self\".",
        choices=SELF_DRAFT_QUANTIZATIONS))
    prompt_lookup_max: int | None = field(default=None, metadata=_help(
        "ngram: longest suffix (in tokens) looked up earlier in the sequence (default 5, or prompt_lookup_min)."))
    prompt_lookup_min: int | None = field(default=None, metadata=_help(
        "ngram: shortest suffix looked up (default 1, or prompt_lookup_max when only that is set lower)."))
    disable_by_batch_size: int | None = field(default=16, metadata=_help(
        "Speculate only while at most this many requests are running (None: always). Verification costs "
        "k + 1 positions per request, which pays at small batch and not at large."))

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ConfigError(f"speculative_config.method must be one of {', '.join(SPEC_METHODS)}, got {self.method!r}")
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            raise ConfigError("speculative_config.num_speculative_tokens must be an integer >= 1, "
                              f"got {self.num_speculative_tokens!r}")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ConfigError(f"speculative_config.disable_by_batch_size must be >= 1, got {self.disable_by_batch_size}")
        if self.method == "ngram":
            self._check_ngram()
        else:
            self._check_draft_model()

    def _check_ngram(self) -> None:
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        self.prompt_lookup_max = hi if hi is not None else max(5, lo or 1)
        self.prompt_lookup_min = lo if lo is not None else min(1, self.prompt_lookup_max)
        if self.prompt_lookup_min < 1 or self.prompt_lookup_max < self.prompt_lookup_min:
            raise ConfigError("speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                              f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")
        if self.model is not None:
            raise ConfigError("speculative_config.model is for method draft_model; ngram needs no model")

    def _check_draft_model(self) -> None:
        if not self.model:
            raise ConfigError("speculative_config.method draft_model needs a model (a checkpoint, or \"self\")")
        if self.quantization is not None and self.quantization not in SELF_DRAFT_QUANTIZATIONS:
            raise ConfigError(f"speculative_config.quantization must be one of {', '.join(SELF_DRAFT_QUANTIZATIONS)}, "
                              f"got {self.quantization!r}")
        if self.model == "self" and self.quantization is None:
            raise ConfigError("a self-draft (model \"self\") needs quantization int8, int4 or fp8")

    @property
    def is_self_draft(self) -> bool:
        return self.method == "draft_model" and self.model == "self"

    @classmethod
    def parse(cls, value: Any) -> SpeculativeConfig | None:
        """From ``LLM(speculative_config={...})``, a ``--speculative-config`` JSON string, or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--speculative-config is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"speculative_config must be a JSON object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"unknown speculative_config key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**value)


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    speculative_config: SpeculativeConfig | None = None  # None: no speculative decoding

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs: Any) -> "EngineConfig":
        """Build the tree from flat keyword arguments (``LLM(...)`` and the CLI use this)."""
        speculative = SpeculativeConfig.parse(kwargs.pop("speculative_config", None))
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
            structured_outputs=StructuredOutputsConfig(**parts["structured_outputs"]),
            speculative_config=speculative,
        )


_SECTIONS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "device": DeviceConfig,
             "structured_outputs": StructuredOutputsConfig}


def engine_fields() -> list[tuple[str, Any]]:
    """Every flat engine option as ``(section, dataclass Field)``, for building CLI flags."""
    return [(section, f) for section, sub in _SECTIONS.items() for f in fields(sub)]
