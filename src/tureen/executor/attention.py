"""Paged attention on plain torch ops: runs on CPU and, unchanged, on CUDA.

KV cache of one layer, one preallocated tensor::

    kv_cache: (2, num_blocks, block_size, num_kv_heads, head_dim)
               |      |           |
               |      |           +-- offset of the token inside its block
               |      +-- physical block id (what a request's block table lists)
               +-- 0: keys, 1: values

    slot = block_id * block_size + offset
    kv_cache[0].view(num_blocks * block_size, num_kv_heads, head_dim)[slot] is one token's key.

A request's token at position p lives in slot ``block_ids[p // block_size] * block_size + p % block_size``.
A block (block_size * num_kv_heads * head_dim values) is contiguous, so gathering a request's
context by block table copies large contiguous chunks.

Step layout: the tokens of every scheduled request are concatenated, ``(T, ...)`` with no batch
dim. Requests with a single query token ("decode rows", though a 1-token prefill chunk is the
same computation) come first, so they form contiguous row ranges that are batched into a few
padded SDPA calls ("decode groups"; the runner sorts them by context length so that each group
pads little). Every other request is a "prefill sequence": one SDPA call with a causal mask
offset by its start position.

On CPU in float32 the decode rows instead go, all at once, to the native kernel of
``cpu_kernels.py``, which reads K/V in place through the block tables (one group, no gather).

Quantized KV cache (``kv_cache_dtype`` fp8 / fp8_e4m3 / int8): a ``QuantizedKVCache`` per layer,
``data`` laid out as above in float8_e4m3fn or int8, plus ``scales`` (2, num_blocks, block_size,
num_kv_heads) float32: one scale per token, KV head and K/V, set when the token is written::

    s = max|x| / QMAX (448 for e4m3, 127 for int8; 1 when x is all zero)
    q = (x / s) rounded to e4m3, or round-half-even(x / s) clamped to [-127, 127]
    x ~ q * s

Readers dequantize the gathered blocks to the activation dtype (the native kernels read them in
place). A prefill chunk that starts at position 0 attends to its own fresh K/V, as unquantized.

Invariant: every layer first writes the step's K/V for ALL tokens into the cache and only then
reads context from the cache, so a request whose prefix-cache hit covers blocks being written in
this same step by another request reads the right values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import accumulate, chain

import torch
import torch.nn.functional as F
from torch import Tensor

from tureen.executor.cpu_kernels import CpuOps

# Decode rows (sorted by context length) are split into at most MAX_DECODE_GROUPS padded groups
# of at least MIN_DECODE_GROUP rows. Small groups pad less and their gathered K/V stays in cache;
# each group costs one more SDPA call. Measured on the 2-core CPU at 128 rows, contexts 100-500:
# 16 groups of 8 gave ~125-150 ms/step, 4 groups of 32 ~165-185 ms, 1 group ~215 ms.
MAX_DECODE_GROUPS = 16
MIN_DECODE_GROUP = 8


class Workspace:
    """Grow-only scratch buffers for gathered K/V, reused by every layer and every step.

    Gathering into a fresh multi-MiB tensor each layer costs page faults that dominate the copy
    itself on CPU; reused buffers avoid them. ``slot`` names independent buffers (a quantized
    cache gathers its raw blocks into one and dequantizes them into another).
    """

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, slot: str = "kv") -> Tensor:
        numel = math.prod(shape)
        buf = self._bufs.get(slot)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self._bufs[slot] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


KV_CACHE_TORCH_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8}
_QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
KV_SCALE_BYTES = 4  # one float32 scale per token, KV head and K/V


@dataclass(frozen=True)
class QuantizedKVCache:
    """One layer's quantized KV cache (layout in the module docstring)."""

    data: Tensor  # (2, num_blocks, block_size, Hkv, D) float8_e4m3fn or int8
    scales: Tensor  # (2, num_blocks, block_size, Hkv) float32

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def bytes(self) -> Tensor:
        """``data`` viewed as uint8 (copies and gathers of float8 go through bytes on CPU)."""
        return self.data.view(torch.uint8)

    @classmethod
    def zeros(cls, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
              device: torch.device) -> "QuantizedKVCache":
        return cls(torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device),
                   torch.ones(2, num_blocks, block_size, kv_heads, dtype=torch.float32, device=device))


