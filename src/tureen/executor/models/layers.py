"""Layers shared by every decoder-only family: they exist once, the model files only wire them.

Every layer works on the flattened token layout of one engine step: ``(T, hidden)`` with no batch
dimension, where ``T`` is the number of tokens scheduled this step across all requests.

Parameters are created with ``torch.empty`` (no random init): the loader fills every one of them,
and the model is built under the target device/dtype so a 7B checkpoint is not initialised twice.
Norm and embedding parameters carry a ``weight_loader(param, loaded, shard_id)`` used by the
checkpoint loader; linear layers' parameters belong to their ``LinearMethod`` (``quantization/``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tureen.errors import ModelLoadError, UnsupportedArchitectureError
from tureen.executor.attention import AttentionMetadata, KVCache, paged_attention
from tureen.executor.cpu_kernels import CpuOps
from tureen.executor.quantization.base import IDENTITY, SILU_MUL, Epilogue, LinearMethod, LinearMethodFactory
from tureen.executor.quantization.unquantized import TorchLinearMethod

# Hugging Face checkpoint name fragment -> (fused parameter fragment, shard id).
# q/k/v projections live in one ``qkv_proj``; gate/up in one ``gate_up_proj``.
PACKED_MODULES_MAPPING: dict[str, tuple[str, str | int]] = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def checkpoint_module_names(name: str, mapping: dict[str, tuple[str, str | int]] = PACKED_MODULES_MAPPING
                            ) -> list[str]:
    """A model module name -> the checkpoint module names that fill it, one per fused shard:
    ``model.layers.0.self_attn.qkv_proj`` -> ``[...q_proj, ...k_proj, ...v_proj]``."""
    parent, _, last = name.rpartition(".")
    fragments = [f for f, (target, _) in mapping.items() if target == last]
    return [f"{parent}.{f}" if parent else f for f in fragments] or [name]


def default_weight_loader(param: Tensor, loaded: Tensor, shard_id: Any = None) -> None:
    if param.shape != loaded.shape:
        raise ModelLoadError(
            f"shape mismatch: checkpoint has {tuple(loaded.shape)}, model expects {tuple(param.shape)}")
    param.data.copy_(loaded)


def _empty_param(*shape: int, loader: Callable = default_weight_loader) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


# ----------------------------------------------------------------------------------------------
# Config arguments


@dataclass
class DecoderArgs:
    """Config keys every Llama-like family shares; unknown keys of ``config.json`` are dropped."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    # RoPE: real hub checkpoints use top-level rope_theta/rope_scaling; configs written by
    # transformers 5 put everything (rope_theta and rope_type included) in rope_parameters.
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "DecoderArgs":
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in config.items() if k in names})
        except TypeError as e:  # a required key is missing
            raise ModelLoadError(f"config.json is missing a required key: {e}") from e

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                                 f"num_key_value_heads ({self.num_key_value_heads})")
        if self.hidden_act not in ("silu", "swish"):
            raise UnsupportedArchitectureError(f"hidden_act {self.hidden_act!r} is not supported (only silu)")

    def rope(self) -> "RopeConfig":
        params = dict(self.rope_parameters or self.rope_scaling or {})
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        theta = float(params.pop("rope_theta", self.rope_theta))
        params.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        return RopeConfig(head_dim=self.head_dim, theta=theta, rope_type=rope_type, params=params)

    def window_for_layer(self, layer_idx: int) -> int | None:
        """The sliding window of one layer (``layer_types`` says which layers slide, when present)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer_idx] != "sliding_attention":
            return None
        return self.sliding_window


# ----------------------------------------------------------------------------------------------
# Norm, rotary embedding


class RMSNorm(nn.Module):
    cpu_ops: CpuOps | None = None  # set by CausalLM.use_cpu_ops

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _empty_param(size)

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32, scale in the activation dtype (what the reference models do).
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)

    def add_and_norm(self, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        """The residual stream: ``residual += x`` (``residual = x`` when None), then the norm of it.

        Returns (normalised, residual). On the native ops this is one pass over the rows.
        """
        if self.cpu_ops is not None:
            if residual is None:  # x becomes the residual stream: normalise into a new tensor
                return self.cpu_ops.rms_norm(x, self.weight, self.eps), x
            # x (a layer's output) is dead once added: normalise into it, no allocation per layer
            return self.cpu_ops.rms_norm(x, self.weight, self.eps, residual, out=x), residual
        residual = x if residual is None else residual.add_(x)
        return self(residual), residual


@dataclass
class RopeConfig:
    head_dim: int
    theta: float
    rope_type: str = "default"
    params: dict[str, Any] = field(default_factory=dict)


def _llama3_inv_freq(inv_freq: Tensor, p: dict[str, Any]) -> Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(dim: int, theta: float, p: dict[str, Any]) -> tuple[Tensor, float]:
    factor, old_len = p["factor"], p["original_max_position_embeddings"]
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rope_inv_freq(cfg: RopeConfig) -> tuple[Tensor, float]:
    """Inverse frequencies (head_dim/2,) in float32 and the cos/sin scale, per scaling variant."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    try:
        if cfg.rope_type == "default":
            return inv_freq, 1.0
        if cfg.rope_type == "linear":
            return inv_freq / cfg.params["factor"], 1.0
        if cfg.rope_type == "llama3":
            return _llama3_inv_freq(inv_freq, cfg.params), 1.0
        if cfg.rope_type == "yarn":
            return _yarn_inv_freq(dim, cfg.theta, cfg.params)
    except KeyError as e:
        raise ModelLoadError(f"rope scaling {cfg.rope_type!r} is missing parameter {e}") from e
    raise UnsupportedArchitectureError(
        f"rope scaling type {cfg.rope_type!r} is not supported (supported: default, linear, llama3, yarn)")


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE. ``cos_sin`` is computed once per step; every layer reuses it."""

    def __init__(self, cfg: RopeConfig) -> None:
        super().__init__()
        inv_freq, self.scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # float32 on the build device

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, D): broadcast over heads
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (T, heads, D); cos/sin: (T, 1, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ----------------------------------------------------------------------------------------------
# Linear layers with fused shards


class LinearLayer(nn.Module):
    """A linear layer that only knows its shape; its ``LinearMethod`` owns the weights and the product.

    ``shards``: the Hugging Face projections stacked along the output dim, in order (one shard,
    id None, for a plain layer). ``epilogue`` is part of the layer's meaning (``SILU_MUL`` for a
    [gate; up] projection). The method starts as ``F.linear`` on a float weight; the loader swaps in
    the engine's method per layer (``set_method``) before filling it.
    """

    def __init__(self, in_features: int, shard_sizes: dict[Any, int], bias: bool,
                 epilogue: Epilogue = IDENTITY) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = sum(shard_sizes.values())
        self.has_bias = bias
        self.epilogue = epilogue
        self.prefix = ""
        self.shards: dict[Any, tuple[int, int]] = {}
        offset = 0
        for shard_id, size in shard_sizes.items():
            self.shards[shard_id] = (offset, size)
            offset += size
        self.method: LinearMethod = TorchLinearMethod()
        self.method.create_weights(self)

    def set_method(self, method: LinearMethod, prefix: str = "") -> None:
        """Replace the method (and its parameters) before loading."""
        for name, _ in list(self.named_parameters(recurse=False)):
            delattr(self, name)
        self.prefix = prefix or self.prefix
        self.method = method
        method.create_weights(self)

    def load_tensor(self, shard_id: Any, tensor_name: str, tensor: Tensor) -> None:
        self.method.load(self, shard_id, tensor_name, tensor)

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.method.apply(self, x, getattr(self, "bias", None))


class Linear(LinearLayer):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, {None: out_features}, bias)


class ShardedLinear(LinearLayer):
    """Several Hugging Face projections stacked along the output dim (``shard_sizes`` in order)."""


class QKVLinear(ShardedLinear):
    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool) -> None:
        sizes = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim}
        super().__init__(hidden, sizes, bias)
        self.q_size, self.kv_size = sizes["q"], sizes["k"]


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): gate and up are one projection whose epilogue is the activation."""

    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = ShardedLinear(hidden, {0: intermediate, 1: intermediate}, bias, epilogue=SILU_MUL)
        self.down_proj = Linear(intermediate, hidden, bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.gate_up_proj(x))  # (T, hidden) -> (T, I) -> (T, hidden)


