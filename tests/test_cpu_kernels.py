"""The native CPU paths: the C paged-decode kernel and oneDNN linear layers with packed weights.

Each is checked against a plain reference (dense attention, ``F.linear``), and so is the way the
engine falls back when the kernel cannot be built.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from test_models import _dense_attention
from tureen.errors import ConfigError
from tureen.executor import cpu_kernels
from tureen.executor.attention import Workspace, build_attention_metadata, paged_attention, write_kv
from tureen.executor.models.layers import Linear
from tureen.executor.quantization.unquantized import NativeLinearMethod, OneDnnLinearMethod

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ops():
    return cpu_kernels.load_cpu_ops("on", CPU, torch.float32, 64)


def _filled_cache(ctx_lens, heads_kv, d, bs, fill=0.0, seed=0):
    """A cache holding each sequence's context under a shuffled block table, plus that context."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // bs) for c in ctx_lens) + 3
    cache = torch.full((2, num_blocks, bs, heads_kv, d), fill)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables, history = [], []
    for c in ctx_lens:
        tbl = [free.pop() for _ in range(-(-c // bs))]
        k, v = torch.randn(c, heads_kv, d, generator=g), torch.randn(c, heads_kv, d, generator=g)
        write_kv(cache, k, v, torch.tensor([tbl[p // bs] * bs + p % bs for p in range(c)], dtype=torch.long))
        tables.append(tbl)
        history.append((k, v))
    return cache, tables, history


@pytest.mark.parametrize("heads,kv_heads,d,bs,window", [
    (6, 2, 64, 16, None),   # the demo model's shape
    (4, 1, 16, 4, None),    # multi-query
    (8, 8, 128, 16, None),  # multi-head, wide heads
    (4, 2, 24, 8, 7),       # head_dim not a multiple of 64; sliding window
    (2, 1, 8, 1, 3),        # one-token blocks
])
def test_decode_kernel_matches_dense_attention(ops, heads, kv_heads, d, bs, window):
    ctx_lens = [1, 2, bs, bs + 1, 3 * bs - 1, 37, 100]
    cache, tables, history = _filled_cache(ctx_lens, kv_heads, d, bs, fill=float("nan"))  # never read
    n, width = len(ctx_lens), max(len(t) for t in tables)
    block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    # q rows with a gap between them (a view into a wider buffer), as the kernel may receive
    q = torch.randn(n, heads + 1, d)[:, :heads]
    out = torch.empty(n, heads, d)
    ops.paged_decode(q, cache, block_table, torch.tensor(ctx_lens), out, window, d ** -0.5)
    for i, (c, (k, v)) in enumerate(zip(ctx_lens, history)):
        ref = _dense_attention(q[i:i + 1], k, v, [c - 1], window)
        torch.testing.assert_close(out[i:i + 1], ref, atol=2e-6, rtol=1e-5)


def test_paged_attention_uses_the_kernel_for_decode_rows(ops):
    """A mixed step (decode rows and prefill chunks) is identical with and without the kernel."""
    torch.manual_seed(0)
    heads, kv_heads, d, bs = 4, 2, 16, 4
    reqs = [(5, 1), (0, 1), (12, 1), (0, 6), (9, 4)]  # (start_pos, query_len)
    cache, tables, _ = _filled_cache([s + q for s, q in reqs], kv_heads, d, bs)
    total = sum(q for _, q in reqs)
    q, k, v = torch.randn(total, heads, d), torch.randn(total, kv_heads, d), torch.randn(total, kv_heads, d)
    outs = []
    for cpu_ops in (None, ops):
        meta = build_attention_metadata([n for _, n in reqs], [s for s, _ in reqs], tables, bs, CPU, Workspace(),
                                        cpu_ops)
        assert meta.cpu_ops is cpu_ops
        outs.append(paged_attention(q, k, v, cache.clone(), meta, None))
    torch.testing.assert_close(outs[1], outs[0], atol=2e-6, rtol=1e-5)


def test_kernel_is_built_once_per_source_and_cpu(tmp_path, monkeypatch):
    cpu_kernels._load.cache_clear()
    monkeypatch.setenv("TUREEN_CACHE_DIR", str(tmp_path))
    first = cpu_kernels.load_cpu_ops("on", CPU, torch.float32, 64)
    built = list((tmp_path / "kernels").glob("cpu_ops-*.so"))
    assert [first.path] == built
    mtime = built[0].stat().st_mtime_ns
    cpu_kernels._load.cache_clear()
    again = cpu_kernels.load_cpu_ops("on", CPU, torch.float32, 64)
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    cpu_kernels._load.cache_clear()


def test_build_failure_falls_back_with_a_warning_or_fails_when_required(tmp_path, monkeypatch, caplog):
    cpu_kernels._load.cache_clear()
    monkeypatch.setenv("TUREEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING, logger="tureen.executor"):
        assert cpu_kernels.load_cpu_ops("auto", CPU, torch.float32, 64) is None
    assert "compiling csrc/cpu_ops.c failed" in caplog.text
    with pytest.raises(ConfigError, match="cpu_kernels='on'"):
        cpu_kernels.load_cpu_ops("on", CPU, torch.float32, 64)
    assert cpu_kernels.load_cpu_ops("off", CPU, torch.float32, 64) is None
    assert not list(tmp_path.glob("kernels/*.so"))
    cpu_kernels._load.cache_clear()


@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 64), (torch.float32, 12)])
def test_unsupported_configurations_use_torch_ops(dtype, head_dim):
    assert cpu_kernels.load_cpu_ops("auto", CPU, dtype, head_dim) is None
    with pytest.raises(ConfigError):
        cpu_kernels.load_cpu_ops("on", CPU, dtype, head_dim)


@pytest.mark.parametrize("backend", ["native", "onednn"])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear_and_drops_the_plain_weight(ops, backend, bias):
    torch.manual_seed(0)
    layer = Linear(48, 40, bias)  # 40 outputs: two full 16-column panels and a partial one
    for p in layer.parameters():
        p.data.normal_()
    weight, b = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()
    method = NativeLinearMethod(ops) if backend == "native" else OneDnnLinearMethod()
    layer.set_method(method)
    layer.weight.data.copy_(weight)
    if b is not None:
        layer.bias.data.copy_(b)
    layer.process_weights_after_loading()
    assert layer.weight is None and "weight" not in dict(layer.named_parameters())
    for rows in (0, 1, 5, 7, 130):
        x = torch.randn(rows, 48)
        torch.testing.assert_close(layer(x), F.linear(x, weight, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows,n,k", [(1, 16, 8), (6, 33, 1), (13, 64, 2500), (300, 17, 512), (2051, 48, 40)])
def test_native_gemm_shapes(ops, rows, n, k):
    """Row tails (rows % 6), column tails (n % 16), K split into blocks (k > 1024), several row blocks."""
    torch.manual_seed(rows)
    w, bias = torch.randn(n, k), torch.randn(n)
    packed = ops.pack_linear(w, bias)
    assert packed.weight.shape == (-(-n // 16), k, 16) and packed.out_features == n
    torch.testing.assert_close(packed.weight.permute(0, 2, 1).reshape(-1, k)[:n], w, atol=0, rtol=0)
    assert not packed.weight[-1, :, n % 16 or 16:].any()  # the last panel's padding columns are zero
    x = torch.randn(rows, k + 5)[:, 2:k + 2]  # rows with gaps between them
    tol = dict(atol=1e-4 * k ** 0.5, rtol=1e-4)
    torch.testing.assert_close(ops.linear(x, packed), F.linear(x, w, bias), **tol)
    x3 = torch.randn(2, rows, k)  # leading dims are flattened and restored
    torch.testing.assert_close(ops.linear(x3, ops.pack_linear(w)), F.linear(x3, w), **tol)
    with pytest.raises(ValueError):
        ops.linear(torch.randn(rows, k + 1), packed)


@pytest.mark.parametrize("rows,i,k", [(1, 8, 16), (7, 24, 40), (131, 1024, 384), (20, 16, 1500)])
@pytest.mark.parametrize("bias", [False, True])
def test_native_gemm_with_fused_silu_mul(ops, rows, i, k, bias):
    torch.manual_seed(i)
    w, b = torch.randn(2 * i, k) / k ** 0.5, torch.randn(2 * i) if bias else None
    packed = ops.pack_linear(w, b, gate_up=True)
    assert packed.out_features == i
    x = torch.randn(rows, k) * 3
    gate, up = F.linear(x, w, b).chunk(2, dim=-1)
    torch.testing.assert_close(ops.linear(x, packed), F.silu(gate) * up, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        ops.pack_linear(torch.randn(2 * i + 2, k), gate_up=True)


@pytest.mark.parametrize("intermediate,fused", [(96, True), (36, False)])
def test_mlp_packs_gate_up_with_the_activation_when_it_can(ops, intermediate, fused):
    from tureen.executor.models.layers import GatedMLP

    torch.manual_seed(0)
    mlp = GatedMLP(40, intermediate, bias=False)
    for p in mlp.parameters():
        p.data.normal_(std=0.2)
    x = torch.randn(11, 40)
    ref = mlp(x)
    for layer in (mlp.gate_up_proj, mlp.down_proj):
        weight = layer.weight.detach().clone()
        layer.set_method(NativeLinearMethod(ops))
        layer.weight.data.copy_(weight)
        layer.process_weights_after_loading()
    assert mlp.gate_up_proj.packed_weight.gate_up is fused
    torch.testing.assert_close(mlp(x), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n", [384, 13])
def test_rms_norm_with_and_without_the_residual_add(ops, n):
    from tureen.executor.models.layers import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(n, 1e-5)
    norm.weight.data.normal_()
    x = torch.randn(9, n + 3)[:, :n] * 3  # rows with a gap between them
    torch.testing.assert_close(ops.rms_norm(x, norm.weight, 1e-5), norm(x), atol=1e-5, rtol=1e-5)
    residual = torch.randn(9, n)
    expected_residual = residual + x
    out = ops.rms_norm(x, norm.weight, 1e-5, residual)
    torch.testing.assert_close(residual, expected_residual)  # updated in place
    torch.testing.assert_close(out, norm(expected_residual), atol=1e-5, rtol=1e-5)
    x, residual = torch.randn(9, n), expected_residual.clone()  # in place into x
    expected = norm(residual + x)
    assert ops.rms_norm(x, norm.weight, 1e-5, residual, out=x) is x
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("i", [1024, 21])
def test_silu_mul(ops, i):
    torch.manual_seed(0)
    gate_up = torch.randn(5, 2 * i) * 4
    gate_up[0, :4] = torch.tensor([-120.0, -88.5, 90.0, 0.0])  # the exp clamps
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_mul(gate_up), F.silu(gate) * up, atol=1e-5, rtol=1e-5)


def test_rope_in_place_on_a_strided_view(ops):
    from tureen.executor.models.layers import RopeConfig, RotaryEmbedding, apply_rotary

    torch.manual_seed(0)
    t, heads, d = 7, 5, 16
    rope = RotaryEmbedding(RopeConfig(head_dim=d, theta=10000.0))
    cos, sin = rope.cos_sin(torch.tensor([0, 1, 2, 40, 41, 300, 1000]), torch.float32)
    rows = torch.randn(t, (heads + 2) * d)  # rope the first `heads` heads of each row
    view = rows[:, :heads * d].view(t, heads, d)
    expected, untouched = apply_rotary(view.clone(), cos, sin), rows[:, heads * d:].clone()
    ops.rope_(view, cos, sin)
    torch.testing.assert_close(view, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(rows[:, heads * d:], untouched)


def test_write_kv_matches_index_copy_and_rejects_slots_outside_the_cache(ops):
    torch.manual_seed(0)
    cache, expected = torch.zeros(2, 6, 4, 2, 8), torch.zeros(2, 6, 4, 2, 8)
    qkv = torch.randn(5, 3 * 16)  # k and v are strided views into it, as in the model
    k, v = qkv[:, 16:32].view(5, 2, 8), qkv[:, 32:].view(5, 2, 8)
    slots = torch.tensor([3, 9, 0, 23, 14])
    ops.write_kv(cache, k, v, slots)
    write_kv(expected, k, v, slots)
    assert torch.equal(cache, expected)
    with pytest.raises(IndexError):
        ops.write_kv(cache, k, v, torch.tensor([3, 9, 0, 24, 14]))


@pytest.mark.parametrize("v", [1, 3, 8, 9, 17, 8192, 50257])
def test_argmax_takes_the_first_maximum_and_counts_nan_as_the_maximum_like_torch(ops, v):
    g = torch.Generator().manual_seed(v)
    x = torch.randn(6, v, generator=g)
    x[1] = 0.0  # all tied: the first
    x[2] = float("-inf")
    if v > 3:
        x[3, v // 2] = x[3, v - 1] = float("nan")  # the first NaN wins
        x[4, 1] = x[4, v - 2] = x[4].max() + 1  # a tie for the maximum: the first
    assert ops.argmax(x) == x.argmax(-1).tolist()
    strided = torch.randn(5, v + 40, generator=g)[:, 20:20 + v]  # rows further apart than they are long
    assert ops.argmax(strided) == strided.argmax(-1).tolist()
    with pytest.raises(ValueError):
        ops.argmax(x[0])  # not (rows, V)
