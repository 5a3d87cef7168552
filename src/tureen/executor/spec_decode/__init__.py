"""Speculative decoding, the executor's side: the rejection sampler and the draft-model proposer."""
