"""The linear-method seam: every method computes the same product and the same epilogue."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from tureen.config import EngineConfig
from tureen.entrypoints.engine_args import add_engine_args, engine_config_from_args
from tureen.errors import ConfigError
from tureen.executor.cpu_kernels import load_cpu_ops
from tureen.executor.models.layers import GatedMLP, Linear
from tureen.executor.quantization import SILU_MUL, LinearBackend
from tureen.executor.quantization.config import OnTheFlyConfig
from tureen.executor.quantization.factory import float_method
from tureen.executor.quantization.unquantized import OneDnnLinearMethod, TorchLinearMethod

CPU = torch.device("cpu")


def _backends():
    ops = load_cpu_ops("auto", CPU, torch.float32, 16)
    out = [LinearBackend("torch"), LinearBackend("onednn")]
    return out + ([LinearBackend("native", ops)] if ops is not None else [])


def _fill(layer, weight, bias=None):
    layer.weight.data.copy_(weight)
    if bias is not None:
        layer.bias.data.copy_(bias)
    layer.process_weights_after_loading()


@pytest.mark.parametrize("backend", _backends(), ids=lambda b: b.kind)
@pytest.mark.parametrize("intermediate", [32, 36])  # fused into the native GEMM, and not
def test_gate_up_means_silu_gate_times_up_for_every_method(backend, intermediate):
    torch.manual_seed(0)
    w, b = torch.randn(2 * intermediate, 24) * 0.3, torch.randn(2 * intermediate)
    mlp = GatedMLP(24, intermediate, bias=True)
    layer = mlp.gate_up_proj
    assert layer.epilogue is SILU_MUL and layer.shards == {0: (0, intermediate), 1: (intermediate, intermediate)}
    layer.set_method(float_method(backend), prefix="mlp.gate_up_proj")
    _fill(layer, w, b)
    x = torch.randn(5, 24)
    gate, up = F.linear(x, w, b).chunk(2, dim=-1)
    torch.testing.assert_close(layer(x), F.silu(gate) * up, atol=1e-5, rtol=1e-5)


def test_set_method_replaces_the_parameters_and_methods_declare_their_tensors():
    layer = Linear(16, 8, bias=True)
    assert isinstance(layer.method, TorchLinearMethod)
    assert layer.method.tensor_names(layer) == ({"weight", "bias"}, set())
    layer.set_method(OneDnnLinearMethod(), prefix="x.o_proj")
    assert layer.prefix == "x.o_proj" and set(dict(layer.named_parameters())) == {"weight", "bias"}
    backend = LinearBackend("torch")
    method = OnTheFlyConfig("int8").method_for("model.layers.0.self_attn.o_proj", layer, backend)
    layer.set_method(method)
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    _fill(layer, w, torch.zeros(8))
    assert layer.weight is None  # the float weight is gone once quantized
    deq = layer.method.dequantized_weight(layer)
    assert (deq - w).abs().max() <= w.abs().amax(dim=1).max() / 254 + 1e-6
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), F.linear(x, deq), atol=1e-5, rtol=1e-5)
    assert OnTheFlyConfig("int8").method_for("lm_head", Linear(16, 8, False), backend) is None  # LM head stays float


def test_cli_flags_reach_the_config_tree():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["m", "--quantization", "int4", "--quantization-group-size", "64",
                              "--kv-cache-dtype", "fp8_e4m3"])
    cfg = engine_config_from_args(args)
    assert (cfg.model.quantization, cfg.model.quantization_group_size) == ("int4", 64)
    assert cfg.cache.kv_cache_dtype == "fp8_e4m3"
    assert EngineConfig.from_kwargs("m", quantization="compressed_tensors").model.quantization == "compressed-tensors"
    with pytest.raises(ConfigError, match="quantization must be one of"):
        EngineConfig.from_kwargs("m", quantization="bitsandbytes")
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        EngineConfig.from_kwargs("m", kv_cache_dtype="fp16")
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--kv-cache-dtype", "fp4"])
