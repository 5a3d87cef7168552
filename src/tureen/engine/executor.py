"""The executor seam: what ``LLMEngine`` needs from whatever runs the model.

One ``SchedulerOutput`` in, one ``ModelRunnerOutput`` out, per step. The in-process
``ModelRunner`` (``tureen.executor.model_runner``) is the implementation today; tests use
``tests/fake_runner.py``; a draft runner or tensor-parallel workers would be others.
"""

from __future__ import annotations

from typing import Protocol

from tureen.engine.messages import ModelRunnerOutput, SchedulerOutput


class Executor(Protocol):
    vocab_size: int  # rows of the model's embedding table
    max_position_embeddings: int
    kv_bytes_per_token: int

    def determine_num_blocks(self) -> int:
        """How many KV blocks fit the configured budget."""

    def kv_cache_description(self) -> str:
        """The KV cache's storage, for the start-up log line (e.g. ``float32``, or fp8 with its scales)."""

    def allocate_kv_cache(self, num_blocks: int) -> None:
        ...

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step. An exception fails only the step's requests (``LLMEngine._fail_step``)."""
