"""Pre-quantized checkpoints (GPTQ, AWQ, compressed-tensors) and on-the-fly int8 / int4 / fp8.

Each test writes a real quantized checkpoint from a tiny random one with the reference packers of
``quant_reference.py`` (the tools' exact on-disk layouts), then checks that:
- tureen's dequantized weights equal the reference dequantization bit for bit;
- tureen's greedy output on the quantized checkpoint equals transformers' greedy output on a
  float32 checkpoint holding the dequantized weights, token for token.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from checkpoints import hf_greedy

import quant_reference as qr
from tureen import LLM, SamplingParams
from tureen.errors import ConfigError, ModelLoadError
from tureen.executor.loader import load_hf_config, load_model
from tureen.executor.quantization import LinearBackend
from tureen.executor.quantization.config import resolve_quantization
from tureen.executor.quantization.factory import linear_method_factory

CPU = torch.device("cpu")
SHARDS = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def tureen_weights(path, quantization=None, group_size=128) -> dict[str, torch.Tensor]:
    """Every decoder linear layer's dequantized weight, split back into checkpoint names."""
    hf = load_hf_config(path)
    quant = resolve_quantization(quantization, hf, path, group_size)
    model = load_model(path, hf, CPU, torch.float32, linear_method_factory(LinearBackend(), quant))
    out = {}
    for name, layer in model.linear_layers():
        if name == "lm_head":
            continue
        w = layer.method.dequantized_weight(layer)
        parent, _, last = name.rpartition(".")
        parts = SHARDS.get(last, [last])
        for shard, (offset, rows) in zip(parts, layer.shards.values()):
            out[f"{parent}.{shard}"] = w[offset:offset + rows]
    return out


