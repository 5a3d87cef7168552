"""Qwen2 / Qwen2.5: bias on q/k/v (not on o), often tied embeddings, optional sliding window."""

from __future__ import annotations

from dataclasses import dataclass

from tureen.executor.models.layers import AttentionSpec, CausalLM, DecoderArgs


@dataclass
class ModelArgs(DecoderArgs):
    use_sliding_window: bool = False
    max_window_layers: int = 28

    def window_for_layer(self, layer_idx: int) -> int | None:
        # Hub configs carry sliding_window even when it is off; only use_sliding_window turns it on.
        if not self.use_sliding_window or self.sliding_window is None:
            return None
        if self.layer_types is not None:
            return super().window_for_layer(layer_idx)
        return self.sliding_window if layer_idx >= self.max_window_layers else None


class Qwen2ForCausalLM(CausalLM):
    def __init__(self, args: ModelArgs) -> None:
        specs = [
            AttentionSpec(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                          qkv_bias=True, sliding_window=args.window_for_layer(i))
            for i in range(args.num_hidden_layers)
        ]
        super().__init__(args, specs)


Model = Qwen2ForCausalLM