# ----------------------------------------------------------------------------------------------
# Attention


@dataclass
class AttentionSpec:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm_eps: float | None = None  # per-head RMSNorm on q and k before RoPE (Qwen3)
    sliding_window: int | None = None


class Attention(nn.Module):
    cpu_ops: CpuOps | None = None  # set by CausalLM.use_cpu_ops

    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__()
        self.spec = spec
        self.qkv_proj = QKVLinear(spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.qkv_bias)
        self.o_proj = Linear(spec.num_heads * spec.head_dim, spec.hidden_size, spec.o_bias)
        if spec.qk_norm_eps is not None:
            self.q_norm = RMSNorm(spec.head_dim, spec.qk_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.qk_norm_eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], meta: AttentionMetadata, kv_cache: KVCache) -> Tensor:
        s = self.spec
        qkv = self.qkv_proj(x)  # (T, q_size + 2 * kv_size)
        q, k, v = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        q = q.view(-1, s.num_heads, s.head_dim)  # (T, H, D)
        k = k.view(-1, s.num_kv_heads, s.head_dim)  # (T, Hkv, D)
        v = v.view(-1, s.num_kv_heads, s.head_dim)  # (T, Hkv, D)
        if s.qk_norm_eps is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.cpu_ops is None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        elif s.qk_norm_eps is None:  # q and k heads are adjacent in each qkv row: one in-place pass
            self.cpu_ops.rope_(qkv[:, :self.qkv_proj.q_size + self.qkv_proj.kv_size].view(
                -1, s.num_heads + s.num_kv_heads, s.head_dim), *rope)
        else:
            self.cpu_ops.rope_(q, *rope)
            self.cpu_ops.rope_(k, *rope)
        out = paged_attention(q, k, v, kv_cache, meta, s.sliding_window)  # (T, H, D)
        return self.o_proj(out.view(-1, s.num_heads * s.head_dim))  # (T, H*D) -> (T, hidden)