def assert_bitwise(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(ref)
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name


PROMPTS = [[5, 9, 100, 42, 7, 300, 12], [250, 3, 3, 17], list(range(40, 70))]


def assert_greedy_matches(quant_dir, deq_dir, **kw):
    llm = LLM(str(quant_dir), dtype="float32", device="cpu", kv_cache_memory="8MiB", max_model_len=128, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for ids, out in zip(PROMPTS, llm.generate(PROMPTS, params)):
        assert out.outputs[0].token_ids == hf_greedy(deq_dir, ids, 12), ids


def _check(tmp_path, src, ref, quant_dir, quantization=None, **kw):
    assert_bitwise(tureen_weights(quant_dir, quantization), ref)
    deq = qr.write_dequantized(src, tmp_path / "dequantized", ref)
    for cpu_kernels in ("off", "on"):
        assert_greedy_matches(quant_dir, deq, quantization=quantization, cpu_kernels=cpu_kernels, **kw)


@pytest.mark.parametrize("bits,group_size,sym,act_order", [
    (4, 32, True, False), (4, 32, False, True), (4, -1, True, False), (8, 32, True, True), (8, -1, False, False),
    (2, 32, False, False)])  # 2 bit: no native kernel, dequantize-then-F.linear
def test_gptq(tmp_path, llama_dir, bits, group_size, sym, act_order):
    ref = qr.write_gptq(llama_dir, tmp_path / "q", bits, group_size, sym, act_order)
    _check(tmp_path, llama_dir, ref, tmp_path / "q")


def test_gptq_dynamic_rules_skip_and_override_modules(tmp_path, llama_dir):
    from safetensors.torch import load_file

    dynamic = {"-:.*layers\\.1\\.self_attn\\..*": {}, "+:.*down_proj": {"bits": 8}}
    ref = qr.write_gptq(llama_dir, tmp_path / "q", 4, 32, dynamic=dynamic)
    src = load_file(llama_dir / "model.safetensors")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):  # left float, as written
        ref[f"model.layers.1.self_attn.{name}"] = src[f"model.layers.1.self_attn.{name}.weight"]
    assert_bitwise(tureen_weights(tmp_path / "q"), ref)
    state = load_file(tmp_path / "q" / "model.safetensors")
    assert state["model.layers.0.mlp.down_proj.qweight"].shape == (128 // 4, 64)  # 8-bit: 4 a word


def test_gptq_quantized_lm_head(tmp_path, llama_dir):
    ref = qr.write_gptq(llama_dir, tmp_path / "q", 4, 32, lm_head=True)
    hf = load_hf_config(tmp_path / "q")
    quant = resolve_quantization(None, hf, tmp_path / "q")
    model = load_model(tmp_path / "q", hf, CPU, torch.float32, linear_method_factory(LinearBackend(), quant))
    assert torch.equal(model.lm_head.method.dequantized_weight(model.lm_head), ref["lm_head"])
    deq = qr.write_dequantized(llama_dir, tmp_path / "dequantized", ref)
    assert_greedy_matches(tmp_path / "q", deq, cpu_kernels="on")


def test_gptq_with_qkv_bias_from_quantize_config_json(tmp_path, checkpoint_factory):
    src = checkpoint_factory("qwen2")  # q/k/v biases, tied embeddings
    ref = qr.write_gptq(src, tmp_path / "q", 4, 32, True, True, config_file="quantize_config.json")
    _check(tmp_path, src, ref, tmp_path / "q", quantization="gptq")


def test_awq(tmp_path, llama_dir, caplog):
    ref = qr.write_awq(llama_dir, tmp_path / "q", group_size=32)
    caplog.set_level(logging.INFO, logger="tureen.executor")
    _check(tmp_path, llama_dir, ref, tmp_path / "q")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("quantization:")]
    assert any("awq 4-bit GEMM, group_size 32" in m and "native int4 (group 32) GEMM" in m for m in lines), lines


@pytest.mark.parametrize("strategy,symmetric,actorder", [("channel", True, False), ("group", True, False),
                                                          ("group", False, True)])
def test_compressed_tensors_pack_quantized(tmp_path, llama_dir, strategy, symmetric, actorder):
    ref = qr.write_ct_packed(llama_dir, tmp_path / "q", strategy, 32, symmetric, actorder)
    _check(tmp_path, llama_dir, ref, tmp_path / "q")


def test_compressed_tensors_int8_w8a8_runs_weight_only(tmp_path, llama_dir):
    ref = qr.write_ct_int8(llama_dir, tmp_path / "q")
    _check(tmp_path, llama_dir, ref, tmp_path / "q", quantization="compressed-tensors")


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_compressed_tensors_fp8(tmp_path, llama_dir, strategy):
    ref = qr.write_ct_fp8(llama_dir, tmp_path / "q", strategy)
    assert_bitwise(tureen_weights(tmp_path / "q"), ref)
    deq = qr.write_dequantized(llama_dir, tmp_path / "dequantized", ref)
    assert_greedy_matches(tmp_path / "q", deq, cpu_kernels="off")


@pytest.mark.parametrize("method", ["int8", "fp8", "int4"])
def test_on_the_fly(tmp_path, llama_dir, method):
    ref = qr.on_the_fly_reference(llama_dir, method, group_size=32)
    assert_bitwise(tureen_weights(llama_dir, method, group_size=32), ref)
    deq = qr.write_dequantized(llama_dir, tmp_path / "dequantized", ref)
    for cpu_kernels in ("off", "on"):  # fp8 on the native kernels runs requantized to int8: not the same weights
        if not (method == "fp8" and cpu_kernels == "on"):
            assert_greedy_matches(llama_dir, deq, quantization=method, quantization_group_size=32,
                                  cpu_kernels=cpu_kernels)


def test_fp8_runs_requantized_to_int8_on_the_native_kernels(tmp_path, llama_dir):
    """The CPU has no fp8 math: on the native backend fp8 weights take the int8 GEMM (README)."""
    from tureen.executor.cpu_kernels import load_cpu_ops
    from tureen.executor.quantization.factory import linear_kernels

    ops = load_cpu_ops("on", CPU, torch.float32, 16)
    hf = load_hf_config(llama_dir)
    quant = resolve_quantization("fp8", hf, llama_dir)
    model = load_model(llama_dir, hf, CPU, torch.float32, linear_method_factory(LinearBackend("native", ops), quant))
    assert "native int8 GEMM" in linear_kernels(model)
    ref = qr.on_the_fly_reference(llama_dir, "fp8-as-int8")
    deq = qr.write_dequantized(llama_dir, tmp_path / "dequantized", ref)
    assert_greedy_matches(llama_dir, deq, quantization="fp8", cpu_kernels="on")


# ---- detection and bad input --------------------------------------------------------------------


def test_explicit_quantization_that_contradicts_the_checkpoint(tmp_path, llama_dir):
    qr.write_awq(llama_dir, tmp_path / "q", group_size=32)
    with pytest.raises(ConfigError, match="contradicts the checkpoint.*'awq'"):
        LLM(str(tmp_path / "q"), quantization="gptq", device="cpu")
    with pytest.raises(ConfigError, match="contradicts"):
        LLM(str(tmp_path / "q"), quantization="int8", device="cpu")
    with pytest.raises(ConfigError, match="no quantization_config"):
        LLM(str(llama_dir), quantization="awq", device="cpu")


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unknown_quant_method_names_the_field(tmp_path, llama_dir):
    qr.write_gptq(llama_dir, tmp_path / "q")
    _edit_config(tmp_path / "q", quant_method="bitsandbytes")
    with pytest.raises(ModelLoadError, match="quant_method='bitsandbytes' is not supported"):
        tureen_weights(tmp_path / "q")


def test_group_size_that_does_not_divide_the_input_names_the_field(tmp_path, llama_dir):
    qr.write_gptq(llama_dir, tmp_path / "q", group_size=32)
    _edit_config(tmp_path / "q", group_size=48)
    with pytest.raises(ModelLoadError, match=r"group_size=48 does not divide the input size 64 of model\.layers\.0"):
        tureen_weights(tmp_path / "q")


def test_truncated_qweight_names_the_tensor(tmp_path, llama_dir):
    from safetensors.torch import load_file, save_file

    qr.write_gptq(llama_dir, tmp_path / "q")
    state = load_file(tmp_path / "q" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.qweight"
    state[name] = state[name][:-1].clone()
    save_file(state, tmp_path / "q" / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"tensor 'model\.layers\.1\.mlp\.down_proj\.qweight'.*shape \(15, 64\)"):
        tureen_weights(tmp_path / "q")


def test_ignored_layers_stay_float_and_fused_shards_must_agree(tmp_path, llama_dir):
    qr.write_ct_fp8(llama_dir, tmp_path / "q")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "q" / "model.safetensors")
    src = load_file(llama_dir / "model.safetensors")
    for key in ("model.layers.0.mlp.down_proj.weight_scale",):
        state.pop(key)
    state["model.layers.0.mlp.down_proj.weight"] = src["model.layers.0.mlp.down_proj.weight"]
    save_file(state, tmp_path / "q" / "model.safetensors")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = ["lm_head", "re:.*layers\\.0\\.mlp\\.down_proj$"]
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    weights = tureen_weights(tmp_path / "q")
    assert torch.equal(weights["model.layers.0.mlp.down_proj"], src["model.layers.0.mlp.down_proj.weight"])
    cfg["quantization_config"]["ignore"] = ["lm_head", "model.layers.0.self_attn.k_proj"]
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="fused shards"):
        tureen_weights(tmp_path / "q")


