"""The native int8 / int4 GEMMs (csrc/quant_linear.c) against dequantize-then-``F.linear``.

The reference dequantizes the canonical (q, scale, zero) form with plain torch ops, element by
element, value = (q - zero) * scale per output row and group of inputs; the kernel never
materialises that float weight. Shapes cover row tails (rows % 6), column tails (N % 16),
groups that are not powers of two, one group per row, many row blocks, bias, 3-D and strided
inputs, and the fused silu(gate) * up epilogue.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tureen.executor import cpu_kernels

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ops():
    return cpu_kernels.load_cpu_ops("on", CPU, torch.float32, 64)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """(N, K) values -> float weight; scales/zeros (N, G) apply to K / G consecutive inputs each."""
    n, k = q.shape
    group = k // scales.reshape(n, -1).shape[1]
    s = scales.reshape(n, -1).repeat_interleave(group, dim=1)
    z = 0.0 if zeros is None else zeros.reshape(n, -1).repeat_interleave(group, dim=1)
    return (q.float() - z) * s


def random_weight(bits: int, n: int, k: int, group: int, asym: bool, signed8: bool = True, seed: int = 0):
    """A random canonical weight: (q, scales, zeros) with realistic magnitudes."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group == -1 else k // group
    scales = torch.rand(n, groups, generator=g) * 0.02 + 0.002
    if bits == 4:
        q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        zeros = torch.randint(0, 16, (n, groups), generator=g).float() if asym else None
    elif signed8:
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        zeros = torch.randint(-20, 20, (n, groups), generator=g).float() if asym else None
    else:  # GPTQ-style unsigned 8-bit; no zeros means 128
        q = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
        zeros = torch.randint(100, 156, (n, groups), generator=g).float() if asym else None
    if group == -1 and scales.shape[1] == 1 and seed % 2:  # one scale per row may also come as (N,)
        scales = scales[:, 0]
        zeros = None if zeros is None else zeros[:, 0]
    return q, scales, zeros


def reference_weight(bits, q, scales, zeros):
    if bits == 8 and q.dtype == torch.uint8 and zeros is None:
        zeros = torch.full(scales.shape, 128.0)
    return dequantize(q, scales, zeros)


def pack(ops, bits, q, scales, zeros, group, bias=None, gate_up=False):
    if bits == 8:
        return ops.pack_linear_int8(q, scales, zeros, group, bias=bias, gate_up=gate_up)
    return ops.pack_linear_int4(q, scales, zeros, group, bias=bias, gate_up=gate_up)


def tolerance(k: int, w: torch.Tensor) -> dict:
    return dict(atol=2e-5 * k ** 0.5 * float(w.abs().max()) + 1e-6, rtol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows,n,k,group,asym", [
    (1, 16, 8, -1, False),       # one panel, one group per row
    (5, 33, 96, 32, True),       # column tail (33 = 2 * 16 + 1), row tail
    (7, 40, 72, 24, True),       # a group size that is not a power of two
    (13, 64, 45, 9, True),       # an odd group size
    (6, 17, 384, 128, False),    # symmetric groups
    (2, 48, 2500, 100, True),    # long K, many groups
    (300, 24, 256, 64, True),    # many tiles
    (2051, 20, 40, -1, True),    # several row blocks
])
def test_quantized_gemm_matches_dequantize_then_linear(ops, bits, rows, n, k, group, asym):
    q, scales, zeros = random_weight(bits, n, k, group, asym, seed=rows)
    w = reference_weight(bits, q, scales, zeros)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(1))
    x = torch.randn(rows, k + 5)[:, 2:k + 2]  # rows with gaps between them
    packed = pack(ops, bits, q, scales, zeros, group, bias)
    assert packed.out_features == n and packed.in_features == k and packed.bits == bits
    torch.testing.assert_close(ops.linear(x, packed), F.linear(x, w, bias), **tolerance(k, w))
    no_bias = pack(ops, bits, q, scales, zeros, group)
    x3 = torch.randn(2, rows, k)  # leading dims are flattened and restored
    torch.testing.assert_close(ops.linear(x3, no_bias), F.linear(x3, w), **tolerance(k, w))
    linear = ops.linear_int8 if bits == 8 else ops.linear_int4
    torch.testing.assert_close(linear(x, no_bias), F.linear(x, w), **tolerance(k, w))
    with pytest.raises(ValueError):
        ops.linear(torch.randn(rows, k + 1), packed)


