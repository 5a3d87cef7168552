"""Qwen3: per-head RMSNorm on q and k before RoPE, explicit head_dim, no q/k/v bias by default."""

from __future__ import annotations

from dataclasses import dataclass

from tureen.executor.models.layers import AttentionSpec, CausalLM
from tureen.executor.models.qwen2 import ModelArgs as Qwen2Args


@dataclass
class ModelArgs(Qwen2Args):
    pass


class Qwen3ForCausalLM(CausalLM):
    def __init__(self, args: ModelArgs) -> None:
        specs = [
            AttentionSpec(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                          qkv_bias=args.attention_bias, o_bias=args.attention_bias,
                          qk_norm_eps=args.rms_norm_eps, sliding_window=args.window_for_layer(i))
            for i in range(args.num_hidden_layers)
        ]
        super().__init__(args, specs)


Model = Qwen3ForCausalLM