def test_vllm_fp8_checkpoint_with_per_tensor_scales_and_ignored_layers(tmp_path, llama_dir):
    """``quant_method: fp8`` as vLLM / llm-compressor write it: e4m3 weight, scalar weight_scale, input_scale."""
    from safetensors.torch import load_file, save_file

    ref = qr.write_ct_fp8(llama_dir, tmp_path / "q", strategy="tensor")
    state = load_file(tmp_path / "q" / "model.safetensors")
    src = load_file(llama_dir / "model.safetensors")
    for name in ref:
        state[f"{name}.weight_scale"] = state[f"{name}.weight_scale"].reshape(())
        state[f"{name}.input_scale"] = torch.tensor(1.0)
    for i in range(2):  # static fp8 KV-cache scales, unused by tureen's per-token scales
        for kv in ("k_scale", "v_scale"):
            state[f"model.layers.{i}.self_attn.{kv}"] = torch.tensor(1.0)
    skipped = "model.layers.1.self_attn.o_proj"
    for key in ("weight_scale", "input_scale"):
        state.pop(f"{skipped}.{key}")
    state[f"{skipped}.weight"] = src[f"{skipped}.weight"]
    ref[skipped] = src[f"{skipped}.weight"]
    save_file(state, tmp_path / "q" / "model.safetensors")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": [skipped]}
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    assert_bitwise(tureen_weights(tmp_path / "q", "fp8"), ref)


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("model.layers.0.mlp.up_proj.qzeros"),
     r"missing tensor\(s\): model\.layers\.0\.mlp\.up_proj\.qzeros"),
    (lambda s: s.update({"model.layers.0.mlp.up_proj.qweight": s["model.layers.0.mlp.up_proj.qweight"].float()}),
     r"tensor 'model\.layers\.0\.mlp\.up_proj\.qweight': has dtype torch\.float32, expected torch\.int32"),
    (lambda s: s.update({"model.layers.1.self_attn.k_proj.scales": s["model.layers.1.self_attn.k_proj.scales"][:, :8]}),
     r"tensor 'model\.layers\.1\.self_attn\.k_proj\.scales': has shape \(2, 8\), expected \(2, 32\)"),
])
def test_bad_awq_tensors_name_the_tensor(tmp_path, llama_dir, edit, message):
    from safetensors.torch import load_file, save_file

    qr.write_awq(llama_dir, tmp_path / "q", group_size=32)
    state = load_file(tmp_path / "q" / "model.safetensors")
    edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "q" / "model.safetensors")
    with pytest.raises(ModelLoadError, match=message):
        tureen_weights(tmp_path / "q")


