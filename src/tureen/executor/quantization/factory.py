"""Which linear method each layer gets: the engine's quantization config (if any) over its backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tureen.executor.quantization.base import LinearBackend, LinearLayerLike, LinearMethod, LinearMethodFactory
from tureen.executor.quantization.unquantized import NativeLinearMethod, OneDnnLinearMethod, TorchLinearMethod

if TYPE_CHECKING:
    from tureen.executor.quantization.config import QuantizationConfig


def float_method(backend: LinearBackend) -> LinearMethod:
    """The unquantized method of a backend."""
    if backend.kind == "native":
        return NativeLinearMethod(backend.ops)  # type: ignore[arg-type]
    return OneDnnLinearMethod() if backend.kind == "onednn" else TorchLinearMethod()


def linear_method_factory(backend: LinearBackend, quant: "QuantizationConfig | None" = None) -> LinearMethodFactory:
    unquantized = float_method(backend)
    if quant is None:
        return lambda name, layer: unquantized

    def method_for(name: str, layer: LinearLayerLike) -> LinearMethod:
        return quant.method_for(name, layer, backend) or unquantized

    return method_for


def linear_kernels(model) -> dict[str, int]:
    """What multiplies the model's linear layers, and how many: {"native int8 GEMM": 14, ...}."""
    out: dict[str, int] = {}
    for _, layer in model.linear_layers():
        kernel = getattr(layer, "kernel", None)
        what = kernel.describe() if kernel is not None else layer.method.describe()
        out[what] = out.get(what, 0) + 1
    return out


def model_weight_bytes(model) -> int:
    """Bytes of all parameters and of the packed weights methods hold (each storage counted once)."""
    seen: set[int] = set()

    def size(t: torch.Tensor | None) -> int:
        if t is None:
            return 0
        if t.is_mkldnn:  # oneDNN's packed weights have no storage to share
            return t.numel() * t.element_size()
        if t.data_ptr() in seen:
            return 0
        seen.add(t.data_ptr())
        return t.numel() * t.element_size()

    total = sum(size(p) for p in model.parameters())
    for _, layer in model.linear_layers():
        packed, kernel = getattr(layer, "packed_weight", None), getattr(layer, "kernel", None)
        if isinstance(packed, torch.Tensor):
            total += size(packed)
        elif packed is not None:  # the native float GEMM's PackedLinear
            total += size(packed.weight) + size(packed.bias)
        if kernel is not None:
            total += kernel.nbytes()
    return total
