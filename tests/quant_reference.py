"""Reference quantizers and packers that write checkpoints exactly as the real tools do (test-only).

Each ``write_*`` function takes a float checkpoint directory (``checkpoints.build_checkpoint``),
quantizes every decoder linear layer (the LM head and embeddings stay float), saves the result
in the tool's on-disk format with its ``quantization_config``, and returns the reference
dequantized (out, in) float32 weight of every quantized layer, computed here independently of
tureen. ``write_dequantized`` then saves a float32 checkpoint holding those weights, on which
transformers is the reference for greedy outputs.

Formats (layouts as in AutoGPTQ/GPTQModel, AutoAWQ and compressed-tensors):
- GPTQ: qweight int32 (K/pack, N) packed along K; qzeros int32 (G, N/pack) storing zero - 1;
  scales fp16 (G, N); g_idx int32 (K,). Act-order: columns quantized in a permuted order.
- AWQ GEMM: qweight/qzeros int32 (.., N/8) packed along N in the order [0, 2, 4, 6, 1, 3, 5, 7].
- compressed-tensors: packed with compressed_tensors' own ``pack_to_int32``.
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _input_seed(name: str) -> int:
    """Layers that read the same input (q/k/v, gate/up) get the same act-order permutation, as GPTQ
    gives them: the order comes from the Hessian of that shared input."""
    key = name.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
    return zlib.crc32(key.encode())


def _linear_names(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted(n[:-len(".weight")] for n in state if n.endswith(".weight") and n.split(".")[-2] in LINEAR)


def _copy_dir(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)


def _save(src: Path, dst: Path, state: dict[str, torch.Tensor], quantization_config: dict | None,
          config_file: str = "config.json") -> None:
    _copy_dir(src, dst)
    save_file({k: v.contiguous() for k, v in state.items()}, dst / "model.safetensors")
    if quantization_config is not None:
        if config_file == "config.json":
            cfg = json.loads((dst / "config.json").read_text())
            cfg["quantization_config"] = quantization_config
            (dst / "config.json").write_text(json.dumps(cfg, indent=2))
        else:
            (dst / config_file).write_text(json.dumps(quantization_config, indent=2))


def write_dequantized(src: Path, dst: Path, weights: dict[str, torch.Tensor]) -> Path:
    """A float32 checkpoint: ``src`` with each layer's weight replaced by its dequantized one."""
    state = load_file(src / "model.safetensors")
    for name, w in weights.items():
        state[f"{name}.weight"] = w
    _save(src, dst, state, None)
    return dst


# ---- GPTQ (AutoGPTQ's quantizer grid and pack) --------------------------------------------------


