"""Llama 2 / Llama 3 / Llama 3.1 (``llama3`` rope scaling), with GQA and MQA."""

from __future__ import annotations

from dataclasses import dataclass

from tureen.executor.models.layers import AttentionSpec, CausalLM, DecoderArgs


@dataclass
class ModelArgs(DecoderArgs):
    pass


class LlamaForCausalLM(CausalLM):
    def __init__(self, args: ModelArgs) -> None:
        specs = [
            AttentionSpec(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                          qkv_bias=args.attention_bias, o_bias=args.attention_bias,
                          sliding_window=args.window_for_layer(i))
            for i in range(args.num_hidden_layers)
        ]
        super().__init__(args, specs)


Model = LlamaForCausalLM
