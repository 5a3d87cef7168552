"""Unquantized linear methods: one float weight ``(out, in)`` and bias, multiplied three ways.

- ``TorchLinearMethod``: ``F.linear`` (any device and dtype; the CUDA path);
- ``OneDnnLinearMethod``: oneDNN on a pre-packed copy (CPU float32 without the native kernels);
- ``NativeLinearMethod``: the native AVX2 GEMM of ``cpu_kernels`` on 16-column panels, with the
  ``silu(gate) * up`` epilogue fused into the GEMM when the gate width is a multiple of 8.

Packing replaces the plain weight (no second copy in memory). The packed copy is private: packing
an LM head tied to the embedding leaves the embedding's tensor alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tureen.errors import ModelLoadError
from tureen.executor.cpu_kernels import CpuOps, pack_linear_weight, packed_linear
from tureen.executor.quantization.base import SILU_MUL, LinearLayerLike, LinearMethod


def new_param(*shape: int, dtype: torch.dtype | None = None) -> nn.Parameter:
    """An uninitialised parameter on the current default device (the loader fills it)."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def copy_checked(dst: Tensor, src: Tensor, what: str = "") -> None:
    if dst.shape != src.shape:
        raise ModelLoadError(f"shape mismatch{what}: checkpoint has {tuple(src.shape)}, model expects "
                             f"{tuple(dst.shape)}")
    dst.copy_(src)


class FloatWeightsMethod(LinearMethod):
    """Creates and loads the float ``weight`` (and ``bias``) that every unquantized method starts from."""

    def create_weights(self, layer: LinearLayerLike) -> None:
        layer.register_parameter("weight", new_param(layer.out_features, layer.in_features))
        layer.register_parameter("bias", new_param(layer.out_features) if layer.has_bias else None)

    def tensor_names(self, layer: LinearLayerLike) -> tuple[set[str], set[str]]:
        return ({"weight", "bias"} if layer.has_bias else {"weight"}), set()

    def load(self, layer: LinearLayerLike, shard_id: Any, tensor_name: str, tensor: Tensor) -> None:
        param = getattr(layer, tensor_name, None)
        if tensor_name not in ("weight", "bias") or param is None:
            raise ModelLoadError(f"unexpected tensor {tensor_name!r} for an unquantized linear layer")
        offset, rows = layer.shards[shard_id]
        copy_checked(param.data.narrow(0, offset, rows), tensor)

    def dequantized_weight(self, layer: LinearLayerLike) -> Tensor:
        return layer.weight.detach().float()  # type: ignore[attr-defined]


class TorchLinearMethod(FloatWeightsMethod):
    def describe(self) -> str:
        return "F.linear"

    def apply(self, layer: LinearLayerLike, x: Tensor, bias: Tensor | None) -> Tensor:
        return layer.epilogue(F.linear(x, layer.weight, bias))  # type: ignore[attr-defined]


def _drop_weight(layer: LinearLayerLike) -> None:
    """Drop the plain weight Parameter (the embedding keeps its own reference when tied)."""
    del layer.weight  # type: ignore[attr-defined]
    layer.weight = None  # type: ignore[attr-defined]


class OneDnnLinearMethod(FloatWeightsMethod):
    def describe(self) -> str:
        return "oneDNN float32 GEMM"

    def process_weights_after_loading(self, layer: LinearLayerLike) -> None:
        layer.packed_weight = pack_linear_weight(layer.weight)  # type: ignore[attr-defined]
        _drop_weight(layer)

    def apply(self, layer: LinearLayerLike, x: Tensor, bias: Tensor | None) -> Tensor:
        return layer.epilogue(packed_linear(x, layer.packed_weight, bias))  # type: ignore[attr-defined]

    def dequantized_weight(self, layer: LinearLayerLike) -> Tensor:
        raise NotImplementedError("oneDNN's packed weight layout is opaque")


class NativeLinearMethod(FloatWeightsMethod):
    """The native float32 GEMM; bias packed with the weight, gate/up + silu fused when it can be."""

    def __init__(self, ops: CpuOps) -> None:
        self.ops = ops

    def describe(self) -> str:
        return "native float32 GEMM"

    def fuses_epilogue(self, layer: LinearLayerLike) -> bool:
        return layer.epilogue is SILU_MUL and (layer.out_features // 2) % 8 == 0

    def process_weights_after_loading(self, layer: LinearLayerLike) -> None:
        bias = layer.bias  # type: ignore[attr-defined]
        layer.packed_weight = self.ops.pack_linear(  # type: ignore[attr-defined]
            layer.weight.data, None if bias is None else bias.data, self.fuses_epilogue(layer))  # type: ignore
        layer.bias = None  # type: ignore[attr-defined]  # packed with the weight
        _drop_weight(layer)

    def apply(self, layer: LinearLayerLike, x: Tensor, bias: Tensor | None) -> Tensor:
        out = self.ops.linear(x, layer.packed_weight)  # type: ignore[attr-defined]
        return out if layer.packed_weight.gate_up else layer.epilogue(out, self.ops)  # type: ignore[attr-defined]

    def dequantized_weight(self, layer: LinearLayerLike) -> Tensor:
        p = layer.packed_weight  # type: ignore[attr-defined]
        if p.gate_up:
            raise NotImplementedError("a gate_up weight is packed with its halves interleaved")
        return p.weight.permute(0, 2, 1).reshape(-1, p.in_features)[:p.rows].clone()