def _minmax_grid(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoGPTQ ``Quantizer.find_params`` per row of x (rows, cols): (scale, zero) of shape (rows,)."""
    maxq = 2 ** bits - 1
    xmin, xmax = x.min(1).values.clamp(max=0), x.max(1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(both_zero, -1.0, xmin), torch.where(both_zero, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def gptq_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, act_order: bool, seed: int = 0):
    """-> intweight (K, N), scales (G, N) fp16, zeros (G, N) int, g_idx (K,) int32; RTN on GPTQ's grid."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed)) if act_order else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // gs).to(torch.int32)
    groups = -(-k // gs)
    scales, zeros = torch.empty(groups, n, dtype=torch.float16), torch.empty(groups, n, dtype=torch.int32)
    intweight = torch.empty(k, n, dtype=torch.int32)
    for g in range(groups):
        cols = perm[g * gs:(g + 1) * gs]
        scale, zero = _minmax_grid(w[:, cols], bits, sym)
        scale16 = scale.half()  # the checkpoint's scale; quantize on it so dequantization is consistent
        scales[g], zeros[g] = scale16, zero.to(torch.int32)
        q = torch.round(w[:, cols] / scale16.float()[:, None]) + zero[:, None]
        intweight[cols] = q.clamp(0, 2 ** bits - 1).to(torch.int32).t()
    return intweight, scales, zeros, g_idx


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding 32-bit patterns -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_pack(intweight: torch.Tensor, zeros: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoGPTQ's ``QuantLinear.pack``: qweight (K/pack, N) and qzeros (G, N/pack) storing zero - 1."""
    pack, mask = 32 // bits, 2 ** bits - 1
    iw = intweight.to(torch.int64).view(-1, pack, intweight.shape[1])  # (K/pack, pack, N)
    qweight = sum(iw[:, j] << (bits * j) for j in range(pack))
    z = ((zeros.to(torch.int64) - 1) & mask).view(zeros.shape[0], -1, pack)  # (G, N/pack, pack)
    qzeros = sum(z[:, :, j] << (bits * j) for j in range(pack))
    return _to_int32(qweight), _to_int32(qzeros)


def gptq_dequantize(intweight, scales, zeros, g_idx) -> torch.Tensor:
    """GPTQ's ``scales[g_idx] * (weight - zeros[g_idx])`` in float32 -> (N, K)."""
    g = g_idx.long()
    return (scales.float()[g] * (intweight.float() - zeros.float()[g])).t().contiguous()


def write_gptq(src: Path, dst: Path, bits: int = 4, group_size: int = 32, sym: bool = True,
               act_order: bool = False, save_g_idx: bool = True, config_file: str = "config.json",
               dynamic: dict | None = None, lm_head: bool = False):
    """``dynamic``: GPTQModel's per-module rules ({"-:regex": {}} keeps float, {"+:regex": {"bits": 8}});
    ``lm_head``: quantize the LM head too (GPTQModel's ``lm_head: true``)."""
    state = load_file(src / "model.safetensors")
    ref = {}
    for name in _linear_names(state) + (["lm_head"] if lm_head else []):
        key = next((k for k in dynamic or {} if re.match(k[2:], name)), None)  # keys are "-:re" or "+:re"
        if key is not None and key.startswith("-:"):
            continue  # left float
        layer_bits = dynamic[key].get("bits", bits) if key is not None else bits
        w = state.pop(f"{name}.weight").float()
        intweight, scales, zeros, g_idx = gptq_quantize(w, layer_bits, group_size, sym, act_order, _input_seed(name))
        qweight, qzeros = gptq_pack(intweight, zeros, layer_bits)
        state.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros, f"{name}.scales": scales})
        if save_g_idx or act_order:
            state[f"{name}.g_idx"] = g_idx
        ref[name] = gptq_dequantize(intweight, scales, zeros, g_idx)
    qc = {"bits": bits, "group_size": group_size, "damp_percent": 0.01, "desc_act": act_order, "sym": sym,
          "true_sequential": True, "quant_method": "gptq", "checkpoint_format": "gptq", "lm_head": lm_head}
    if dynamic:
        qc["dynamic"] = dynamic
    if config_file != "config.json":
        qc.pop("quant_method")  # AutoGPTQ's quantize_config.json has none
    _save(src, dst, state, qc, config_file)
    return ref


# ---- AWQ GEMM (AutoAWQ's quantizer and WQLinear_GEMM packing) -----------------------------------


def awq_quantize(w: torch.Tensor, group_size: int):
    """-> intweight (K, N), scales (G, N) fp16, zeros (G, N): AutoAWQ's asymmetric min/max per group."""
    n, k = w.shape
    g = w.view(n, k // group_size, group_size)
    mx, mn = g.amax(dim=2), g.amin(dim=2)
    scales = ((mx - mn).clamp(min=1e-5) / 15).half()
    zeros = (-torch.round(mn / scales.float())).clamp(0, 15)
    q = (torch.round(g / scales.float()[..., None]) + zeros[..., None]).clamp(0, 15)
    return q.view(n, k).t().to(torch.int32), scales.t().contiguous(), zeros.t().to(torch.int32).contiguous()


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """(R, N) ints in 0..15 -> (R, N/8) int32: word col holds columns col*8 + AWQ_ORDER[i] at nibble i."""
    v = values.to(torch.int64)
    out = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int64)
    for col in range(v.shape[1] // 8):
        for i in range(8):
            out[:, col] |= v[:, col * 8 + AWQ_ORDER[i]] << (4 * i)
    return _to_int32(out)


def write_awq(src: Path, dst: Path, group_size: int = 32, config_file: str = "config.json"):
    state = load_file(src / "model.safetensors")
    ref = {}
    for name in _linear_names(state):
        w = state.pop(f"{name}.weight").float()
        intweight, scales, zeros = awq_quantize(w, group_size)
        state.update({f"{name}.qweight": awq_pack(intweight), f"{name}.qzeros": awq_pack(zeros),
                      f"{name}.scales": scales})
        gidx = torch.arange(w.shape[1]) // group_size
        ref[name] = ((intweight.float() - zeros.float()[gidx]) * scales.float()[gidx]).t().contiguous()
    qc = {"quant_method": "awq", "zero_point": True, "q_group_size": group_size, "w_bit": 4, "version": "gemm",
          "modules_to_not_convert": None}
    if config_file != "config.json":
        qc = {"zero_point": True, "q_group_size": group_size, "w_bit": 4, "version": "GEMM"}
    _save(src, dst, state, qc, config_file)
    return ref


# ---- compressed-tensors -----------------------------------------------------------------------


def _ct_int_grid(w: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """compressed-tensors' min/max observer per group (channel: group = K): signed q, scale, zero point."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    g = w.view(n, k // gs, gs)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    mn, mx = g.amin(dim=2).clamp(max=0), g.amax(dim=2).clamp(min=0)
    if symmetric:
        scale = torch.maximum(mn.abs(), mx) / ((qmax - qmin) / 2)
        zp = torch.zeros_like(scale)
    else:
        scale = (mx - mn) / (qmax - qmin)
        zp = torch.round(qmin - mn / scale).clamp(qmin, qmax)
    q = (torch.round(g / scale[..., None]) + zp[..., None]).clamp(qmin, qmax)
    return q.view(n, k).to(torch.int8), scale, zp.to(torch.int8)


def ct_dequantize(q, scale, zp, group_size: int) -> torch.Tensor:
    gs = q.shape[1] if group_size == -1 else group_size
    idx = torch.arange(q.shape[1]) // gs
    return (q.float() - zp.float()[:, idx]) * scale.float()[:, idx]


def write_ct_packed(src: Path, dst: Path, strategy: str = "group", group_size: int = 32, symmetric: bool = True,
                    actorder: bool = False, bits: int = 4):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    state = load_file(src / "model.safetensors")
    ref = {}
    gs = -1 if strategy == "channel" else group_size
    for name in _linear_names(state):
        w = state.pop(f"{name}.weight").float()
        seed = torch.Generator().manual_seed(_input_seed(name))
        perm = torch.randperm(w.shape[1], generator=seed) if actorder else None
        wq = w if perm is None else w[:, perm]  # quantize the columns in act order
        q, scale, zp = _ct_int_grid(wq, bits, gs, symmetric)
        deq = ct_dequantize(q, scale, zp, gs)
        if perm is not None:  # back to the original column order; g_idx says each column's group
            q_orig, deq_orig = torch.empty_like(q), torch.empty_like(deq)
            q_orig[:, perm], deq_orig[:, perm] = q, deq
            g_idx = torch.empty(w.shape[1], dtype=torch.int32)
            g_idx[perm] = (torch.arange(w.shape[1]) // group_size).to(torch.int32)
            q, deq = q_orig, deq_orig
            state[f"{name}.weight_g_idx"] = g_idx
        state.update({f"{name}.weight_packed": pack_to_int32(q, bits), f"{name}.weight_scale": scale,
                      f"{name}.weight_shape": torch.tensor(list(w.shape))})
        if not symmetric:
            state[f"{name}.weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0)
        ref[name] = deq
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
               "group_size": None if strategy == "channel" else group_size,
               "actorder": "group" if actorder else None, "dynamic": False, "observer": "minmax"}
    _save(src, dst, state, _ct_config("pack-quantized", weights))
    return ref


def _ct_config(fmt: str, weights: dict, input_activations: dict | None = None) -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": input_activations, "output_activations": None,
                                          "format": fmt}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "version": "0.20.1"}


def write_ct_int8(src: Path, dst: Path):
    """compressed-tensors int-quantized W8A8 (per-channel weights, dynamic per-token activations)."""
    state = load_file(src / "model.safetensors")
    ref = {}
    for name in _linear_names(state):
        w = state.pop(f"{name}.weight").float()
        q, scale, zp = _ct_int_grid(w, 8, -1, True)
        state.update({f"{name}.weight": q, f"{name}.weight_scale": scale, f"{name}.weight_zero_point": zp})
        ref[name] = ct_dequantize(q, scale, zp, -1)
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
    acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    _save(src, dst, state, _ct_config("int-quantized", weights, acts))
    return ref


def write_ct_fp8(src: Path, dst: Path, strategy: str = "channel"):
    """compressed-tensors float-quantized FP8 (e4m3 weights, per-channel or per-tensor scales)."""
    state = load_file(src / "model.safetensors")
    ref = {}
    for name in _linear_names(state):
        w = state.pop(f"{name}.weight").float()
        amax = w.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w.abs().amax().reshape(1)
        scale = amax / 448.0
        w8 = (w / (scale if strategy == "channel" else scale[0])).to(torch.float8_e4m3fn)
        state.update({f"{name}.weight": w8, f"{name}.weight_scale": scale})
        ref[name] = w8.float() * (scale if strategy == "channel" else scale[0])
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False}
    _save(src, dst, state, _ct_config("float-quantized", weights))
    return ref


# ---- tureen's own on-the-fly grids, re-derived -----------------------------------------------


def int8_reference(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale == 0, 1.0, scale)
    return torch.round(w / scale[:, None]).clamp(-127, 127) * scale[:, None]


def fp8_reference(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=1) / 448.0
    scale = torch.where(scale == 0, 1.0, scale)
    return (w / scale[:, None]).to(torch.float8_e4m3fn).float() * scale[:, None]


def int4_reference(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    g = w.view(n, k // group_size, group_size)
    lo, hi = g.amin(dim=2).clamp(max=0), g.amax(dim=2).clamp(min=0)
    scale = (hi - lo) / 15
    scale = torch.where(scale == 0, 1.0, scale)
    zero = torch.round(-lo / scale)
    q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(0, 15)
    return ((q - zero[..., None]) * scale[..., None]).view(n, k)


def on_the_fly_reference(src: Path, method: str, group_size: int = 128) -> dict[str, torch.Tensor]:
    state = load_file(src / "model.safetensors")
    fn = {"int8": int8_reference, "fp8": fp8_reference, "fp8-as-int8": lambda w: int8_reference(fp8_reference(w)),
          "int4": lambda w: int4_reference(w, group_size)}[method]
    return {name: fn(state[f"{name}.weight"].float()) for name in _linear_names(state)}
