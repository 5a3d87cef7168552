"""Canonical quantized weights: every on-disk format is converted into one of these once, at load.

Layouts (N output rows, K inputs, G groups of ``group_size`` consecutive inputs):

- ``Int8Weight``: q (N, K) int8, scale (N,) float32; w = q * scale. Symmetric, per output row.
- ``GroupWeight``: q (N, K) uint8 in [0, 2**bits), scales and zeros (N, G) float32;
  w[n, k] = (q[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size].
  ``perm`` (K,) int64 or None: act-order checkpoints store inputs out of group order; the canonical
  columns are the original columns ``perm`` (w_canonical = w[:, perm]), so the layer multiplies
  ``x[:, perm]`` and every group is ``group_size`` consecutive canonical columns.
- ``Fp8Weight``: w8 (N, K) float8_e4m3fn, scale (N,) float32; w = w8 * scale.

Dequantization is float32 arithmetic in exactly the order written above, so a reference that does
the same (``tests/quant_reference.py``) gets the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tureen.errors import ModelLoadError

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass
class Int8Weight:
    q: Tensor  # (N, K) int8
    scale: Tensor  # (N,) float32

    def dequantize(self) -> Tensor:
        return self.q.float() * self.scale[:, None]

    def nbytes(self) -> int:
        return self.q.numel() + 4 * self.scale.numel()


@dataclass
class GroupWeight:
    q: Tensor  # (N, K) uint8
    scales: Tensor  # (N, G) float32
    zeros: Tensor  # (N, G) float32
    group_size: int  # K when G == 1
    bits: int
    perm: Tensor | None = None  # (K,) int64: canonical column j is original column perm[j]

    def dequantize_canonical(self) -> Tensor:
        """(N, K) float32 in canonical column order."""
        s = self.scales.repeat_interleave(self.group_size, dim=1)[:, :self.q.shape[1]]  # (N, K)
        z = self.zeros.repeat_interleave(self.group_size, dim=1)[:, :self.q.shape[1]]
        return (self.q.float() - z) * s

    def dequantize(self) -> Tensor:
        """(N, K) float32 in the original (checkpoint) column order."""
        w = self.dequantize_canonical()
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    def nbytes(self) -> int:
        return self.q.numel() * self.bits // 8 + 8 * self.scales.numel()


@dataclass
class Fp8Weight:
    w8: Tensor  # (N, K) float8_e4m3fn
    scale: Tensor  # (N,) float32

    def dequantize(self) -> Tensor:
        return self.w8.float() * self.scale[:, None]

    def nbytes(self) -> int:
        return self.w8.numel() + 4 * self.scale.numel()


CanonicalWeight = Int8Weight | GroupWeight | Fp8Weight


def concat_shards(parts: list[CanonicalWeight], where: str) -> CanonicalWeight:
    """Stack per-shard canonical weights along N (q/k/v, gate/up)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if any(type(p) is not type(first) for p in parts):
        raise ModelLoadError(f"{where}: the fused shards are quantized differently")
    if isinstance(first, Int8Weight):
        return Int8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))
    if isinstance(first, Fp8Weight):
        return Fp8Weight(torch.cat([p.w8 for p in parts]), torch.cat([p.scale for p in parts]))
    same = all(p.group_size == first.group_size and p.bits == first.bits for p in parts)
    same_perm = all((p.perm is None) == (first.perm is None) and (p.perm is None or torch.equal(p.perm, first.perm))
                    for p in parts)
    if not same or not same_perm:
        raise ModelLoadError(f"{where}: the fused shards have different bits, group sizes or act-order g_idx "
                             "(they share one input and must share one layout)")
    return GroupWeight(torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]),
                       torch.cat([p.zeros for p in parts]), first.group_size, first.bits, first.perm)


# ---- quantizers for unquantized checkpoints (tureen's own int8/int4; fp8 e4m3) -------------------


def quantize_int8(w: Tensor) -> Int8Weight:
    """Symmetric per output row: scale = max|w| / 127, q = round(w / scale) (half to even)."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q, scale)


def quantize_groups(w: Tensor, bits: int, group_size: int) -> GroupWeight:
    """Asymmetric min/max per group of ``group_size`` inputs (-1: the whole row), GPTQ's RTN grid."""
    w = w.float()
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    if k % gs:
        raise ModelLoadError(f"quantization_group_size={group_size} does not divide the input size {k}")
    qmax = 2 ** bits - 1
    g = w.view(n, k // gs, gs)  # (N, G, gs)
    lo, hi = g.amin(dim=2).clamp(max=0), g.amax(dim=2).clamp(min=0)  # the grid always holds 0
    scales = (hi - lo) / qmax
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    zeros = torch.round(-lo / scales)
    q = (torch.round(g / scales[..., None]) + zeros[..., None]).clamp_(0, qmax)
    return GroupWeight(q.view(n, k).to(torch.uint8), scales, zeros, gs, bits)


def quantize_fp8(w: Tensor) -> Fp8Weight:
    """e4m3 with one scale per output row: scale = max|w| / 448."""
    w = w.float()
    scale = w.abs().amax(dim=1) / FP8_MAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return Fp8Weight((w / scale[:, None]).to(torch.float8_e4m3fn), scale)


def fp8_to_int8(w: Fp8Weight) -> Int8Weight:
    """Requantize fp8 to int8 per output row (the CPU has no fp8 math; the int8 GEMM is its fast path)."""
    return quantize_int8(w.dequantize())


# ---- bit unpacking shared by the formats ------------------------------------------------------


def unpack_int32(packed: Tensor, bits: int, dim: int) -> Tensor:
    """Split each int32 into 32 / bits unsigned values, lowest bits first, along ``dim`` -> int32."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)  # (per,)
    p = packed.to(torch.int32).movedim(dim, -1)
    vals = (p[..., None] >> shifts) & (2 ** bits - 1)  # (..., words, per); & after >> drops sign bits
    vals = vals.reshape(*p.shape[:-1], p.shape[-1] * per)
    return vals.movedim(-1, dim)


def act_order_perm(g_idx: Tensor, group_size: int, k: int, where: str) -> Tensor | None:
    """The canonical column order of an act-order ``g_idx`` (None when already in group order)."""
    g_idx = g_idx.to(torch.int64)
    groups = -(-k // group_size)
    if g_idx.shape != (k,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise ModelLoadError(f"{where}: g_idx must hold {k} group indices in [0, {groups})")
    counts = torch.bincount(g_idx, minlength=groups)
    if bool((counts[:-1] != group_size).any()) or int(counts[-1]) != k - group_size * (groups - 1):
        raise ModelLoadError(f"{where}: g_idx does not put exactly group_size={group_size} inputs in each group")
    perm = torch.sort(g_idx, stable=True).indices
    return None if torch.equal(perm, torch.arange(k)) else perm
