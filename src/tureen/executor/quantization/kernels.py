"""How a canonical quantized weight is multiplied: chosen once per layer after loading.

- ``NativeQuantKernel``: the native int8 / int4 GEMMs of ``cpu_kernels`` (CPU, float32
  activations), weights kept packed, dequantized in registers; ``silu(gate) * up`` fused like the
  float GEMM. fp8 weights take the int8 kernel after a per-row requantization (no CPU has fp8
  math; int8 keeps them at one byte a weight and is the fastest CPU path, see README).
- ``DequantKernel``: dequantize to the activation dtype on every call, then ``F.linear``: the
  CUDA path, and the CPU path without native kernels (correct, not fast).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from tureen.executor.cpu_kernels import W8A8_MIN_GROUP
from tureen.executor.quantization.base import SILU_MUL, Epilogue, LinearBackend, LinearLayerLike
from tureen.executor.quantization.weights import CanonicalWeight, Fp8Weight, GroupWeight, Int8Weight, fp8_to_int8


class QuantKernel(ABC):
    @abstractmethod
    def apply(self, x: Tensor, bias: Tensor | None, epilogue: Epilogue) -> Tensor: ...

    @abstractmethod
    def nbytes(self) -> int: ...

    def dequantized_weight(self) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} keeps only its packed weight")

    def describe(self) -> str:
        return type(self).__name__


class DequantKernel(QuantKernel):
    def __init__(self, weight: CanonicalWeight, device: torch.device | None = None) -> None:
        # checkpoint tensors are read on CPU; keep the packed form where the activations will be
        device = device or torch.empty(0).device  # the default device of the model build
        self.weight = type(weight)(**{k: v.to(device) if isinstance(v, Tensor) else v
                                      for k, v in vars(weight).items()})

    def apply(self, x: Tensor, bias: Tensor | None, epilogue: Epilogue) -> Tensor:
        w = self.weight.dequantize().to(device=x.device, dtype=x.dtype)  # (N, K), original column order
        return epilogue(F.linear(x, w, bias))

    def nbytes(self) -> int:
        return self.weight.nbytes()

    def dequantized_weight(self) -> Tensor:
        return self.weight.dequantize()

    def describe(self) -> str:
        return f"dequantize + F.linear ({type(self.weight).__name__})"


class NativeQuantKernel(QuantKernel):
    def __init__(self, ops, packed, perm: Tensor | None, what: str) -> None:
        self.ops, self.packed, self.perm, self.what = ops, packed, perm, what

    def apply(self, x: Tensor, bias: Tensor | None, epilogue: Epilogue) -> Tensor:
        if self.perm is not None:  # act-order: the packed columns are the inputs in group order
            x = x.index_select(-1, self.perm)
        out = self.ops.linear(x, self.packed)
        return out if self.packed.gate_up else epilogue(out, self.ops)

    def nbytes(self) -> int:
        return self.packed.nbytes

    def describe(self) -> str:
        return f"native {self.what} GEMM"


class NativeFloatKernel(QuantKernel):
    """The float32 native GEMM on the dequantized weight (exact, four bytes a weight)."""

    def __init__(self, ops, packed) -> None:
        self.ops, self.packed = ops, packed

    def apply(self, x: Tensor, bias: Tensor | None, epilogue: Epilogue) -> Tensor:
        out = self.ops.linear(x, self.packed)
        return out if self.packed.gate_up else epilogue(out, self.ops)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed.weight, self.packed.bias) if t is not None)

    def describe(self) -> str:
        return "native float32 GEMM (dequantized at load)"


def choose_kernel(weight: CanonicalWeight, layer: LinearLayerLike, backend: LinearBackend,
                  bias: Tensor | None, fp8_cpu_path: str = "int8") -> QuantKernel:
    """The native kernel when the backend has one for this weight, else dequantize-per-call."""
    ops = backend.ops
    if backend.kind != "native" or not hasattr(ops, "pack_linear_int8"):
        return DequantKernel(weight)
    fuse = layer.epilogue is SILU_MUL and (layer.out_features // 2) % 8 == 0
    b = None if bias is None else bias.detach().float()
    if isinstance(weight, Fp8Weight) and fp8_cpu_path == "float32":
        return NativeFloatKernel(ops, ops.pack_linear(weight.dequantize(), b, fuse))
    if isinstance(weight, Fp8Weight):
        weight = fp8_to_int8(weight)
    if backend.activation == "int8":
        kernel = _w8a8_kernel(ops, weight, b, fuse)
        if kernel is not None:
            return kernel
    if isinstance(weight, Int8Weight):
        return NativeQuantKernel(ops, ops.pack_linear_int8(weight.q, weight.scale, bias=b, gate_up=fuse), None,
                                 "int8")
    if isinstance(weight, GroupWeight) and weight.bits in (4, 8):
        pack = ops.pack_linear_int4 if weight.bits == 4 else ops.pack_linear_int8
        packed = pack(weight.q, weight.scales, weight.zeros, weight.group_size, bias=b, gate_up=fuse)
        return NativeQuantKernel(ops, packed, weight.perm, f"int{weight.bits} (group {weight.group_size})")
    return DequantKernel(weight)


def _w8a8_kernel(ops, weight: CanonicalWeight, bias: Tensor | None, fuse: bool) -> QuantKernel | None:
    """The int8-activation kernel for this weight, or None where its groups do not allow it (the
    layer then keeps the exact weight-only kernel; ``describe`` says which one each layer got)."""
    if isinstance(weight, Int8Weight):
        q, scales, zeros, group, bits, perm = weight.q, weight.scale, None, -1, 8, None
    elif isinstance(weight, GroupWeight) and weight.bits in (4, 8):
        q, scales, zeros, group, bits, perm = (weight.q, weight.scales, weight.zeros, weight.group_size, weight.bits,
                                               weight.perm)
    else:
        return None
    k = q.shape[1]
    if (k if group in (-1, k) else group) % W8A8_MIN_GROUP:
        return None
    packed = ops.pack_linear_w8a8(q, scales, zeros, group, bits, bias=bias, gate_up=fuse)
    what = "int8" if isinstance(weight, Int8Weight) else f"int{bits} (group {group})"
    return NativeQuantKernel(ops, packed, perm, f"{what} W8A8 (int8 activations)")
