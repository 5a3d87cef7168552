"""Pre-quantized checkpoint formats, read tensor for tensor as their tools write them.

GPTQ (AutoGPTQ / GPTQModel, ``checkpoint_format`` gptq):
    qweight int32 (K / pack, N): ``pack = 32 / bits`` input rows per int32, lowest bits first;
    qzeros  int32 (G, N / pack): packed along the output dim; stored zero = zero - 1 (the
            exllama convention of the v1 format; ``gptq_v2`` stores the zero itself);
    scales  (G, N); g_idx int32 (K,): the group of each input (act-order when not k // group_size).
    w[n, k] = scales[g_idx[k], n] * (q[k, n] - (stored_zero[g_idx[k], n] + 1)).
AWQ (AutoAWQ, version GEMM), 4 bit:
    qweight int32 (K, N / 8), qzeros int32 (G, N / 8): packed along the output dim, eight columns a
    word in the interleaved order [0, 2, 4, 6, 1, 3, 5, 7] (nibble i holds column order[i]);
    scales (G, N). w[n, k] = (q[k, n] - zero[k // g, n]) * scales[k // g, n].
compressed-tensors (llm-compressor):
    pack-quantized: weight_packed int32 (N, K * bits / 32) packed along the input dim, values stored
      offset by 2**(bits-1) (signed -> unsigned); weight_scale (N, G) (channel: G = 1);
      weight_shape (2,); optional weight_zero_point (N * bits / 32, G) packed along the OUTPUT dim,
      same offset; optional weight_g_idx (K,) (actorder "group").
      w = (q - zero_point) * scale, in the signed domain (= the same in the offset one);
    int-quantized / naive-quantized: weight int8 (N, K), weight_scale (N, 1) / (1,) / (N, G),
      optional weight_zero_point int8 of the scale's shape;
    float-quantized: weight float8_e4m3fn (N, K), weight_scale (N, 1) or (1,) (per tensor).
fp8 (vLLM / llm-compressor's ``quant_method: fp8``): weight e4m3 (N, K), weight_scale () / (1,) /
    (N, 1), optional input_scale (static activation scale; activations stay float here).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tureen.errors import ModelLoadError
from tureen.executor.quantization.methods import CheckpointFormat, TensorSpec
from tureen.executor.quantization.weights import (CanonicalWeight, Fp8Weight, GroupWeight, Int8Weight, act_order_perm,
                                                  unpack_int32)

I32 = (torch.int32,)
SCALAR_SHAPES = ((), (1,))
# Static activation quantization parameters (W8A8 / fp8 static): read and not used, activations stay float.
ACTIVATION_SPECS = {"input_scale": TensorSpec(SCALAR_SHAPES, required=False),
                    "input_zero_point": TensorSpec(SCALAR_SHAPES, (torch.int8, torch.int32), required=False)}
I8 = (torch.int8,)
SHAPE_INT = (torch.int32, torch.int64)
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a word holds column AWQ_ORDER[i]
AWQ_UNDO = [AWQ_ORDER.index(c) for c in range(8)]  # column c is in nibble AWQ_UNDO[c]: [0, 4, 1, 5, 2, 6, 3, 7]


def _groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else in_features // group_size


def _check_groups(in_features: int, group_size: int, field: str, where: str) -> None:
    if group_size != -1 and (group_size < 1 or in_features % group_size):
        raise ModelLoadError(f"quantization_config.{field}={group_size} does not divide the input size "
                             f"{in_features} of {where}")


def _check_pack(size: int, pack: int, what: str, where: str) -> None:
    if size % pack:
        raise ModelLoadError(f"{where}: the {what} size {size} is not a multiple of {pack} "
                             f"(values per packed int32)")


class GptqFormat(CheckpointFormat):
    name = "gptq"

    def __init__(self, bits: int, group_size: int, zero_offset: int = 1) -> None:
        if bits not in (2, 4, 8):
            raise ModelLoadError(f"quantization_config.bits={bits} is not supported for gptq (2, 4 or 8)")
        self.bits, self.group_size, self.zero_offset = bits, group_size, zero_offset
        self.pack = 32 // bits

    def check_layer(self, in_features: int, shard_rows: list[int], where: str) -> None:
        _check_groups(in_features, self.group_size, "group_size", where)
        _check_pack(in_features, self.pack, "input", where)
        for rows in shard_rows:
            _check_pack(rows, self.pack, "output", where)

    def tensor_specs(self, in_features: int, rows: int) -> dict[str, TensorSpec]:
        g = _groups(in_features, self.group_size)
        return {"qweight": TensorSpec(((in_features // self.pack, rows),), I32),
                "qzeros": TensorSpec(((g, rows // self.pack),), I32),
                "scales": TensorSpec(((g, rows),)),
                "g_idx": TensorSpec(((in_features,),), SHAPE_INT, required=False)}

    def to_canonical(self, t: dict[str, Tensor], in_features: int, rows: int, where: str) -> CanonicalWeight:
        gs = in_features if self.group_size == -1 else self.group_size
        q = unpack_int32(t["qweight"], self.bits, dim=0)  # (K, N)
        zeros = unpack_int32(t["qzeros"], self.bits, dim=1) + self.zero_offset  # (G, N)
        perm = act_order_perm(t["g_idx"], gs, in_features, where) if "g_idx" in t else None
        if perm is not None:
            q = q[perm]
        return GroupWeight(q.t().to(torch.uint8).contiguous(), t["scales"].float().t().contiguous(),
                           zeros.float().t().contiguous(), gs, self.bits, perm)


class AwqFormat(CheckpointFormat):
    name = "awq"

    def __init__(self, bits: int, group_size: int) -> None:
        if bits != 4:
            raise ModelLoadError(f"quantization_config.w_bit={bits} is not supported for awq (4 only)")
        self.bits, self.group_size = bits, group_size

    def check_layer(self, in_features: int, shard_rows: list[int], where: str) -> None:
        _check_groups(in_features, self.group_size, "q_group_size", where)
        for rows in shard_rows:
            _check_pack(rows, 8, "output", where)

    def tensor_specs(self, in_features: int, rows: int) -> dict[str, TensorSpec]:
        g = _groups(in_features, self.group_size)
        return {"qweight": TensorSpec(((in_features, rows // 8),), I32),
                "qzeros": TensorSpec(((g, rows // 8),), I32),
                "scales": TensorSpec(((g, rows),))}

    @staticmethod
    def unpack(packed: Tensor) -> Tensor:
        """(R, N / 8) int32 -> (R, N) int32 in natural column order."""
        vals = unpack_int32(packed, 4, dim=1)  # (R, N): nibble order within each word
        return vals.view(vals.shape[0], -1, 8)[:, :, AWQ_UNDO].reshape(vals.shape)

    def to_canonical(self, t: dict[str, Tensor], in_features: int, rows: int, where: str) -> CanonicalWeight:
        gs = in_features if self.group_size == -1 else self.group_size
        q, zeros = self.unpack(t["qweight"]), self.unpack(t["qzeros"])  # (K, N), (G, N)
        return GroupWeight(q.t().to(torch.uint8).contiguous(), t["scales"].float().t().contiguous(),
                           zeros.float().t().contiguous(), gs, self.bits)


def _row_scale(scale: Tensor, rows: int) -> Tensor:
    """A per-tensor () / (1,) or per-row (N, 1) scale -> (N,) float32."""
    return scale.float().reshape(-1).expand(rows).contiguous() if scale.numel() == 1 else \
        scale.float().reshape(rows).contiguous()


class CtPackedFormat(CheckpointFormat):
    """compressed-tensors ``pack-quantized`` (strategies channel and group)."""

    name = "compressed-tensors pack-quantized"

    def __init__(self, bits: int, strategy: str, group_size: int | None, symmetric: bool) -> None:
        if bits not in (2, 4, 8):
            raise ModelLoadError(f"compressed-tensors weights.num_bits={bits} is not supported (2, 4 or 8)")
        if strategy not in ("channel", "group"):
            raise ModelLoadError(f"compressed-tensors weights.strategy={strategy!r} is not supported for "
                                 "pack-quantized (channel or group)")
        self.bits, self.symmetric, self.pack = bits, symmetric, 32 // bits
        self.group_size = -1 if strategy == "channel" else int(group_size or 0)

    def check_layer(self, in_features: int, shard_rows: list[int], where: str) -> None:
        _check_groups(in_features, self.group_size, "config_groups.*.weights.group_size", where)
        if not self.symmetric:
            for rows in shard_rows:
                _check_pack(rows, self.pack, "output", where)

    def tensor_specs(self, in_features: int, rows: int) -> dict[str, TensorSpec]:
        g = _groups(in_features, self.group_size)
        specs = {"weight_packed": TensorSpec(((rows, -(-in_features // self.pack)),), I32),
                 "weight_scale": TensorSpec(((rows, g),)),
                 "weight_shape": TensorSpec(((2,),), SHAPE_INT),
                 "weight_g_idx": TensorSpec(((in_features,),), SHAPE_INT, required=False), **ACTIVATION_SPECS}
        # asymmetric: packed along the output dim; symmetric checkpoints may still carry (zero) points,
        # packed or as int8
        specs["weight_zero_point"] = TensorSpec(((rows // self.pack, g),), I32) if not self.symmetric else \
            TensorSpec(((rows // self.pack, g), (rows, g)), I8 + I32, required=False)
        return specs

    def to_canonical(self, t: dict[str, Tensor], in_features: int, rows: int, where: str) -> CanonicalWeight:
        if t["weight_shape"].tolist() != [rows, in_features]:
            raise ModelLoadError(f"{where}: weight_shape is {t['weight_shape'].tolist()}, the layer is "
                                 f"[{rows}, {in_features}]")
        gs = in_features if self.group_size == -1 else self.group_size
        q = unpack_int32(t["weight_packed"], self.bits, dim=1)[:, :in_features]  # (N, K), offset by 2**(bits-1)
        offset = float(2 ** (self.bits - 1))
        g = _groups(in_features, self.group_size)
        zp = t.get("weight_zero_point")
        if zp is None:
            zeros = torch.full((rows, g), offset)
        elif zp.shape[0] == rows:  # unpacked, signed
            zeros = zp.float() + offset
        else:
            zeros = unpack_int32(zp, self.bits, dim=0)[:rows].float()  # (N, G), offset like the values
        perm = act_order_perm(t["weight_g_idx"], gs, in_features, where) if "weight_g_idx" in t else None
        if perm is not None:
            q = q[:, perm]
        return GroupWeight(q.to(torch.uint8).contiguous(), t["weight_scale"].float().contiguous(), zeros, gs,
                           self.bits, perm)


class CtIntFormat(CheckpointFormat):
    """compressed-tensors ``int-quantized`` / ``naive-quantized`` 8-bit (tensor, channel or group)."""

    name = "compressed-tensors int8"

    def __init__(self, strategy: str, group_size: int | None) -> None:
        if strategy not in ("tensor", "channel", "group"):
            raise ModelLoadError(f"compressed-tensors weights.strategy={strategy!r} is not supported for int8")
        self.group_size = int(group_size or 0) if strategy == "group" else -1

    def check_layer(self, in_features: int, shard_rows: list[int], where: str) -> None:
        _check_groups(in_features, self.group_size, "config_groups.*.weights.group_size", where)

    def tensor_specs(self, in_features: int, rows: int) -> dict[str, TensorSpec]:
        scale_shapes = ((rows, _groups(in_features, self.group_size)),) if self.group_size != -1 else \
            ((rows, 1), (1,), (), (rows,))
        return {"weight": TensorSpec(((rows, in_features),), I8),
                "weight_scale": TensorSpec(scale_shapes),
                "weight_zero_point": TensorSpec(scale_shapes, I8 + I32, required=False), **ACTIVATION_SPECS}

    def to_canonical(self, t: dict[str, Tensor], in_features: int, rows: int, where: str) -> CanonicalWeight:
        zp = t.get("weight_zero_point")
        if self.group_size == -1 and (zp is None or not zp.any()):
            return Int8Weight(t["weight"].contiguous(), _row_scale(t["weight_scale"], rows))
        scale = t["weight_scale"].float()
        scale = scale.reshape(rows, -1) if scale.numel() > 1 else scale.reshape(1, 1).expand(rows, 1)
        zeros = torch.zeros_like(scale) if zp is None else zp.float().reshape(scale.shape[0], -1).expand_as(scale)
        gs = in_features if self.group_size == -1 else self.group_size
        q = (t["weight"].to(torch.int16) + 128).to(torch.uint8)
        return GroupWeight(q, scale.contiguous(), (zeros + 128).contiguous(), gs, 8)


class Fp8Format(CheckpointFormat):
    """e4m3 weights with a per-tensor or per-row scale (compressed-tensors float-quantized, vLLM fp8)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def tensor_specs(self, in_features: int, rows: int) -> dict[str, TensorSpec]:
        return {"weight": TensorSpec(((rows, in_features),), (torch.float8_e4m3fn,)),
                "weight_scale": TensorSpec(((rows, 1), (rows,), (1,), ())), **ACTIVATION_SPECS}

    def to_canonical(self, t: dict[str, Tensor], in_features: int, rows: int, where: str) -> CanonicalWeight:
        return Fp8Weight(t["weight"].contiguous(), _row_scale(t["weight_scale"], rows))
