"""Quantized linear methods: a checkpoint format loaded as written, or a float weight quantized at load.

Both end in one canonical weight (``weights.py``) per layer, multiplied by the kernel that
``kernels.choose_kernel`` picks for the backend. Fused layers (q/k/v, gate/up) receive each
shard's tensors through the loader's declarative mapping; the shards are converted one by one
and stacked along the output dim, so no format needs to know about fusing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from tureen.errors import ModelLoadError
from tureen.executor.quantization.base import LinearBackend, LinearLayerLike, LinearMethod
from tureen.executor.quantization.kernels import QuantKernel, choose_kernel
from tureen.executor.quantization.unquantized import FloatWeightsMethod, copy_checked, new_param
from tureen.executor.quantization.weights import CanonicalWeight, concat_shards


@dataclass(frozen=True)
class TensorSpec:
    """One on-disk tensor of one shard: the shapes it may have and its allowed dtypes."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...] | None = None  # None: any floating dtype
    required: bool = True

    def check(self, t: Tensor) -> None:
        if tuple(t.shape) not in self.shapes:
            want = " or ".join(str(s) for s in self.shapes)
            raise ModelLoadError(f"has shape {tuple(t.shape)}, expected {want}")
        if self.dtypes is None and not t.is_floating_point():
            raise ModelLoadError(f"has dtype {t.dtype}, expected a floating dtype")
        if self.dtypes is not None and t.dtype not in self.dtypes:
            raise ModelLoadError(f"has dtype {t.dtype}, expected {' or '.join(map(str, self.dtypes))}")


class CheckpointFormat(ABC):
    """How one pre-quantized format stores a layer's weight, and how to read it."""

    name: str

    def check_layer(self, in_features: int, shard_rows: list[int], where: str) -> None:
        """Raise ModelLoadError (naming the config field) when the layer cannot hold this format."""

    @abstractmethod
    def tensor_specs(self, in_features: int, rows: int) -> dict[str, TensorSpec]: ...

    @abstractmethod
    def to_canonical(self, tensors: dict[str, Tensor], in_features: int, rows: int, where: str) -> CanonicalWeight:
        ...


class QuantizedLinearMethod(LinearMethod):
    """A layer stored in a pre-quantized checkpoint format (GPTQ, AWQ, compressed-tensors, fp8)."""

    def __init__(self, fmt: CheckpointFormat, backend: LinearBackend) -> None:
        self.fmt, self.backend = fmt, backend

    def create_weights(self, layer: LinearLayerLike) -> None:
        self.fmt.check_layer(layer.in_features, [rows for _, rows in layer.shards.values()], layer.prefix or "layer")
        layer.register_parameter("bias", new_param(layer.out_features) if layer.has_bias else None)
        layer.raw_shards = {shard_id: {} for shard_id in layer.shards}  # type: ignore[attr-defined]

    def tensor_names(self, layer: LinearLayerLike) -> tuple[set[str], set[str]]:
        rows = next(iter(layer.shards.values()))[1]
        specs = self.fmt.tensor_specs(layer.in_features, rows)
        required = {n for n, s in specs.items() if s.required} | ({"bias"} if layer.has_bias else set())
        return required, {n for n, s in specs.items() if not s.required}

    def load(self, layer: LinearLayerLike, shard_id: Any, tensor_name: str, tensor: Tensor) -> None:
        offset, rows = layer.shards[shard_id]
        if tensor_name == "bias" and layer.has_bias:
            copy_checked(layer.bias.data.narrow(0, offset, rows), tensor)  # type: ignore[attr-defined]
            return
        spec = self.fmt.tensor_specs(layer.in_features, rows).get(tensor_name)
        if spec is None:
            raise ModelLoadError(f"is not a tensor of the {self.fmt.name} format")
        spec.check(tensor)
        layer.raw_shards[shard_id][tensor_name] = tensor  # type: ignore[attr-defined]

    def process_weights_after_loading(self, layer: LinearLayerLike) -> None:
        parts = []
        for shard_id, (_, rows) in layer.shards.items():
            where = layer.prefix + ("" if shard_id is None else f" (shard {shard_id})")
            tensors = layer.raw_shards[shard_id]  # type: ignore[attr-defined]
            parts.append(self.fmt.to_canonical(tensors, layer.in_features, rows, where))
        del layer.raw_shards  # type: ignore[attr-defined]
        install_kernel(layer, concat_shards(parts, layer.prefix), self.backend)

    def apply(self, layer: LinearLayerLike, x: Tensor, bias: Tensor | None) -> Tensor:
        return layer.kernel.apply(x, bias, layer.epilogue)  # type: ignore[attr-defined]

    def dequantized_weight(self, layer: LinearLayerLike) -> Tensor:
        return layer.kernel.dequantized_weight()  # type: ignore[attr-defined]

    def describe(self) -> str:
        return self.fmt.name


def install_kernel(layer: LinearLayerLike, weight: CanonicalWeight, backend: LinearBackend) -> None:
    bias = getattr(layer, "bias", None)
    kernel: QuantKernel = choose_kernel(weight, layer, backend, bias, backend.fp8_cpu_path)
    layer.kernel = kernel  # type: ignore[attr-defined]
    if bias is not None and getattr(kernel, "packed", None) is not None:
        layer.bias = None  # type: ignore[attr-defined]  # packed with the weight


class OnTheFlyMethod(FloatWeightsMethod):
    """Load the float weight as usual, then quantize it once (int8, int4 or fp8 on an unquantized checkpoint)."""

    def __init__(self, name: str, quantize: Callable[[Tensor], CanonicalWeight], backend: LinearBackend) -> None:
        self.name, self.quantize, self.backend = name, quantize, backend

    def process_weights_after_loading(self, layer: LinearLayerLike) -> None:
        weight = self.quantize(layer.weight.detach())  # type: ignore[attr-defined]
        del layer.weight  # type: ignore[attr-defined]
        layer.weight = None  # type: ignore[attr-defined]
        install_kernel(layer, weight, self.backend)

    def apply(self, layer: LinearLayerLike, x: Tensor, bias: Tensor | None) -> Tensor:
        return layer.kernel.apply(x, bias, layer.epilogue)  # type: ignore[attr-defined]

    def dequantized_weight(self, layer: LinearLayerLike) -> Tensor:
        if getattr(layer, "kernel", None) is None:
            return super().dequantized_weight(layer)
        return layer.kernel.dequantized_weight()  # type: ignore[attr-defined]

    def describe(self) -> str:
        return f"{self.name} (on the fly)"
