"""Quantization configs: detected from the checkpoint or asked for, and the method each layer gets.

A pre-quantized checkpoint says what it is in ``config.json``'s ``quantization_config`` (or in
``quantize_config.json`` from AutoGPTQ / ``quant_config.json`` from AutoAWQ): ``quant_method``
lowercased, ``compressed_tensors`` read as ``compressed-tensors``. ``--quantization`` may name the
same method or be left out; naming another is an error. On an unquantized checkpoint, ``int8``,
``int4`` and ``fp8`` quantize the float weights at load time.

Layers that stay unquantized: those the checkpoint names in ``ignore`` (compressed-tensors: exact
module names or ``re:`` patterns), ``modules_to_not_convert`` (AWQ / transformers: substrings)
or ``ignored_layers`` (fp8), and the LM head unless the checkpoint quantizes it (GPTQ ``lm_head``,
or a compressed-tensors group that targets it). The shards of a fused layer must agree.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from tureen.errors import ConfigError, ModelLoadError
from tureen.executor.models.layers import checkpoint_module_names
from tureen.executor.quantization.base import LinearBackend, LinearLayerLike, LinearMethod
from tureen.executor.quantization.formats import AwqFormat, Fp8Format, GptqFormat
from tureen.executor.quantization.methods import CheckpointFormat, OnTheFlyMethod, QuantizedLinearMethod
from tureen.executor.quantization.weights import quantize_fp8, quantize_groups, quantize_int8

PRE_QUANTIZED = ("gptq", "awq", "compressed-tensors", "fp8")
ON_THE_FLY = ("int8", "int4", "fp8")


class QuantizationConfig(ABC):
    name: str
    ignore: list[str]
    quantizes_lm_head: bool = False

    def method_for(self, name: str, layer: LinearLayerLike, backend: LinearBackend) -> LinearMethod | None:
        """The layer's quantized method, or None to leave it unquantized."""
        names = checkpoint_module_names(name)
        skipped = [self.is_ignored(n) for n in names]
        if any(skipped) and not all(skipped):
            raise ModelLoadError(f"{name}: the quantization config leaves some of its fused shards "
                                 f"({', '.join(names)}) unquantized and quantizes others")
        if skipped[0] or (name == "lm_head" and not self.quantizes_lm_head):
            return None
        return self.layer_method(names[0], backend)

    def is_ignored(self, name: str) -> bool:
        return any(n == name or name.endswith("." + n) or (n.startswith("re:") and re.match(n[3:], name))
                   for n in self.ignore)

    @abstractmethod
    def layer_method(self, name: str, backend: LinearBackend) -> LinearMethod: ...

    def describe(self) -> str:
        return self.name


class _FormatConfig(QuantizationConfig):
    """A pre-quantized format whose layers all share one ``CheckpointFormat``."""

    fmt: CheckpointFormat

    def layer_method(self, name: str, backend: LinearBackend) -> LinearMethod:
        return QuantizedLinearMethod(self.fmt, backend)


class SubstringIgnore:
    """transformers' ``modules_to_not_convert``: a layer is skipped when any entry is part of its name."""

    def is_ignored(self, name: str) -> bool:  # mixed into configs that use it
        return any(n in name for n in self.ignore)  # type: ignore[attr-defined]