@pytest.mark.parametrize("asym", [False, True])
def test_unsigned_8bit_weights_with_and_without_zeros(ops, asym):
    """GPTQ's 8-bit values are unsigned with zero 128 unless zeros are given."""
    q, scales, zeros = random_weight(8, 40, 128, 32, asym, signed8=False)
    w = reference_weight(8, q, scales, zeros)
    x = torch.randn(9, 128)
    packed = ops.pack_linear_int8(q, scales, zeros, 32)
    torch.testing.assert_close(ops.linear(x, packed), F.linear(x, w), **tolerance(128, w))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows,i,k,group", [(1, 8, 16, -1), (7, 24, 64, 32), (20, 1024, 384, 128), (131, 16, 96, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_gemm_with_fused_silu_mul(ops, bits, rows, i, k, group, bias):
    q, scales, zeros = random_weight(bits, 2 * i, k, group, asym=True, seed=i)
    w = reference_weight(bits, q, scales, zeros)
    b = torch.randn(2 * i) if bias else None
    packed = pack(ops, bits, q, scales, zeros, group, b, gate_up=True)
    assert packed.out_features == i
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3
    gate, up = F.linear(x, w, b).chunk(2, dim=-1)
    expected = F.silu(gate) * up
    # Each projection is off by at most e (float32 sums of k products, |x| up to max|x|); the
    # product then by |d/dg silu(g) u| e + |silu(g)| e, with |silu'| < 1.1 everywhere.
    e = tolerance(k, w)["atol"] * float(x.abs().max())
    bound = e * (1.1 * up.abs() + F.silu(gate).abs()) + e * e + 1e-6
    error = (ops.linear(x, packed) - expected).abs()
    assert (error <= bound).all(), f"max error {float(error.max())}, worst excess {float((error - bound).max())}"
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(ops, bits, *random_weight(bits, 2 * i + 2, k, group, asym=True), group, gate_up=True)


