"""The linear-method seam: how one linear layer stores its weights and computes its product.

A linear layer of the model (``layers.LinearLayer``) only knows its shape: input features, the
output shards it stacks (q/k/v, gate/up) and its epilogue. Everything about the weight belongs to
its ``LinearMethod``, chosen per layer after the model is built (``LinearMethodFactory``):

1. ``create_weights(layer)``: register the parameters the checkpoint fills (names as on disk);
2. ``load(layer, shard_id, tensor_name, tensor)``: one checkpoint tensor of one shard, routed by
   the loader through the declarative fused mapping (``q_proj`` -> shard "q" of ``qkv_proj``);
3. ``process_weights_after_loading(layer)``: once, convert/repack for the kernel that will run;
4. ``apply(layer, x, bias)``: the product, with the layer's epilogue applied.

The epilogue is part of the layer's meaning, not of the method: a ``gate_up_proj`` always returns
``silu(gate) * up``. A method may fuse it into its GEMM or run it after; the output is the same.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from tureen.executor.cpu_kernels import CpuOps


class Epilogue(ABC):
    """What a layer does to its GEMM output (the method may fuse it)."""

    name: str

    @abstractmethod
    def out_features(self, rows: int) -> int: ...

    @abstractmethod
    def __call__(self, out: Tensor, ops: "CpuOps | None" = None) -> Tensor: ...


class _Identity(Epilogue):
    name = "identity"

    def out_features(self, rows: int) -> int:
        return rows

    def __call__(self, out: Tensor, ops: "CpuOps | None" = None) -> Tensor:
        return out


class _SiluMul(Epilogue):
    """[gate; up] stacked along the output: ``silu(gate) * up``, half the GEMM's width."""

    name = "silu_mul"

    def out_features(self, rows: int) -> int:
        return rows // 2

    def __call__(self, out: Tensor, ops: "CpuOps | None" = None) -> Tensor:
        if ops is not None and out.dtype == torch.float32 and out.dim() == 2 and out.is_contiguous():
            return ops.silu_mul(out)
        gate, up = out.chunk(2, dim=-1)  # (T, I) each
        act = F.silu(gate)
        act *= up  # in place: one (T, I) temporary fewer
        return act


IDENTITY: Epilogue = _Identity()
SILU_MUL: Epilogue = _SiluMul()


class LinearLayerLike(Protocol):
    """What a method sees of its layer (``layers.LinearLayer``)."""

    in_features: int
    out_features: int  # rows of the stacked weight, before the epilogue
    shards: dict[Any, tuple[int, int]]  # shard id -> (row offset, rows)
    has_bias: bool
    epilogue: Epilogue
    prefix: str  # the layer's module name, for error messages

    def register_parameter(self, name: str, param: Any) -> None: ...


class LinearMethod(ABC):
    """One way to hold and multiply a linear layer's weight (see the module docstring)."""

    @abstractmethod
    def create_weights(self, layer: LinearLayerLike) -> None: ...

    @abstractmethod
    def tensor_names(self, layer: LinearLayerLike) -> tuple[set[str], set[str]]:
        """(required, optional) checkpoint tensor names of ONE shard, e.g. ({"weight"}, set())."""

    @abstractmethod
    def load(self, layer: LinearLayerLike, shard_id: Any, tensor_name: str, tensor: Tensor) -> None: ...

    def process_weights_after_loading(self, layer: LinearLayerLike) -> None:
        """Convert and repack once, after every shard is loaded. Default: nothing to do."""

    @abstractmethod
    def apply(self, layer: LinearLayerLike, x: Tensor, bias: Tensor | None) -> Tensor: ...

    def dequantized_weight(self, layer: LinearLayerLike) -> Tensor:
        """The (out, in) float32 weight this method multiplies by (for tests and fidelity reports)."""
        raise NotImplementedError(f"{type(self).__name__} cannot show its weight after processing")

    def describe(self) -> str:
        return type(self).__name__


# (module name, layer) -> the method for that layer. Built once from the engine config.
LinearMethodFactory = Callable[[str, LinearLayerLike], LinearMethod]


@dataclass(frozen=True)
class LinearBackend:
    """The kernels linear layers run on, chosen once at start-up: native (``ops`` set), onednn or torch."""

    kind: str = "torch"
    ops: "CpuOps | None" = None
    fp8_cpu_path: str = "int8"  # fp8 weights on the native backend: requantized to int8, or float32
    activation: str = "none"  # quantized layers' activations: none (float32) or int8 (W8A8-dynamic, native only)

    def __post_init__(self) -> None:
        if self.kind not in ("native", "onednn", "torch") or (self.kind == "native") != (self.ops is not None):
            raise ValueError(f"bad linear backend {self.kind!r} (ops given: {self.ops is not None})")
        if self.activation not in ("none", "int8"):
            raise ValueError(f"activation must be none or int8, got {self.activation!r}")
        if self.fp8_cpu_path not in ("int8", "float32"):
            raise ValueError(f"fp8_cpu_path must be int8 or float32, got {self.fp8_cpu_path!r}")