# ----------------------------------------------------------------------------------------------
# Decoder stack


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.weight = _empty_param(vocab_size, hidden)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)


class LMHead(Linear):
    """Projects hidden states to float32 logits; may share its weight with the embedding."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__(hidden, vocab_size, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return super().forward(h).float()


class DecoderLayer(nn.Module):
    def __init__(self, spec: AttentionSpec, intermediate_size: int, eps: float, mlp_bias: bool = False) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, eps)
        self.mlp = GatedMLP(spec.hidden_size, intermediate_size, mlp_bias)

    def forward(self, x: Tensor, residual: Tensor | None, rope: tuple[Tensor, Tensor], meta: AttentionMetadata,
                kv_cache: KVCache) -> tuple[Tensor, Tensor]:
        """x: the previous layer's output (the embeddings for layer 0), not yet added to the residual
        stream; residual: the stream so far (None for layer 0). Returns this layer's (x, residual)."""
        x, residual = self.input_layernorm.add_and_norm(x, residual)
        x = self.self_attn(x, rope, meta, kv_cache)
        x, residual = self.post_attention_layernorm.add_and_norm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    """``model.*`` in Hugging Face names: embed_tokens, layers, norm (+ the rotary tables)."""

    def __init__(self, args: DecoderArgs, specs: list[AttentionSpec]) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, args.intermediate_size, args.rms_norm_eps, args.mlp_bias) for spec in specs)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(args.rope())

    def forward(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata,
                kv_caches: list[KVCache]) -> Tensor:
        h = self.embed_tokens(input_ids)  # (T, hidden)
        rope = self.rotary_emb.cos_sin(positions, h.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, rope, meta, kv_cache)
        return self.norm.add_and_norm(h, residual)[0]


class CausalLM(nn.Module):
    """A decoder stack plus LM head. Families subclass it and only build the attention specs."""

    packed_modules_mapping = PACKED_MODULES_MAPPING

    def __init__(self, args: DecoderArgs, specs: list[AttentionSpec]) -> None:
        super().__init__()
        self.args = args
        self.model = DecoderModel(args, specs)
        self.lm_head = LMHead(args.vocab_size, args.hidden_size)

    @property
    def num_kv_heads(self) -> int:
        return self.args.num_key_value_heads  # type: ignore[return-value]

    @property
    def head_dim(self) -> int:
        return self.args.head_dim  # type: ignore[return-value]

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    def use_cpu_ops(self, ops: CpuOps) -> None:
        """Run norms, RoPE and attention on the native CPU kernels (linear layers: see set_linear_methods)."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention)):
                module.cpu_ops = ops

    def linear_layers(self) -> Iterator[tuple[str, LinearLayer]]:
        return ((name, m) for name, m in self.named_modules() if isinstance(m, LinearLayer))

    def set_linear_methods(self, factory: LinearMethodFactory) -> None:
        """Give every linear layer (the LM head included) its method, before weights are loaded."""
        for name, layer in self.linear_layers():
            layer.set_method(factory(name, layer), prefix=name)

    def process_weights_after_loading(self) -> None:
        for _, layer in self.linear_layers():
            layer.process_weights_after_loading()

    def forward(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata,
                kv_caches: list[KVCache]) -> Tensor:
        """input_ids, positions: (T,) -> final hidden states (T, hidden)."""
        return self.model(input_ids, positions, meta, kv_caches)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """(N, hidden) -> float32 logits (N, vocab)."""
        return self.lm_head(hidden)
