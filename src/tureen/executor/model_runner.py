"""The model runner: one ``SchedulerOutput`` in, one forward pass + sampling, one ``ModelRunnerOutput`` out.

Per step it flattens the scheduled chunks into one token row layout (single-token requests first,
sorted by context length, then the longer chunks), builds the attention metadata once, runs the
model, projects only the positions each request samples at through the LM head (its last token, or
its last 1 + k when it carries k drafted tokens to verify), and hands those logits to the Sampler
(or, with drafts, to the rejection sampler). It owns the KV cache tensors (one per layer, see ``attention.py``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from torch import Tensor

from tureen.config import EngineConfig
from tureen.engine.messages import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from tureen.engine.step_timing import NULL_TIMER, NullTimer, StepTimer
from tureen.errors import ConfigError, InvalidRequestError
from tureen.executor.attention import (KV_CACHE_TORCH_DTYPES, KV_SCALE_BYTES, AttentionMetadata, KVCache,
                                      QuantizedKVCache, Workspace, build_attention_metadata)
from tureen.executor.cpu_kernels import empty_with_huge_pages, load_cpu_ops, onednn_linear_available
from tureen.executor.decode_stack import DECODE_RUNTIMES, NativeDecodeStack
from tureen.executor.loader import load_hf_config, load_model, model_args, resolve_dtype
from tureen.executor.quantization import LinearBackend
from tureen.executor.quantization.config import check_activation, resolve_quantization
from tureen.executor.quantization.factory import linear_kernels, linear_method_factory, model_weight_bytes
from tureen.executor.sampler import Sampler, SamplingMetadata, greedy_tokens, plain_greedy
from tureen.executor.spec_decode.rejection import verify_and_sample

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
    sample_rows: Tensor  # (N,) int64: the rows each sampling request samples at (its last 1 + k), in request order
    sampling_reqs: list[ScheduledRequest]


def default_decode_rows(config: EngineConfig) -> int:
    """Tokens per request a native decode step may carry: 1, or 1 + k to verify k drafts."""
    spec = config.speculative_config
    return 1 + spec.num_speculative_tokens if spec is not None else 1


class ModelRunner:
    def __init__(self, config: EngineConfig, checkpoint_dir: Path, max_decode_rows: int | None = None) -> None:
        """``max_decode_rows``: the most tokens per request a step may compute and still take the
        native decode stack (default ``default_decode_rows``; a draft model passes its own)."""
        self.config = config
        self.max_decode_rows = default_decode_rows(config) if max_decode_rows is None else max_decode_rows
        self.device = resolve_device(config.device.device)
        self.hf_config = load_hf_config(checkpoint_dir)
        self.dtype = resolve_dtype(config.model.dtype, self.hf_config, self.device)
        mode = config.device.cpu_kernels
        self.cpu_ops = load_cpu_ops(mode, self.device, self.dtype, model_args(self.hf_config).head_dim)
        # Linear layers: the native GEMM when the kernels loaded, else oneDNN, else F.linear.
        self.linear_backend = ("native" if self.cpu_ops is not None else
                               "onednn" if onednn_linear_available(mode, self.device, self.dtype) else "torch")
        model_cfg = config.model
        self.quantization = resolve_quantization(model_cfg.quantization, self.hf_config, Path(checkpoint_dir),
                                                 model_cfg.quantization_group_size, model_cfg.quantize_lm_head,
                                                 model_cfg.lm_head_quantization)
        backend = LinearBackend(self.linear_backend, self.cpu_ops,
                                activation=check_activation(model_cfg.quantization_activation, self.quantization,
                                                            self.linear_backend))
        self.model = load_model(Path(checkpoint_dir), self.hf_config, self.device, self.dtype,
                                linear_method_factory(backend, self.quantization))
        if self.cpu_ops is not None:
            self.model.use_cpu_ops(self.cpu_ops)
        args = self.model.args
        self.vocab_size: int = args.vocab_size
        self.max_position_embeddings: int = args.max_position_embeddings
        self.num_layers: int = args.num_hidden_layers
        self.num_kv_heads: int = args.num_key_value_heads
        self.head_dim: int = args.head_dim
        # The KV cache's own dtype (kv_cache_dtype), separate from the model's: quantized caches keep
        # one byte per element plus a float32 scale per token, KV head and K/V.
        self.kv_dtype = KV_CACHE_TORCH_DTYPES.get(config.cache.kv_cache_dtype, self.dtype)
        self.kv_quantized = config.cache.kv_cache_dtype != "auto"
        self.kv_bytes_per_token: int = kv_bytes_per_token(args, self.kv_dtype, self.kv_quantized)
        self.block_size = config.cache.block_size
        self.kv_caches: list[KVCache] = []
        self.decode_stack: NativeDecodeStack | None = None  # set with the KV cache
        self.decode_runtime = DECODE_RUNTIMES[config.device.decode_runtime]
        self.workspace = Workspace()
        self.sampler = Sampler()
        self._step_timer: NullTimer | StepTimer = NULL_TIMER
        self._layer_hooks: list = []
        logger.info("loaded %s (%s) on %s in %s; attention and norms: %s; linear layers: %s", checkpoint_dir,
                    type(self.model).__name__, self.device, str(self.dtype).removeprefix("torch."),
                    "native CPU kernels" if self.cpu_ops else "torch ops",
                    {"native": "native GEMM, pre-packed weights", "onednn": "oneDNN, pre-packed weights",
                     "torch": "torch F.linear"}[self.linear_backend])
        if self.quantization is not None:
            logger.info("quantization: %s; linear kernels: %s; weights %.1f MiB", self.quantization.describe(),
                        ", ".join(f"{k} x{n}" for k, n in sorted(linear_kernels(self.model).items())), self.weight_bytes() / 2**20)

    def weight_bytes(self) -> int:
        """Bytes of every parameter and packed linear weight (tied tensors counted once)."""
        return model_weight_bytes(self.model)

    def kv_cache_description(self) -> str:
        name = str(self.kv_dtype).removeprefix("torch.")
        return f"{name} with a float32 scale per token and head" if self.kv_quantized else name

    @property
    def step_timer(self) -> NullTimer | StepTimer:
        return self._step_timer

    @step_timer.setter
    def step_timer(self, timer: NullTimer | StepTimer) -> None:
        """Time this runner's phases with ``timer`` (``LLMEngine.enable_step_timing``), and each
        decoder layer of the module path through forward hooks (installed only while timing)."""
        self._step_timer = timer
        for handle in self._layer_hooks:
            handle.remove()
        self._layer_hooks = [] if not timer.enabled else time_layers(self.model.model.layers, timer)

    # ---- KV cache ---------------------------------------------------------------------------
    def determine_num_blocks(self) -> int:
        """How many KV blocks fit the budget: an explicit override, a byte budget on CPU, or what a
        profiled forward pass leaves free of ``gpu_memory_utilization`` on CUDA."""
        cache = self.config.cache
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        # A separate draft model keeps a cache of as many blocks: the budget holds both.
        block_bytes = self.block_size * (self.kv_bytes_per_token + self.draft_kv_bytes_per_token())
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

    def draft_kv_bytes_per_token(self) -> int:
        """KV bytes per token of the separate draft model speculative decoding runs beside this one
        (0 without one; a self-draft shares this runner's cache)."""
        spec = self.config.speculative_config
        if spec is None or spec.method != "draft_model" or spec.is_self_draft:
            return 0
        from tureen.executor.loader import resolve_checkpoint

        hf = load_hf_config(resolve_checkpoint(spec.model))
        dtype = KV_CACHE_TORCH_DTYPES.get(self.config.cache.kv_cache_dtype,
                                          resolve_dtype(self.config.model.dtype, hf, self.device))
        return kv_bytes_per_token(model_args(hf), dtype, self.kv_quantized)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        # Zeros, not empty: padded gathers read unwritten slots, and masked garbage that happens to
        # be NaN would still poison the softmax-weighted sum (0 * NaN = NaN).
        if self.kv_quantized:
            self.kv_caches = [QuantizedKVCache.zeros(num_blocks, self.block_size, self.num_kv_heads, self.head_dim,
                                                     self.kv_dtype, self.device) for _ in range(self.num_layers)]
            self.decode_stack = None  # the native stack reads float32 caches only
            return
        shape = (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        if self.device.type == "cpu":
            self.kv_caches = [empty_with_huge_pages(shape, self.dtype).zero_() for _ in range(self.num_layers)]
        else:
            self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self._build_decode_stack()

    def share_kv_cache(self, owner: "ModelRunner") -> None:
        """Use ``owner``'s KV cache tensors instead of allocating any: a self-draft (the same model,
        quantized) reads the target's cache for the verified context and writes its drafted tokens'
        K/V into lookahead slots that the target's verification pass overwrites."""
        if (owner.num_layers, owner.num_kv_heads, owner.head_dim, owner.kv_dtype, owner.block_size) != (
                self.num_layers, self.num_kv_heads, self.head_dim, self.kv_dtype, self.block_size):
            raise ConfigError("a shared KV cache needs the same layers, KV heads, head size, dtype and block size")
        if not owner.kv_caches:
            raise RuntimeError("the owner's KV cache is not allocated yet")
        self.kv_caches = owner.kv_caches
        if self.kv_quantized:
            self.decode_stack = None  # the native stack reads float32 caches only
        else:
            self._build_decode_stack()

    def _build_decode_stack(self) -> None:
        """The native decode path over the caches just allocated (None: decode runs layer by layer)."""
        self.decode_stack = (NativeDecodeStack.build(self.model, self.kv_caches, self.cpu_ops, self.block_size,
                                                     self.decode_runtime)
                             if self.config.device.decode_stack == "native" else None)

    @torch.inference_mode()
    def _profile_free_cuda_bytes(self) -> int:
        """Run the largest step the scheduler may send; return the bytes left for the KV cache."""
        sched = self.config.scheduler
        tokens = sched.max_num_batched_tokens
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        saved, self.kv_caches = self.kv_caches, []
        profile_blocks = -(-tokens // self.block_size)
        self.allocate_kv_cache(profile_blocks)
        meta = build_attention_metadata([tokens], [0], [list(range(profile_blocks))],
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
        logits, reqs = self.compute_sample_logits(sched)
        if not reqs:
            return ModelRunnerOutput()
        with self.decode_stack.sampling_threads() if self.decode_stack is not None else contextlib.nullcontext():
            if any(r.spec_token_ids for r in reqs):
                tokens, logprobs = verify_and_sample(self.sampler, logits, reqs, self.vocab_size, self.device,
                                                     sched.token_bitmask)
            else:
                sampled, lps = self._sample(logits, reqs, sched)
                tokens, logprobs = [[t] for t in sampled], [[lp] for lp in lps]
        self.step_timer.lap("sampling")
        return ModelRunnerOutput(req_ids=[r.req_id for r in reqs], sampled_token_ids=tokens, logprobs=logprobs)

    @torch.inference_mode()
    def compute_sample_logits(self, sched: SchedulerOutput) -> tuple[Tensor, list[ScheduledRequest]]:
        """Run the step's forward pass; return the logits rows it samples at and their requests.

        Rows come grouped by request, in the order of the returned requests: ``num_sample_rows``
        rows each (one, or 1 + k with k drafted tokens to verify). Shape (rows, vocab) float32.
        """
        if not self.kv_caches:
            raise RuntimeError("allocate_kv_cache() must run before execute()")
        if not sched.requests:
            return torch.empty(0, self.vocab_size), []
        if self.decode_stack is not None:
            if self.decode_stack.accepts(sched.requests, self.max_decode_rows) and not sched.preempted_req_ids:
                return self._decode_stack_logits(sched)
            self.decode_stack.inputs.reset()  # blocks may move before the next pure-decode step
        timer = self.step_timer
        batch = self._prepare(sched.requests)
        timer.lap("prepare")
        hidden = self.model(batch.input_ids, batch.meta.positions, batch.meta, self.kv_caches)  # (T, hidden)
        timer.lap("forward")
        if not batch.sampling_reqs:
            return torch.empty(0, self.vocab_size), []
        logits = self.model.compute_logits(hidden[batch.sample_rows])  # (N, vocab) float32
        timer.lap("logits")
        return logits, batch.sampling_reqs

    def _sample(self, logits: Tensor, reqs: list[ScheduledRequest], sched: SchedulerOutput):
        if plain_greedy(reqs, sched.token_bitmask):
            if self.cpu_ops is not None and logits.dtype == torch.float32 and logits.is_cpu:
                return self.cpu_ops.argmax(logits), [None] * logits.shape[0]
            return greedy_tokens(logits)
        meta = SamplingMetadata.from_requests(reqs, self.vocab_size, self.device, sched.token_bitmask)
        return self.sampler(logits, meta)

    def _decode_stack_logits(self, sched: SchedulerOutput) -> tuple[Tensor, list[ScheduledRequest]]:
        """A decode step on the native stack (``decode_stack.py``): one row per token, the same
        logits as decoding the tokens one by one, less Python."""
        timer, stack, reqs = self.step_timer, self.decode_stack, sched.requests
        n = stack.prepare(reqs)
        timer.lap("prepare")
        hidden, logits = stack.forward(n, timer)  # (n, hidden) and (n, vocab) or None: each request's rows in turn
        timer.lap("forward")
        stack.charge_head(timer)
        rows = sample_rows(reqs) if n != sum(r.num_sample_rows for r in reqs) else None  # a catch-up chunk
        if logits is None:
            logits = self.model.compute_logits(hidden if rows is None else hidden[rows])  # (sample rows, vocab) float32
        elif rows is not None:
            logits = logits[rows]
        timer.lap("logits")
        return logits, reqs

    def _prepare(self, reqs: list[ScheduledRequest]) -> StepBatch:
        order = step_order(reqs)
        ordered = [reqs[i] for i in order]
        input_ids = list(chain.from_iterable(r.token_ids for r in ordered))
        meta = build_attention_metadata([r.num_tokens for r in ordered], [r.start_pos for r in ordered],
                                        [r.block_ids for r in ordered], self.block_size, self.device,
                                        self.workspace, self.cpu_ops)
        last_row, row = [0] * len(reqs), 0
        for i in order:
            row += reqs[i].num_tokens
            last_row[i] = row - 1
        sampling = [i for i, r in enumerate(reqs) if r.sample]
        rows = [row for i in sampling for row in range(last_row[i] + 1 - reqs[i].num_sample_rows, last_row[i] + 1)]
        return StepBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long).to(self.device),
            meta=meta,
            sample_rows=torch.tensor(rows, dtype=torch.long).to(self.device),
            sampling_reqs=[reqs[i] for i in sampling],
        )


def kv_bytes_per_token(args, kv_dtype: torch.dtype, quantized: bool) -> int:
    """K and V of every layer for one token; a quantized cache adds a float32 scale per token and KV head."""
    return 2 * args.num_hidden_layers * args.num_key_value_heads * (
        args.head_dim * kv_dtype.itemsize + (KV_SCALE_BYTES if quantized else 0))


def time_layers(layers, timer: StepTimer) -> list:
    """Forward hooks charging each layer's wall and CPU time to ``layer.<i>`` (inside ``forward``)."""
    handles, started = [], [0.0, 0.0]

    def before(_module, _args) -> None:
        started[0], started[1] = time.perf_counter(), time.thread_time()

    for i, layer in enumerate(layers):
        def after(_module, _args, _out, name=f"layer.{i}") -> None:
            timer.add(name, time.perf_counter() - started[0], time.thread_time() - started[1])
        handles += [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]
    return handles


def sample_rows(reqs: list[ScheduledRequest]) -> list[int]:
    """The rows each request samples at (its last ``num_sample_rows``) when its tokens are rows in turn."""
    rows, end = [], 0
    for r in reqs:
        end += r.num_tokens
        rows += range(end - r.num_sample_rows, end)
    return rows


def step_order(reqs: list[ScheduledRequest]) -> list[int]:
    """Row order of a step: single-token requests by context length, then the longer chunks."""
    singles = sorted((i for i, r in enumerate(reqs) if r.num_tokens == 1), key=lambda i: reqs[i].start_pos)
    return singles + [i for i, r in enumerate(reqs) if r.num_tokens != 1]
