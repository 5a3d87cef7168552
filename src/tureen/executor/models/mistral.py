"""Mistral: Llama wiring plus a sliding attention window on every layer."""

from __future__ import annotations

from dataclasses import dataclass

from tureen.executor.models.layers import AttentionSpec, CausalLM, DecoderArgs


@dataclass
class ModelArgs(DecoderArgs):
    pass


class MistralForCausalLM(CausalLM):
    def __init__(self, args: ModelArgs) -> None:
        specs = [
            AttentionSpec(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                          sliding_window=args.window_for_layer(i))
            for i in range(args.num_hidden_layers)
        ]
        super().__init__(args, specs)


Model = MistralForCausalLM
