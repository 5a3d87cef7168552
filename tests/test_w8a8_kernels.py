"""The int8-activation (W8A8-dynamic) GEMMs of csrc/quant_w8a8.c against a reference that quantizes
the activations the same way.

The reference is written here with plain torch ops from the kernel's documented numerics: per row
and block of inputs (128, 64 or 32, the largest that divides the weight group), scale = max|x| / 127,
q = round-half-even(x / scale) clamped to +-127; then the product of the dequantized activations
and the dequantized weight, in float64. Any single activation rounded differently moves an output
by about scale * |w|, orders of magnitude above the tolerance, so the tolerance checks the
quantization bit for bit and the arithmetic to float rounding. Every implementation this CPU can
run (avx512vnni, avxvnni, generic C) is checked, and they must agree with each other.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tureen import LLM, SamplingParams
from tureen.errors import ConfigError
from tureen.executor import cpu_kernels

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ops():
    ops = cpu_kernels.load_cpu_ops("on", CPU, torch.float32, 64)
    yield ops
    ops.set_w8a8_isa("auto")


def act_block(group: int) -> int:
    return 128 if group % 128 == 0 else 64 if group % 64 == 0 else 32


def quantize_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    xb = x.reshape(m, k // block, block)
    amax = xb.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(xb / scale[..., None]).clamp(-127, 127)
    return q.reshape(m, k), scale


def reference(x, q, scales, zeros, group, bias=None, gate_up=False):
    n, k = q.shape
    qx, sx = quantize_activations(x, act_block(group))
    xd = qx.double() * sx.double().repeat_interleave(act_block(group), dim=1)
    s = scales.reshape(n, -1).double().repeat_interleave(group, dim=1)
    z = 0.0 if zeros is None else zeros.reshape(n, -1).double().repeat_interleave(group, dim=1)
    y = xd @ ((q.double() - z) * s).T
    if bias is not None:
        y = y + bias.double()
    if gate_up:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y


def random_weight(bits: int, n: int, k: int, group: int, asym: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    groups = k // group
    scales = torch.rand(n, groups, generator=g) * 0.02 + 0.002
    if bits == 4:
        q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        zeros = torch.randint(0, 16, (n, groups), generator=g).float() if asym else None
    else:
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        zeros = torch.randint(-20, 20, (n, groups), generator=g).float() if asym else None
    return q, scales, zeros


def check_every_isa(ops, x, packed, ref):
    isas = ops.w8a8_supported_isas()
    assert "generic" in isas
    outs = {}
    for isa in isas:
        assert ops.set_w8a8_isa(isa) == isa
        outs[isa] = ops.linear(x, packed).double()
        torch.testing.assert_close(outs[isa], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()) + 1e-7)
    ops.set_w8a8_isa("auto")
    first = next(iter(outs.values()))
    for isa, out in outs.items():
        torch.testing.assert_close(out, first, rtol=1e-6, atol=1e-6 * float(first.abs().max()) + 1e-7, msg=isa)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows,n,k,group", [
    (1, 16, 128, 128),    # one panel, one block
    (3, 37, 384, 384),    # one group per row: three 128-blocks; column tail
    (5, 50, 384, 128),    # row tail past the 4-row tile
    (9, 33, 256, 32),     # the smallest block
    (4, 48, 192, 64),     # 64-blocks
    (7, 20, 96, 96),      # a group of 96: three 32-blocks inside it
    (2, 64, 1024, 1024),
])
@pytest.mark.parametrize("asym", [False, True])
def test_w8a8_gemm_matches_the_same_quantization_in_torch(ops, bits, rows, n, k, group, asym):
    q, scales, zeros = random_weight(bits, n, k, group, asym, seed=rows + n)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k)) * 2.0
    bias = torch.randn(n) if rows % 2 else None
    packed = ops.pack_linear_w8a8(q, scales, zeros, group if group != k else -1, bits, bias=bias)
    assert packed.activation == "int8" and packed.weight_bits == bits and packed.bits == bits | cpu_kernels.ACT_INT8
    check_every_isa(ops, x, packed, reference(x, q, scales, zeros, group, bias))


@pytest.mark.parametrize("bits,group", [(8, 256), (4, 64)])
def test_w8a8_gemm_with_fused_silu_mul(ops, bits, group):
    q, scales, zeros = random_weight(bits, 2 * 40, 256, group, True, seed=3)
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(1))
    packed = ops.pack_linear_w8a8(q, scales, zeros, group, bits, gate_up=True)
    assert packed.out_features == 40
    check_every_isa(ops, x, packed, reference(x, q, scales, zeros, group, gate_up=True))


def test_unsigned_8bit_weight_and_zero_blocks(ops):
    """GPTQ-style uint8 weights (zero 128 by default), and activation blocks that are all zero."""
    g = torch.Generator().manual_seed(5)
    q = torch.randint(0, 256, (24, 256), generator=g, dtype=torch.uint8)
    scales = torch.rand(24, 2, generator=g) * 0.01
    x = torch.randn(3, 256, generator=g)
    x[1] = 0.0
    x[2, :128] = 0.0
    packed = ops.pack_linear_w8a8(q, scales, None, 128, 8)
    check_every_isa(ops, x, packed, reference(x, q, scales, torch.full((24, 2), 128.0), 128))
    assert torch.equal(ops.linear(x, packed)[1], torch.zeros(24))


def test_w8a8_packing_errors_are_clear(ops):
    q, scales, _ = random_weight(8, 16, 96, 96, False)
    with pytest.raises(ValueError, match="multiple of 32"):
        ops.pack_linear_w8a8(q, scales.repeat(1, 2), None, 48, 8)
    with pytest.raises(ValueError, match="8- or 4-bit"):
        ops.pack_linear_w8a8(q, scales, None, -1, 2)
    with pytest.raises(ValueError, match="0..15"):
        ops.pack_linear_w8a8(q.to(torch.uint8) | 16, scales, None, -1, 4)
    with pytest.raises(ValueError, match="unknown"):
        ops.set_w8a8_isa("sse9")


def test_the_environment_forces_the_generic_fallback(ops):
    code = ("import torch; from tureen.executor import cpu_kernels; "
            "print(cpu_kernels.load_cpu_ops('on', torch.device('cpu'), torch.float32, 64).w8a8_isa)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TUREEN_W8A8_ISA": "generic"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "generic"
    assert ops.w8a8_isa in ops.w8a8_supported_isas()


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = ["def main(argv):", "import os\nclass Foo:", "x = [1, 2"]


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_engine_runs_int8_activations_in_every_layer_and_both_decode_paths_agree(llama_dir, quantization):
    from tureen.executor.quantization.factory import linear_kernels

    outs = {}
    for stack in ("native", "layers"):
        llm = LLM(str(llama_dir), quantization=quantization, quantization_activation="int8", decode_stack=stack,
                  quantization_group_size=32, quantize_lm_head=True, kv_cache_memory="16MiB")
        runner = llm.llm_engine.runner
        assert (runner.decode_stack is not None) == (stack == "native")
        kernels = linear_kernels(runner.model)
        assert kernels and all("W8A8" in what for what in kernels), kernels
        outs[stack] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert outs["native"] == outs["layers"]


def test_int8_activations_need_a_quantized_model_and_the_native_kernels(llama_dir):
    with pytest.raises(ConfigError, match="not quantized"):
        LLM(str(llama_dir), quantization_activation="int8", kv_cache_memory="16MiB")
    with pytest.raises(ConfigError, match="native CPU kernels"):
        LLM(str(llama_dir), quantization="int8", quantization_activation="int8", cpu_kernels="off",
            kv_cache_memory="16MiB")
    with pytest.raises(ConfigError, match="quantization_activation"):
        LLM(str(llama_dir), quantization="int8", quantization_activation="int4")


class _Layer:
    """The part of a linear layer that choose_kernel looks at."""

    def __init__(self, n: int, k: int) -> None:
        from tureen.executor.quantization.base import IDENTITY

        self.in_features, self.out_features, self.epilogue = k, n, IDENTITY
        self.shards, self.has_bias, self.prefix = {None: (0, n)}, False, "test"


@pytest.mark.parametrize("act_order", [False, True])
def test_choose_kernel_picks_w8a8_for_act_order_group_weights(ops, act_order):
    from tureen.executor.quantization.base import IDENTITY, LinearBackend
    from tureen.executor.quantization.kernels import choose_kernel
    from tureen.executor.quantization.weights import GroupWeight

    q, scales, zeros = random_weight(4, 40, 256, 64, True, seed=9)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(2)) if act_order else None
    weight = GroupWeight(q, scales, zeros, 64, 4, perm)
    kernel = choose_kernel(weight, _Layer(40, 256), LinearBackend("native", ops, activation="int8"), None)
    assert "W8A8" in kernel.describe()
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4))
    xc = x if perm is None else x[:, perm]  # the canonical (group) order the weight is stored in
    ref = reference(xc, q, scales, zeros, 64)
    out = kernel.apply(x, None, IDENTITY).double()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_layers_whose_groups_do_not_fit_keep_the_weight_only_kernel(ops):
    from tureen.executor.quantization.base import LinearBackend
    from tureen.executor.quantization.kernels import choose_kernel
    from tureen.executor.quantization.weights import GroupWeight, Int8Weight

    q, scales, zeros = random_weight(4, 16, 96, 48, True)
    backend = LinearBackend("native", ops, activation="int8")
    kernel = choose_kernel(GroupWeight(q, scales, zeros, 48, 4), _Layer(16, 96), backend, None)
    assert "W8A8" not in kernel.describe() and "int4" in kernel.describe()
    q8, s8, _ = random_weight(8, 16, 96, 96, False)
    assert "W8A8" in choose_kernel(Int8Weight(q8, s8[:, 0]), _Layer(16, 96), backend, None).describe()
    plain = choose_kernel(Int8Weight(q8, s8[:, 0]), _Layer(16, 96), LinearBackend("native", ops), None)
    assert "W8A8" not in plain.describe()


@pytest.mark.parametrize("bits,group", [(8, 384), (4, 128)])
def test_w8a8_rows_do_not_depend_on_their_batch(ops, bits, group):
    """Per-row scales and exact integer sums: a row gives the same bits alone, in a 4-row tile or in
    an 8-row one (batch invariance, as the float32 kernels have it)."""
    q, scales, zeros = random_weight(bits, 48, 384, group, True, seed=11)
    packed = ops.pack_linear_w8a8(q, scales, zeros, group if group != 384 else -1, bits)
    x = torch.randn(13, 384, generator=torch.Generator().manual_seed(6))
    for isa in ops.w8a8_supported_isas():
        ops.set_w8a8_isa(isa)
        full = ops.linear(x, packed)
        for rows in (slice(0, 1), slice(5, 9), slice(12, 13), slice(3, 11)):
            assert torch.equal(ops.linear(x[rows].contiguous(), packed), full[rows]), (isa, rows)
    ops.set_w8a8_isa("auto")
