"""Speculative decoding, the engine's side (pure Python): proposers that draft tokens, and counters.

A proposer drafts up to ``num_speculative_tokens`` tokens per running request after each step;
the scheduler sends them as extra known-but-unverified tokens, the model runner verifies them in
the same forward pass as everything else, and the rejection sampler (``executor/spec_decode``)
keeps the output distribution exactly the target's.
"""