KVCache = Tensor | QuantizedKVCache  # one layer's cache


def quantize_kv(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(T, Hkv, D) -> values (T, Hkv, D) in ``dtype`` and scales (T, Hkv) float32."""
    xf = x.float()
    s = xf.abs().amax(dim=-1) / _QMAX[dtype]  # (T, Hkv)
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = xf / s[..., None]
    if dtype == torch.int8:
        q = torch.round(q).clamp_(-127, 127)
    return q.to(dtype), s


@dataclass
class DecodeGroup:
    """Rows [start, end) of the step: single-token queries batched in one padded SDPA call."""

    start: int
    end: int
    max_blocks: int
    block_table: Tensor  # (n * max_blocks,) int64, each row padded with block 0
    context_lens: Tensor  # (n,) int64: keys 0 .. context_len-1 are visible
    _masks: dict[int | None, Tensor] = field(default_factory=dict)

    def mask(self, window: int | None, block_size: int) -> Tensor:
        """(n, 1, 1, S) bool, broadcast over kv heads and the query heads folded into rows."""
        if window not in self._masks:
            keys = torch.arange(self.max_blocks * block_size, device=self.context_lens.device)[None, :]  # (1, S)
            ctx = self.context_lens[:, None]  # (n, 1)
            visible = keys < ctx
            if window is not None:
                visible &= keys >= ctx - window
            self._masks[window] = visible[:, None, None, :]  # (n, 1, 1, S)
        return self._masks[window]


@dataclass
class PrefillSeq:
    """Rows [start, end) of the step: one request's chunk of query_len > 1 tokens."""

    start: int
    end: int
    start_pos: int
    block_ids: Tensor | None  # (ceil(context_len / block_size),) int64; None when start_pos == 0
    device: torch.device
    _masks: dict[int | None, Tensor | None] = field(default_factory=dict)

    @property
    def context_len(self) -> int:
        return self.start_pos + self.end - self.start

    def mask(self, window: int | None) -> Tensor | None:
        """(q, context) bool; None means plain causal attention over this step's keys only."""
        if self.start_pos == 0 and window is None:
            return None
        if window not in self._masks:
            q_pos = torch.arange(self.start_pos, self.context_len, device=self.device)[:, None]  # (q, 1)
            keys = torch.arange(self.context_len, device=self.device)[None, :]  # (1, context)
            visible = keys <= q_pos
            if window is not None:
                visible &= keys > q_pos - window
            self._masks[window] = visible
        return self._masks[window]


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step; built once per step, shared by every layer."""

    positions: Tensor  # (T,) int64
    slot_mapping: Tensor  # (T,) int64
    block_size: int
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillSeq]
    workspace: Workspace
    cpu_ops: CpuOps | None = None  # native KV write and decode attention (CPU, float32)


def build_attention_metadata(query_lens: list[int], start_positions: list[int], block_tables: list[list[int]],
                             block_size: int, device: torch.device, workspace: Workspace,
                             cpu_ops: CpuOps | None = None) -> AttentionMetadata:
    """Index tensors for one step from per-request Python lists (requests in step row order)."""
    for q, s, tbl in zip(query_lens, start_positions, block_tables):
        if len(tbl) * block_size < s + q:
            raise ValueError(f"block table of {len(tbl)} blocks cannot hold positions up to {s + q - 1}")
    positions, slot_mapping = _positions_and_slots(query_lens, start_positions, block_tables, block_size)
    num_decodes = next((i for i, q in enumerate(query_lens) if q != 1), len(query_lens))
    decode_ctx = [s + 1 for s in start_positions[:num_decodes]]
    # One group where padding is cheap: the native kernel never reads it, and on CUDA a kernel
    # launch costs more than the padded work.
    max_groups = 1 if cpu_ops is not None or device.type == "cuda" else MAX_DECODE_GROUPS
    groups = _decode_groups(decode_ctx, block_tables[:num_decodes], block_size, device, max_groups)
    row_starts = list(accumulate(query_lens, initial=0))
    prefills = [
        PrefillSeq(row_starts[i], row_starts[i + 1], start_positions[i],
                   _prefix_blocks(block_tables[i], start_positions[i] + query_lens[i], block_size, device)
                   if start_positions[i] > 0 else None, device)
        for i in range(num_decodes, len(query_lens))
    ]
    return AttentionMetadata(positions.to(device), slot_mapping.to(device), block_size, groups, prefills, workspace,
                             cpu_ops)


def _positions_and_slots(query_lens: list[int], start_positions: list[int], block_tables: list[list[int]],
                         block_size: int) -> tuple[Tensor, Tensor]:
    positions = torch.tensor(list(chain.from_iterable(range(s, s + q) for s, q in zip(start_positions, query_lens))))
    flat_tables = torch.tensor(list(chain.from_iterable(block_tables)))
    offsets = accumulate((len(t) for t in block_tables), initial=0)
    # (T,) where each token's block table starts in flat_tables. Built by list repetition rather
    # than repeat_interleave, a parallel op that stalls when the 2-core machine is busy.
    table_start = torch.tensor(list(chain.from_iterable([o] * q for o, q in zip(offsets, query_lens))))
    blocks = flat_tables[table_start + positions // block_size]  # (T,)
    return positions, blocks * block_size + positions % block_size


def _group_bounds(n: int, max_groups: int) -> list[tuple[int, int]]:
    if n == 0:
        return []
    k = max(1, min(max_groups, n // MIN_DECODE_GROUP))
    cuts = [round(i * n / k) for i in range(k + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _decode_groups(ctx_lens: list[int], tables: list[list[int]], block_size: int, device: torch.device,
                   max_groups: int) -> list[DecodeGroup]:
    """All groups' padded block tables in one tensor (and one for context lengths), sliced per group."""
    bounds = _group_bounds(len(ctx_lens), max_groups)
    if not bounds:
        return []
    widths = [-(-max(ctx_lens[a:b]) // block_size) for a, b in bounds]
    flat: list[int] = []
    for (a, b), width in zip(bounds, widths):
        for ctx, tbl in zip(ctx_lens[a:b], tables[a:b]):
            nb = -(-ctx // block_size)
            flat += tbl[:nb]
            flat += [0] * (width - nb)  # padding: block 0, masked out
    flat_t, ctx_t = torch.tensor(flat, device=device), torch.tensor(ctx_lens, device=device)
    groups, offset = [], 0
    for (a, b), width in zip(bounds, widths):
        size = (b - a) * width
        groups.append(DecodeGroup(a, b, width, flat_t[offset:offset + size], ctx_t[a:b]))
        offset += size
    return groups


def _prefix_blocks(table: list[int], context_len: int, block_size: int, device: torch.device) -> Tensor:
    return torch.tensor(table[: -(-context_len // block_size)], device=device)


# ----------------------------------------------------------------------------------------------


def write_kv(kv_cache: KVCache, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """k, v: (T, Hkv, D) into their slots of kv_cache (2, num_blocks, block_size, Hkv, D)."""
    _, _, _, hkv, d = kv_cache.shape
    if isinstance(kv_cache, QuantizedKVCache):
        for i, x in enumerate((k, v)):
            q, s = quantize_kv(x, kv_cache.data.dtype)
            # as bytes: index_copy_ has no float8 kernel on CPU
            kv_cache.bytes()[i].view(-1, hkv, d).index_copy_(0, slot_mapping, q.view(torch.uint8))
            kv_cache.scales[i].view(-1, hkv).index_copy_(0, slot_mapping, s)  # (num_slots, Hkv)
        return
    kv_cache[0].view(-1, hkv, d).index_copy_(0, slot_mapping, k)  # (num_slots, Hkv, D)
    kv_cache[1].view(-1, hkv, d).index_copy_(0, slot_mapping, v)


def _native_kv(ops: CpuOps | None, kv_cache: KVCache, name: str):
    """The native op for this cache (``name`` or its ``_quant`` twin), or None for the torch path."""
    if ops is None:
        return None
    return getattr(ops, name + "_quant", None) if isinstance(kv_cache, QuantizedKVCache) else getattr(ops, name)


def _cache_args(kv_cache: KVCache) -> tuple[Tensor, ...]:
    return (kv_cache.data, kv_cache.scales) if isinstance(kv_cache, QuantizedKVCache) else (kv_cache,)


def paged_attention(q: Tensor, k: Tensor, v: Tensor, kv_cache: KVCache, meta: AttentionMetadata,
                    window: int | None) -> Tensor:
    """q: (T, H, D); k, v: (T, Hkv, D) of this step -> attention output (T, H, D)."""
    native_write = _native_kv(meta.cpu_ops, kv_cache, "write_kv")
    if native_write is not None:
        native_write(*_cache_args(kv_cache), k, v, meta.slot_mapping)
    else:
        write_kv(kv_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    native_decode = _native_kv(meta.cpu_ops, kv_cache, "paged_decode")
    for g in meta.decode_groups:
        if native_decode is not None:
            native_decode(q[g.start:g.end], *_cache_args(kv_cache), g.block_table.view(g.end - g.start, g.max_blocks),
                          g.context_lens, out[g.start:g.end], window, q.shape[-1] ** -0.5)
        else:
            out[g.start:g.end] = _decode_attention(q[g.start:g.end], kv_cache, g, window, meta)
    for p in meta.prefills:
        out[p.start:p.end] = _prefill_attention(q[p.start:p.end], k[p.start:p.end], v[p.start:p.end],
                                                kv_cache, p, window, meta.workspace)
    return out


def _gather_blocks(kv_cache: KVCache, block_ids: Tensor, workspace: Workspace,
                   dtype: torch.dtype) -> Tensor:
    """-> (2, len(block_ids) * block_size, Hkv, D) in ``dtype``: the blocks' keys and values, in table order."""
    _, _, bs, hkv, d = kv_cache.shape
    n = block_ids.numel()
    if not isinstance(kv_cache, QuantizedKVCache):
        kv = workspace.take((2, n, bs, hkv, d), kv_cache.dtype, kv_cache.device)
        torch.index_select(kv_cache[0], 0, block_ids, out=kv[0])
        torch.index_select(kv_cache[1], 0, block_ids, out=kv[1])
        return kv.view(2, -1, hkv, d)  # (2, blocks * block_size, Hkv, D)
    raw = workspace.take((2, n, bs, hkv, d), torch.uint8, kv_cache.data.device, slot="raw")
    scales = workspace.take((2, n, bs, hkv), torch.float32, kv_cache.data.device, slot="scales")
    kv = workspace.take((2, n, bs, hkv, d), dtype, kv_cache.data.device)
    data = kv_cache.bytes()
    for i in range(2):
        torch.index_select(data[i], 0, block_ids, out=raw[i])
        torch.index_select(kv_cache.scales[i], 0, block_ids, out=scales[i])
    values = raw.view(kv_cache.data.dtype).to(torch.float32)  # e4m3 / int8 -> float32 is exact
    if dtype == torch.float32:
        torch.mul(values, scales[..., None], out=kv)
    else:
        kv.copy_(values * scales[..., None])
    return kv.view(2, -1, hkv, d)


def _decode_attention(q: Tensor, kv_cache: KVCache, g: DecodeGroup, window: int | None,
                      meta: AttentionMetadata) -> Tensor:
    n, h, d = q.shape
    hkv = kv_cache.shape[3]
    kv = _gather_blocks(kv_cache, g.block_table, meta.workspace, q.dtype).view(2, n, -1, hkv, d)  # (2, n, S, Hkv, D)
    keys, values = kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # (n, Hkv, S, D)
    # GQA without copies: the query heads sharing one kv head become query rows of that head.
    qg = q.view(n, hkv, h // hkv, d)  # (n, Hkv, G, D)
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=g.mask(window, meta.block_size))
    return out.view(n, h, d)  # (n, Hkv, G, D) -> (n, H, D)


def _prefill_attention(q: Tensor, k: Tensor, v: Tensor, kv_cache: KVCache, p: PrefillSeq,
                       window: int | None, workspace: Workspace) -> Tensor:
    h, hkv = q.shape[1], k.shape[1]
    if p.block_ids is None:  # context is exactly this step's chunk, identical to what was just written
        keys, values = k, v  # (q, Hkv, D)
    else:
        kv = _gather_blocks(kv_cache, p.block_ids, workspace, q.dtype)
        keys, values = kv[0, :p.context_len], kv[1, :p.context_len]  # (context, Hkv, D)
    mask = p.mask(window)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],  # (1, heads, len, D)
        attn_mask=mask, is_causal=mask is None, enable_gqa=h != hkv)
    return out[0].transpose(0, 1)  # (1, H, q, D) -> (q, H, D)