def _int(qc: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if k in qc and qc[k] is not None:
            try:
                return int(qc[k])
            except (TypeError, ValueError) as e:
                raise ModelLoadError(f"quantization_config.{k}={qc[k]!r} is not an integer") from e
    if default is None:
        raise ModelLoadError(f"quantization_config has no {' / '.join(keys)}")
    return default


class GptqConfig(SubstringIgnore, _FormatConfig):
    """GPTQ, with GPTQModel's ``dynamic`` per-module rules: a ``-:regex`` key leaves matching modules
    unquantized; ``+:regex`` (or a bare regex) overrides bits / group_size for them."""

    name = "gptq"

    def __init__(self, qc: dict[str, Any]) -> None:
        fmt = str(qc.get("checkpoint_format") or "gptq").lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ModelLoadError(f"quantization_config.checkpoint_format={fmt!r} is not supported (gptq, gptq_v2)")
        self.zero_offset = 0 if fmt == "gptq_v2" else 1
        self.bits, self.group_size = _int(qc, "bits"), _int(qc, "group_size", default=-1)
        self.desc_act, self.sym = bool(qc.get("desc_act", False)), bool(qc.get("sym", True))
        self.fmt = GptqFormat(self.bits, self.group_size, self.zero_offset)
        self.quantizes_lm_head = bool(qc.get("lm_head", False))
        self.ignore = list(qc.get("modules_to_not_convert") or [])
        dynamic = qc.get("dynamic") or {}
        if not isinstance(dynamic, dict):
            raise ModelLoadError("quantization_config.dynamic must be an object of regex -> overrides")
        self.skip = [re.compile(k[2:]) for k in dynamic if k.startswith("-:")]
        self.overrides = [(re.compile(k.removeprefix("+:")), v or {}) for k, v in dynamic.items()
                          if not k.startswith("-:")]

    def is_ignored(self, name: str) -> bool:
        return super().is_ignored(name) or any(p.match(name) for p in self.skip)

    def layer_method(self, name: str, backend: LinearBackend) -> LinearMethod:
        rule = next((v for p, v in self.overrides if p.match(name)), None)
        if rule is None:
            return super().layer_method(name, backend)
        fmt = GptqFormat(_int(rule, "bits", default=self.bits), _int(rule, "group_size", default=self.group_size),
                         self.zero_offset)
        return QuantizedLinearMethod(fmt, backend)

    def describe(self) -> str:
        return (f"gptq {self.bits}-bit, group_size {self.group_size}, desc_act {self.desc_act}, "
                f"{'sym' if self.sym else 'asym'}" + (", with dynamic per-module rules" if self.overrides or self.skip
                                                      else ""))


class AwqConfig(SubstringIgnore, _FormatConfig):
    name = "awq"

    def __init__(self, qc: dict[str, Any]) -> None:
        version = str(qc.get("version") or "gemm").lower()
        if version != "gemm":
            raise ModelLoadError(f"quantization_config.version={version!r} is not supported for awq (gemm)")
        if not qc.get("zero_point", True):
            raise ModelLoadError("quantization_config.zero_point=false is not supported for awq")
        self.bits, self.group_size = _int(qc, "w_bit", "bits"), _int(qc, "q_group_size", "group_size")
        self.fmt = AwqFormat(self.bits, self.group_size)
        self.ignore = list(qc.get("modules_to_not_convert") or [])

    def describe(self) -> str:
        return f"awq {self.bits}-bit GEMM, group_size {self.group_size}"


class Fp8CheckpointConfig(_FormatConfig):
    name = "fp8"

    def __init__(self, qc: dict[str, Any]) -> None:
        if qc.get("weight_block_size"):
            raise ModelLoadError("quantization_config.weight_block_size (block-wise fp8) is not supported")
        self.fmt = Fp8Format("fp8")
        self.ignore = list(qc.get("ignored_layers") or qc.get("modules_to_not_convert") or [])

    def describe(self) -> str:
        return "fp8 e4m3 (checkpoint)"


class OnTheFlyConfig(QuantizationConfig):
    """tureen quantizes an unquantized checkpoint's linear layers at load (the LM head only when asked)."""

    def __init__(self, name: str, group_size: int = 128, lm_head: bool = False,
                 lm_head_name: str | None = None) -> None:
        self.name, self.group_size, self.ignore = name, group_size, []
        self.quantizes_lm_head = lm_head or lm_head_name is not None
        self.lm_head_name = lm_head_name or name  # the LM head's own method (an int8 head on int4 layers)

    def layer_method(self, name: str, backend: LinearBackend) -> LinearMethod:
        kind = self.lm_head_name if name == "lm_head" else self.name
        if kind == "int8":
            return OnTheFlyMethod("int8", quantize_int8, backend)
        if kind == "fp8":
            return OnTheFlyMethod("fp8", quantize_fp8, backend)
        return OnTheFlyMethod(f"int4 g{self.group_size}", lambda w: quantize_groups(w, 4, self.group_size), backend)

    def describe(self) -> str:
        what = {"int8": "int8 weight-only, per output channel", "fp8": "fp8 e4m3, per output channel",
                "int4": f"int4 weight-only, asymmetric, group {self.group_size}"}[self.name]
        head = "" if not self.quantizes_lm_head else (
            ", LM head included" if self.lm_head_name == self.name else f", LM head in {self.lm_head_name}")
        return f"{what} (quantized at load{head})"


def load_quantization_config(hf_config: dict[str, Any], checkpoint_dir: Path | None) -> dict[str, Any] | None:
    """The checkpoint's quantization config dict (``quant_method`` normalised), or None."""
    qc = hf_config.get("quantization_config")
    default_method = None
    if qc is None and checkpoint_dir is not None:
        for fname, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
            path = Path(checkpoint_dir) / fname
            if path.is_file():
                try:
                    qc = json.loads(path.read_text())
                except (OSError, json.JSONDecodeError) as e:
                    raise ModelLoadError(f"cannot read {path}: {e}") from e
                default_method = method
                break
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ModelLoadError("quantization_config must be a JSON object")
    method = str(qc.get("quant_method") or default_method or "").lower().replace("_", "-")
    if not method:
        raise ModelLoadError("quantization_config has no quant_method")
    return {**qc, "quant_method": method}


def resolve_quantization(requested: str | None, hf_config: dict[str, Any], checkpoint_dir: Path | None,
                         group_size: int = 128, lm_head: bool = False,
                         lm_head_method: str | None = None) -> QuantizationConfig | None:
    """The engine's quantization: the checkpoint's (checked against ``requested``) or on the fly."""
    qc = load_quantization_config(hf_config, checkpoint_dir)
    if qc is None:
        if requested is None:
            if lm_head:
                raise ConfigError("quantize_lm_head (and lm_head_quantization) needs on-the-fly quantization "
                                  "(--quantization int8, int4 or fp8)")
            return None
        if requested not in ON_THE_FLY:
            raise ConfigError(f"quantization={requested!r} needs a {requested} checkpoint, but this checkpoint "
                              f"has no quantization_config (on the fly: {', '.join(ON_THE_FLY)})")
        return OnTheFlyConfig(requested, group_size, lm_head, lm_head_method)
    if lm_head:
        raise ConfigError("quantize_lm_head (and lm_head_quantization) applies to on-the-fly quantization; this "
                          "checkpoint is quantized already (its own config says whether the LM head is)")
    method = qc["quant_method"]
    if requested is not None and requested != method:
        raise ConfigError(f"quantization={requested!r} contradicts the checkpoint, which is quantized with "
                          f"quant_method={method!r}; leave --quantization out or pass {method!r}")
    from tureen.executor.quantization.compressed_tensors import CompressedTensorsConfig

    configs = {"gptq": GptqConfig, "awq": AwqConfig, "fp8": Fp8CheckpointConfig,
               "compressed-tensors": CompressedTensorsConfig}
    if method not in configs:
        raise ModelLoadError(f"quantization_config.quant_method={method!r} is not supported "
                             f"(supported: {', '.join(configs)})")
    return configs[method](qc)


def check_activation(activation: str, quant: QuantizationConfig | None, backend_kind: str) -> str:
    """``quantization_activation`` checked against the model's quantization and linear backend."""
    if activation == "none":
        return activation
    if quant is None:
        raise ConfigError(f"quantization_activation={activation!r} applies to quantized layers; this model is not "
                          "quantized (add --quantization int8 or int4, or load a quantized checkpoint)")
    if backend_kind != "native":
        raise ConfigError(f"quantization_activation={activation!r} runs on the native CPU kernels only, and they "
                          "are not in use here (cpu_kernels off, not on CPU, or not float32)")
    return activation
