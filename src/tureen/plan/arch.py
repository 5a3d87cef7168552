"""Architecture numbers read from a Hugging Face ``config.json`` and the parameter count they imply.

The count is built from the shapes of each weight, the same shapes transformers creates for the
dense decoder families tureen serves (llama, mistral, qwen2, qwen3):

    embeddings   vocab x hidden
    attention    q: hidden x (heads * head_dim)        k, v: hidden x (kv_heads * head_dim)
                 o: (heads * head_dim) x hidden         (+ biases, + per-head q/k RMSNorm)
    MLP          gate, up: hidden x intermediate        down: intermediate x hidden
    norms        2 per layer + 1 final, each of size hidden
    LM head      vocab x hidden, unless tied to the embeddings
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tureen.errors import ModelLoadError, UnsupportedArchitectureError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclass(frozen=True)
class ModelArch:
    """The numbers of a dense decoder that decide its size, KV cache and FLOPs."""

    name: str
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    torch_dtype: str | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    @property
    def attention_width(self) -> int:
        """Width of the concatenated query heads (``heads * head_dim``)."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Width of the concatenated key (or value) heads (``kv_heads * head_dim``)."""
        return self.num_key_value_heads * self.head_dim


@dataclass(frozen=True)
class ParamCount:
    """Parameters by component; ``total`` is what ``sum(p.numel())`` gives in transformers."""

    embedding: int
    attention: int  # all layers, including biases and q/k norms
    mlp: int  # all layers, including biases
    norms: int  # per-layer norms plus the final norm
    lm_head: int  # 0 when tied to the embeddings
    linear_weights: int  # the matmul weights inside the layers: what weight quantization shrinks

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.norms + self.lm_head


def _family_flags(model_type: str, cfg: dict[str, Any]) -> dict[str, bool]:
    """Which optional biases and norms each family carries (mirrors the transformers modules)."""
    attention_bias = bool(cfg.get("attention_bias", False))
    if model_type == "qwen2":  # q/k/v always carry a bias, o_proj never does
        return {"qkv_bias": True, "o_bias": False, "mlp_bias": False, "qk_norm": False}
    if model_type == "qwen3":  # per-head RMSNorm on q and k; biases only when attention_bias
        return {"qkv_bias": attention_bias, "o_bias": attention_bias, "mlp_bias": False, "qk_norm": True}
    if model_type == "mistral":
        return {"qkv_bias": False, "o_bias": False, "mlp_bias": False, "qk_norm": False}
    return {"qkv_bias": attention_bias, "o_bias": attention_bias,  # llama and llama-like
            "mlp_bias": bool(cfg.get("mlp_bias", False)), "qk_norm": False}


def _check_config(cfg: dict[str, Any], name: str, allow_unknown: bool) -> str:
    missing = [k for k in _REQUIRED_KEYS if cfg.get(k) is None]
    if missing:
        raise ModelLoadError(f"config of {name!r} lacks {', '.join(missing)}; is it a decoder LLM config.json?")
    if any(cfg.get(k) for k in _MOE_KEYS):
        raise UnsupportedArchitectureError(
            f"{name!r} is a mixture-of-experts model; the planner counts dense decoders only")
    model_type = str(cfg.get("model_type", "llama"))
    if model_type not in SUPPORTED_MODEL_TYPES and not allow_unknown:
        raise UnsupportedArchitectureError(
            f"cannot count the parameters of model_type {model_type!r} (supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}); pass --params to give the count yourself")
    return model_type


def arch_from_config(cfg: dict[str, Any], name: str, *, allow_unknown: bool = False) -> ModelArch:
    """Read a ``config.json`` dict. ``allow_unknown`` accepts other dense decoders as llama-like
    (used when the caller overrides the parameter count, so only the KV numbers matter)."""
    if cfg.get("hidden_size") is None and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "torch_dtype": cfg.get("torch_dtype") or cfg.get("dtype")}
    model_type = _check_config(cfg, name, allow_unknown)
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return ModelArch(
        name=name,
        model_type=model_type,
        hidden_size=hidden,
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate_size=int(cfg.get("intermediate_size") or 4 * hidden),
        vocab_size=int(cfg["vocab_size"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        **_family_flags(model_type, cfg),
    )


def _attention_params_per_layer(a: ModelArch) -> tuple[int, int]:
    """(all attention parameters, of which linear weights) in one layer."""
    weights = a.hidden_size * a.attention_width + 2 * a.hidden_size * a.kv_width + a.attention_width * a.hidden_size
    biases = (a.attention_width + 2 * a.kv_width) * a.qkv_bias + a.hidden_size * a.o_bias
    qk_norms = 2 * a.head_dim * a.qk_norm
    return weights + biases + qk_norms, weights


def _mlp_params_per_layer(a: ModelArch) -> tuple[int, int]:
    """(all MLP parameters, of which linear weights) in one gated (SwiGLU) MLP."""
    weights = 3 * a.hidden_size * a.intermediate_size
    biases = (2 * a.intermediate_size + a.hidden_size) * a.mlp_bias
    return weights + biases, weights


def count_params(a: ModelArch) -> ParamCount:
    """Count parameters from the architecture numbers (see the module docstring for the shapes)."""
    attn, attn_weights = _attention_params_per_layer(a)
    mlp, mlp_weights = _mlp_params_per_layer(a)
    layers = a.num_hidden_layers
    embedding = a.vocab_size * a.hidden_size
    return ParamCount(
        embedding=embedding,
        attention=layers * attn,
        mlp=layers * mlp,
        norms=(2 * layers + 1) * a.hidden_size,
        lm_head=0 if a.tie_word_embeddings else embedding,
        linear_weights=layers * (attn_weights + mlp_weights),
    )
