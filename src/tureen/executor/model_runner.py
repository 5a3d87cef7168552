"""The model runner: one ``SchedulerOutput`` in, one forward pass + sampling, one ``ModelRunnerOutput`` out.

Per step it flattens the scheduled chunks into one token row layout (single-token requests first,
sorted by context length, then the longer chunks), builds the attention metadata once, runs the
model, projects only the last token of each sampling request through the LM head, and hands those
logits to the Sampler. It owns the KV cache tensors (one per layer, see ``attention.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from torch import Tensor

from tureen.config import EngineConfig
from tureen.engine.messages import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from tureen.errors import ConfigError, InvalidRequestError
from tureen.executor.attention import AttentionMetadata, Workspace, build_attention_metadata
from tureen.executor.cpu_kernels import empty_with_huge_pages, load_cpu_ops, onednn_linear_available
from tureen.executor.loader import load_hf_config, load_model, resolve_dtype
from tureen.executor.sampler import Sampler, SamplingMetadata

logger = logging.getLogger("tureen.executor")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} was requested but CUDA is not available")
    return torch.device(name)


@dataclass
class StepBatch:
    input_ids: Tensor  # (T,) int64
    meta: AttentionMetadata
    sample_rows: Tensor  # (N,) int64: row of the last token of each sampling request, in request order
    sampling_reqs: list[ScheduledRequest]


class ModelRunner:
    def __init__(self, config: EngineConfig, checkpoint_dir: Path) -> None:
        self.config = config
        self.device = resolve_device(config.device.device)
        self.hf_config = load_hf_config(checkpoint_dir)
        self.dtype = resolve_dtype(config.model.dtype, self.hf_config, self.device)
        self.model = load_model(Path(checkpoint_dir), self.hf_config, self.device, self.dtype)
        args = self.model.args
        self.vocab_size: int = args.vocab_size
        self.max_position_embeddings: int = args.max_position_embeddings
        self.num_layers: int = args.num_hidden_layers
        self.num_kv_heads: int = args.num_key_value_heads
        self.head_dim: int = args.head_dim
        self.kv_bytes_per_token: int = 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize
        self.block_size = config.cache.block_size
        self.kv_caches: list[Tensor] = []
        self.workspace = Workspace()
        self.sampler = Sampler()
        mode = config.device.cpu_kernels
        self.cpu_ops = load_cpu_ops(mode, self.device, self.dtype, self.head_dim)
        if self.cpu_ops is not None:
            self.model.use_cpu_ops(self.cpu_ops)
        # Linear layers: the native GEMM when the kernels loaded, else oneDNN, else F.linear.
        self.linear_backend = ("native" if self.cpu_ops is not None else
                               "onednn" if onednn_linear_available(mode, self.device, self.dtype) else "torch")
        if self.linear_backend != "torch":
            self.model.pack_linear_weights_for_cpu(self.cpu_ops)
        logger.info("loaded %s (%s) on %s in %s; attention and norms: %s; linear layers: %s", checkpoint_dir,
                    type(self.model).__name__, self.device, str(self.dtype).removeprefix("torch."),
                    "native CPU kernels" if self.cpu_ops else "torch ops",
                    {"native": "native GEMM, pre-packed weights", "onednn": "oneDNN, pre-packed weights",
                     "torch": "torch F.linear"}[self.linear_backend])

    # ---- KV cache ---------------------------------------------------------------------------
    def determine_num_blocks(self) -> int:
        """How many KV blocks fit the budget: an explicit override, a byte budget on CPU, or what a
        profiled forward pass leaves free of ``gpu_memory_utilization`` on CUDA."""
        cache = self.config.cache
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        block_bytes = self.block_size * self.kv_bytes_per_token
        if self.device.type == "cuda":
            budget = self._profile_free_cuda_bytes()
            where = f"gpu_memory_utilization={cache.gpu_memory_utilization} after weights and activations"
        else:
            budget = cache.kv_cache_memory
            where = f"kv_cache_memory={cache.kv_cache_memory} bytes"
        num_blocks = int(budget // block_bytes)
        if num_blocks < 1:
            raise ConfigError(f"no KV cache block fits {where}; one block needs {block_bytes} bytes")
        return num_blocks

    def allocate_kv_cache(self, num_blocks: int) -> None:
        # Zeros, not empty: padded gathers read unwritten slots, and masked garbage that happens to
        # be NaN would still poison the softmax-weighted sum (0 * NaN = NaN).
        shape = (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        if self.device.type == "cpu":
            self.kv_caches = [empty_with_huge_pages(shape, self.dtype).zero_() for _ in range(self.num_layers)]
        else:
            self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]

    @torch.inference_mode()
    def _profile_free_cuda_bytes(self) -> int:
        """Run the largest step the scheduler may send; return the bytes left for the KV cache."""
        sched = self.config.scheduler
        tokens = sched.max_num_batched_tokens
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        saved, self.kv_caches = self.kv_caches, []
        self.allocate_kv_cache(-(-tokens // self.block_size))
        meta = build_attention_metadata([tokens], [0], [list(range(len(self.kv_caches[0][0])))],
                                        self.block_size, self.device, self.workspace)
        hidden = self.model(torch.zeros(tokens, dtype=torch.long, device=self.device), meta.positions, meta,
                            self.kv_caches)
        rows = min(sched.max_num_seqs, tokens)
        self.model.compute_logits(hidden[:rows]).softmax(dim=-1).argmax(dim=-1)
        torch.cuda.synchronize(self.device)
        self.kv_caches = saved
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        other = (total - free) - torch.cuda.memory_reserved(self.device)  # other processes, CUDA context
        torch.cuda.empty_cache()
        return int(total * self.config.cache.gpu_memory_utilization - peak - max(other, 0))

    # ---- one step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        if not self.kv_caches:
            raise RuntimeError("allocate_kv_cache() must run before execute()")
        if not sched.requests:
            return ModelRunnerOutput()
        batch = self._prepare(sched.requests)
        hidden = self.model(batch.input_ids, batch.meta.positions, batch.meta, self.kv_caches)  # (T, hidden)
        if not batch.sampling_reqs:
            return ModelRunnerOutput()
        logits = self.model.compute_logits(hidden[batch.sample_rows])  # (N, vocab) float32
        meta = SamplingMetadata.from_requests(batch.sampling_reqs, self.vocab_size, self.device)
        tokens, logprobs = self.sampler(logits, meta)
        return ModelRunnerOutput(req_ids=[r.req_id for r in batch.sampling_reqs], sampled_token_ids=tokens,
                                 logprobs=logprobs)

    def _prepare(self, reqs: list[ScheduledRequest]) -> StepBatch:
        order = step_order(reqs)
        ordered = [reqs[i] for i in order]
        input_ids = list(chain.from_iterable(r.token_ids for r in ordered))
        self._check_token_ids(input_ids, ordered)
        meta = build_attention_metadata([r.num_tokens for r in ordered], [r.start_pos for r in ordered],
                                        [r.block_ids for r in ordered], self.block_size, self.device,
                                        self.workspace, self.cpu_ops)
        last_row, row = [0] * len(reqs), 0
        for i in order:
            row += reqs[i].num_tokens
            last_row[i] = row - 1
        sampling = [i for i, r in enumerate(reqs) if r.sample]
        return StepBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long).to(self.device),
            meta=meta,
            sample_rows=torch.tensor([last_row[i] for i in sampling], dtype=torch.long).to(self.device),
            sampling_reqs=[reqs[i] for i in sampling],
        )

    def _check_token_ids(self, input_ids: list[int], reqs: list[ScheduledRequest]) -> None:
        if not input_ids:
            raise ValueError("a scheduled request has no tokens")
        if min(input_ids) < 0 or max(input_ids) >= self.vocab_size:
            bad = next(r for r in reqs if any(not 0 <= t < self.vocab_size for t in r.token_ids))
            raise InvalidRequestError(
                f"request {bad.req_id} has a token id outside the model's vocabulary [0, {self.vocab_size})",
                param="prompt")


def step_order(reqs: list[ScheduledRequest]) -> list[int]:
    """Row order of a step: single-token requests by context length, then the longer chunks."""
    singles = sorted((i for i, r in enumerate(reqs) if r.num_tokens == 1), key=lambda i: reqs[i].start_pos)
    return singles + [i for i, r in enumerate(reqs) if r.num_tokens != 1]
