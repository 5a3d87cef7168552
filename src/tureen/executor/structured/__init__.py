"""Structured outputs: grammar constraints compiled per request and enforced in the sampler as a
per-step packed token bitmask (``engine.messages.TokenBitmask``)."""

from tureen.executor.structured.manager import StructuredOutputManager

__all__ = ["StructuredOutputManager"]