def test_compressed_tensors_weight_shape_must_match_the_layer(tmp_path, llama_dir):
    from safetensors.torch import load_file, save_file

    qr.write_ct_packed(llama_dir, tmp_path / "q", "channel")
    state = load_file(tmp_path / "q" / "model.safetensors")
    state["model.layers.0.self_attn.o_proj.weight_shape"] = torch.tensor([64, 56])
    save_file(state, tmp_path / "q" / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"o_proj: weight_shape is \[64, 56\], the layer is \[64, 64\]"):
        tureen_weights(tmp_path / "q")


def test_compressed_tensors_optional_tensors_older_and_static_checkpoints_carry(tmp_path, llama_dir):
    """Symmetric pack-quantized with (all-zero, unpacked int8) zero points, and static activation scales."""
    from safetensors.torch import load_file, save_file

    ref = qr.write_ct_packed(llama_dir, tmp_path / "q", "group", 32, symmetric=True)
    state = load_file(tmp_path / "q" / "model.safetensors")
    for name in ref:
        state[f"{name}.weight_zero_point"] = torch.zeros(state[f"{name}.weight_scale"].shape, dtype=torch.int8)
        state[f"{name}.input_scale"] = torch.tensor([0.02])
        state[f"{name}.input_zero_point"] = torch.tensor([0], dtype=torch.int8)
    save_file(state, tmp_path / "q" / "model.safetensors")
    assert_bitwise(tureen_weights(tmp_path / "q"), ref)