def test_packing_keeps_weights_compact_and_drops_nothing(ops):
    """int8 is one byte a weight, int4 half a byte; scales and zeros ride along per group."""
    n, k = 40, 256  # 3 panels, the last one padded
    q8, s8, _ = random_weight(8, n, k, -1, asym=False)
    p8 = ops.pack_linear_int8(q8, s8)
    assert p8.qweight.dtype == torch.int8 and p8.qweight.shape == (3, k, 16) and not p8.has_zero
    assert torch.equal(p8.qweight.permute(0, 2, 1).reshape(-1, k)[:n], q8)
    assert not p8.qweight[-1, :, n % 16:].any()  # padding columns are zero
    q4, s4, z4 = random_weight(4, n, k, 64, asym=True)
    p4 = ops.pack_linear_int4(q4, s4, z4, 64)
    assert p4.qweight.dtype == torch.uint8 and p4.qweight.shape == (3, k, 8) and p4.has_zero
    assert p4.params.shape == (3, k // 64, 2, 16)
    assert p4.nbytes == 3 * 16 * k // 2 + 3 * (k // 64) * 2 * 16 * 4  # half a byte a weight, plus (scale, zero)s
    unpacked = torch.cat((p4.qweight & 15, p4.qweight >> 4), dim=2)  # (panels, K, 16)
    assert torch.equal(unpacked.permute(0, 2, 1).reshape(-1, k)[:n], q4)


@pytest.mark.parametrize("bad,match", [
    (dict(group=48), "does not divide"),
    (dict(scales_shape=(40, 3)), "scales must have shape"),
    (dict(q_dtype=torch.int32), "must be"),
    (dict(q_value=16), "0..15"),
    (dict(bias_shape=(39,)), "bias must have shape"),
])
def test_bad_packing_arguments_are_clear_errors(ops, bad, match):
    n, k, group = 40, 128, bad.get("group", 32)
    q = torch.randint(0, 16, (n, k), dtype=bad.get("q_dtype", torch.uint8))
    if "q_value" in bad:
        q[3, 5] = bad["q_value"]
    scales = torch.rand(*bad.get("scales_shape", (n, k // 32)))
    bias = torch.randn(*bad["bias_shape"]) if "bias_shape" in bad else None
    with pytest.raises(ValueError, match=match):
        ops.pack_linear_int4(q, scales, None, group, bias=bias)


def test_zero_rows(ops):
    q, scales, zeros = random_weight(4, 32, 64, 32, asym=True)
    packed = ops.pack_linear_int4(q, scales, zeros, 32)
    assert ops.linear(torch.randn(0, 64), packed).shape == (0, 32)


# ---- the quantized KV cache -------------------------------------------------------------------

QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The agreed cache format, in plain torch: (T, Hkv, D) -> values and (T, Hkv) scales."""
    s = x.abs().amax(-1) / QMAX[dtype]
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = x / s[..., None]
    if dtype == torch.int8:
        q = torch.round(q).clamp(-127, 127)
    return q.to(dtype), s


def awkward_rows(t: int, hkv: int, d: int, seed: int = 0) -> torch.Tensor:
    """Rows that exercise every rounding path: an all-zero row, ties, subnormal fp8 values, outliers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, hkv, d, generator=g) * torch.rand(t, hkv, 1, generator=g) * 4
    x[0, 0] = 0.0
    if t > 1:
        x[1, 0, :] = torch.linspace(-1, 1, d) * 1e-4
        x[1, 0, 0] = 1.0  # the rest falls into e4m3's subnormal range
    if t > 2:
        x[2, -1, :] = torch.arange(d) - d / 2 + 0.5  # int8: exact halves
    return x


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_native_kv_write_stores_exactly_the_torch_bytes(ops, dtype):
    t, blocks, bs, hkv, d = 9, 6, 4, 2, 64
    qkv = torch.zeros(t, 3 * hkv * d)
    qkv[:, hkv * d:] = torch.cat([awkward_rows(t, hkv, d, s).view(t, -1) for s in (1, 2)], dim=1)
    k, v = qkv[:, hkv * d:2 * hkv * d].view(t, hkv, d), qkv[:, 2 * hkv * d:].view(t, hkv, d)  # strided views
    data = torch.zeros(2, blocks, bs, hkv, d, dtype=dtype)
    scales = torch.ones(2, blocks, bs, hkv)
    slots = torch.tensor([3, 9, 0, 23, 14, 1, 2, 17, 5])
    ops.write_kv_quant(data, scales, k, v, slots)
    for i, x in enumerate((k, v)):
        q, s = quantize_rows(x, dtype)
        got_q = data[i].view(-1, hkv, d)[slots]
        assert torch.equal(got_q.view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(scales[i].view(-1, hkv)[slots], s)
    untouched = torch.ones(blocks * bs, dtype=torch.bool)
    untouched[slots] = False
    assert not data[:, :].view(2, -1, hkv, d)[:, untouched].view(torch.uint8).any()
    with pytest.raises(IndexError):
        ops.write_kv_quant(data, scales, k, v, torch.tensor([3, 9, 0, 24, 14, 1, 2, 17, 5]))


def test_e4m3_rounding_matches_torch_on_every_code(ops):
    """Every e4m3 value, and the midpoints between neighbours (ties to even), round-trip like torch."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = codes[codes.isfinite() & (codes.abs() <= 448)].unique()
    mids = (finite[1:] + finite[:-1]) / 2
    values = torch.cat((finite, mids, mids + 1e-3 * mids.abs(), mids - 1e-3 * mids.abs()))
    d = 8
    x = torch.zeros(-(-values.numel() // (d - 1)) * (d - 1))
    x[:values.numel()] = values
    rows = torch.cat((x.view(-1, d - 1), torch.full((x.numel() // (d - 1), 1), 448.0)), dim=1)  # scale exactly 1
    t = rows.shape[0]
    data = torch.zeros(2, t, 1, 1, d, dtype=torch.float8_e4m3fn)
    scales = torch.ones(2, t, 1, 1)
    ops.write_kv_quant(data, scales, rows.view(t, 1, d), rows.view(t, 1, d), torch.arange(t))
    assert torch.equal(scales, torch.ones_like(scales))
    assert torch.equal(data[0].reshape(t, d).view(torch.uint8), rows.to(torch.float8_e4m3fn).view(torch.uint8))


def _quant_cache(ctx_lens, hkv, d, bs, dtype, ops, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // bs) for c in ctx_lens) + 3
    data = torch.full((2, num_blocks, bs, hkv, d), 0x7F, dtype=torch.uint8).view(dtype)  # NaN/127: never read
    scales = torch.full((2, num_blocks, bs, hkv), float("nan"))
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for c in ctx_lens:
        tbl = [free.pop() for _ in range(-(-c // bs))]
        k, v = torch.randn(c, hkv, d, generator=g) * 2, torch.randn(c, hkv, d, generator=g)
        ops.write_kv_quant(data, scales, k, v, torch.tensor([tbl[p // bs] * bs + p % bs for p in range(c)]))
        tables.append(tbl)
    return data, scales, tables


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("heads,kv_heads,d,bs,window", [
    (6, 2, 64, 16, None),   # the demo model's shape
    (4, 1, 16, 4, None),    # multi-query
    (8, 8, 128, 16, None),  # multi-head, wide heads
    (4, 2, 24, 8, 7),       # head_dim not a multiple of 64; sliding window
    (2, 1, 8, 1, 3),        # one-token blocks
])
def test_quantized_decode_matches_dense_attention_on_the_dequantized_cache(ops, dtype, heads, kv_heads, d, bs,
                                                                             window):
    from test_models import _dense_attention

    ctx_lens = [1, 2, bs, bs + 1, 3 * bs - 1, 37, 100]
    data, scales, tables = _quant_cache(ctx_lens, kv_heads, d, bs, dtype, ops)
    n, width = len(ctx_lens), max(len(t) for t in tables)
    block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(n, heads + 1, d)[:, :heads]  # rows with a gap between them
    out = torch.empty(n, heads, d)
    ops.paged_decode_quant(q, data, scales, block_table, torch.tensor(ctx_lens), out, window, d ** -0.5)
    for i, (c, tbl) in enumerate(zip(ctx_lens, tables)):
        slots = torch.tensor([tbl[p // bs] * bs + p % bs for p in range(c)])
        k, v = ((data[j].view(-1, kv_heads, d)[slots].float() * scales[j].view(-1, kv_heads)[slots, :, None])
                for j in range(2))
        ref = _dense_attention(q[i:i + 1], k, v, [c - 1], window)
        torch.testing.assert_close(out[i:i + 1], ref, atol=2e-5, rtol=1e-5)


def test_quantized_cache_arguments_are_checked(ops):
    data = torch.zeros(2, 3, 4, 2, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="scales must have shape"):
        ops.write_kv_quant(data, torch.ones(2, 3, 4), torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match="int8 or float8_e4m3fn"):
        ops.write_kv_quant(data.float(), torch.ones(2, 3, 4, 2), torch.zeros(1, 2, 8), torch.zeros(1, 2, 8),
                           torch.tensor([0]))
