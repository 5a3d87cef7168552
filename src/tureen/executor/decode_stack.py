"""The native decode path: a decode step's whole decoder stack in one C call, fed from
persistent batch state.

At batch 1 on a small model, the module path's Python work is a large share of a step: per layer
about ten ctypes calls with their checks, per step a dozen new index tensors built from Python
lists. For steps where every scheduled request decodes one token (the steady state of
generation), ``NativeDecodeStack`` instead:

- keeps the step's inputs in buffers allocated once (``DecodeInputs``): token ids, positions, KV
  slots, context lengths and a block table whose rows persist across steps and only gain the new
  block when a request crosses a block boundary (vLLM's input batch does the same);
- hands them, with one descriptor per layer built at start-up (pointers to the packed weights,
  norms and KV caches), to ``tureen_decode_stack_f32`` (``csrc/decode_stack.c``), which runs the
  same kernels in the same order as the module path: the hidden states are bit-identical.

It applies when the model's every linear layer runs on a native packed kernel (float32, or int8 /
int4 without act-order), the gate/up projection has the fused epilogue, the KV cache is float32 and
no layer normalises q and k (Qwen3); otherwise ``NativeDecodeStack.build`` says why and the runner
keeps the module path.

A step qualifies when every request samples and computes at most ``max_rows`` tokens: one for a
plain decode; with speculative decoding, 1 + k to verify k drafted tokens (the runner's limit) or
a draft model's short catch-up. Each token is a row of the step (``DecodeInputs``); the rows of a
request share its block table with context lengths ``pos + 1 .. pos + m``, which makes them
exactly the tokens decoded one by one. Prefills and mixed steps take the module path.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from tureen.engine.messages import ScheduledRequest
from tureen.engine.step_timing import NULL_TIMER, NullTimer, StepTimer
from tureen.executor.cpu_kernels import CpuOps, PackedLinear, PackedQuantLinear

logger = logging.getLogger("tureen.executor")

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class _Linear(ctypes.Structure):
    _fields_ = [("weight", _P), ("params", _P), ("bias", _P), ("rows", _I64), ("in_features", _I64),
                ("group", _I64), ("bits", _I32), ("has_zero", _I32), ("gate_up", _I32), ("pad", _I32)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _P), ("post_norm", _P), ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear),
                ("down", _Linear), ("k_cache", _P), ("v_cache", _P), ("window", _I64)]


class _Step(ctypes.Structure):
    _fields_ = [(name, _I64) for name in ("num_layers", "n", "hidden", "H", "Hkv", "D", "I", "block_size",
                                          "max_blocks")] + [
        ("eps", _F32), ("scale", _F32), ("final_norm", _P), ("cos", _P), ("sin", _P), ("slots", _P),
        ("block_tables", _P), ("context_lens", _P), ("residual", _P), ("h", _P), ("x", _P), ("qkv", _P),
        ("attn", _P), ("act", _P), ("layer_wall_ns", _P), ("layer_cpu_ns", _P), ("runtime", _I64),
        ("lm_head", _Linear), ("logits", _P)]


def native_packed(layer) -> PackedLinear | PackedQuantLinear | None:
    """The packed weight a native kernel multiplies for this linear layer, or None (another path)."""
    kernel = getattr(layer, "kernel", None)
    if kernel is not None:
        packed = getattr(kernel, "packed", None)
        if getattr(kernel, "perm", None) is not None:
            return None  # act-order: the input is permuted before the GEMM
        return packed if isinstance(packed, (PackedLinear, PackedQuantLinear)) else None
    packed = getattr(layer, "packed_weight", None)
    return packed if isinstance(packed, PackedLinear) else None


def _linear_desc(packed: PackedLinear | PackedQuantLinear) -> _Linear:
    bias = 0 if packed.bias is None else packed.bias.data_ptr()
    if isinstance(packed, PackedLinear):
        return _Linear(packed.weight.data_ptr(), 0, bias, packed.rows, packed.in_features, packed.in_features,
                       32, 0, int(packed.gate_up), 0)
    return _Linear(packed.qweight.data_ptr(), packed.params.data_ptr(), bias, packed.rows, packed.in_features,
                   packed.group_size, packed.bits, int(packed.has_zero), int(packed.gate_up), 0)


def unsupported_reason(model, kv_caches: list) -> str | None:
    """Why the native stack cannot run this model (None when it can)."""
    for layer, cache in zip(model.model.layers, kv_caches):
        attn = layer.self_attn
        if not isinstance(cache, Tensor) or cache.dtype != torch.float32:
            return "the KV cache is quantized"
        if attn.spec.qk_norm_eps is not None:
            return "the model normalises q and k per head"
        if attn.spec.head_dim % 8:
            return "head_dim is not a multiple of 8"
        for proj in (attn.qkv_proj, attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            packed = native_packed(proj)
            if packed is None:
                return f"{proj.prefix or 'a linear layer'} is not on a native packed kernel"
            if (proj is layer.mlp.gate_up_proj) != packed.gate_up:
                return "the gate/up projection does not fuse its activation"
    return None


@dataclass(frozen=True)
class DecodeRuntime:
    """How a native decode step's threads share its work (``decode_runtime``; csrc/decode_stack.c).

    ``pool`` runs the step as one program on csrc/pool.h's threads, which do not wait for a thread
    that has lost its core; ``openmp`` opens one OpenMP region per kernel. OpenMP's idle threads
    spin for milliseconds after each region, taking a core from the pool's threads, so with ``pool``
    the torch work between steps (sampling) runs on one thread (``torch_threads``)."""

    name: str
    code: int  # RUNTIME_* in csrc/decode_stack.c
    single_thread_torch: bool

    @contextlib.contextmanager
    def torch_threads(self) -> Iterator[None]:
        """Torch's intra-op threads for the work around a step: one for ``pool``, unchanged for ``openmp``."""
        if not self.single_thread_torch:
            yield
            return
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)


DECODE_RUNTIMES = {r.name: r for r in (DecodeRuntime("pool", 1, True), DecodeRuntime("openmp", 0, False))}


class DecodeInputs:
    """A decode step's inputs in buffers that live across steps, one *row* per token.

    A request contributes one row per token it computes: one for a plain decode, 1 + k when it
    carries k drafted tokens to verify. Its rows share its block table and have consecutive
    positions and context lengths ``pos + 1 .. pos + m``, so paged decode attention is causal
    within the request: every row's K/V is written before any row attends, and a row sees exactly
    the tokens before it, as if the tokens were decoded one by one.

    While the same rows belong to the same requests (the steady state), a step only rewrites each
    row's token id, position, slot and context length, and the block table gains the blocks a
    request has grown by; any other step rewrites the table rows that changed owner.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.order: list[str] = []  # the request id of each row
        self.known_blocks: list[int] = []
        self.max_position = 0
        self._alloc(1, 1)

    def _alloc(self, rows: int, width: int) -> None:
        self.rows, self.width = rows, width
        self.scalars = torch.zeros(4, rows, dtype=torch.int64)  # ids, positions, slots, context lengths
        self.table = torch.zeros(rows, width, dtype=torch.int64)
        self._scalars, self._table = self.scalars.numpy(), self.table.numpy()
        self.order, self.known_blocks = [], []

    def reset(self) -> None:
        """Forget the rows (another kind of step ran: blocks may have been reassigned)."""
        self.order, self.known_blocks = [], []

    def update(self, reqs: list[ScheduledRequest]) -> int:
        """Fill the buffers for ``reqs`` (``num_tokens`` rows each, in order); return the row count."""
        n, bs = sum(r.num_tokens for r in reqs), self.block_size
        widest = max(len(r.block_ids) for r in reqs)
        if n > self.rows or widest > self.width:
            self._alloc(max(n, 2 * self.rows if n > self.rows else self.rows), max(widest, 2 * self.width))
        owners = [r.req_id for r in reqs for _ in range(r.num_tokens)]
        if owners != self.order:
            self.order, self.known_blocks = owners, [0] * n
        self._update_table(reqs)
        pos = [r.start_pos + j for r in reqs for j in range(r.num_tokens)]
        s = self._scalars
        s[0, :n] = [t for r in reqs for t in r.token_ids]
        s[1, :n] = pos
        s[2, :n] = [r.block_ids[p // bs] * bs + p % bs for r in reqs for p in range(r.start_pos,
                                                                                    r.start_pos + r.num_tokens)]
        s[3, :n] = s[1, :n] + 1
        self.max_position = max(pos)
        return n

    def _update_table(self, reqs: list[ScheduledRequest]) -> None:
        """Each row's block table: its request's, appending the blocks it has grown by."""
        table, known, first = self._table, self.known_blocks, 0
        for r in reqs:
            blocks = r.block_ids
            for i in range(first, first + r.num_tokens):
                if known[i] and (len(blocks) < known[i] or table[i, known[i] - 1] != blocks[known[i] - 1]):
                    known[i] = 0  # not the table this row holds: rewrite it
                if len(blocks) != known[i]:
                    table[i, known[i]:len(blocks)] = blocks[known[i]:]
                    known[i] = len(blocks)
            first += r.num_tokens


@dataclass
class _Scratch:
    rows: int
    tensors: dict[str, Tensor]


class NativeDecodeStack:
    """Runs decode steps of ``model`` (one row per token) through ``tureen_decode_stack_f32``."""

    def __init__(self, model, kv_caches: list[Tensor], ops: CpuOps, block_size: int,
                 runtime: DecodeRuntime = DECODE_RUNTIMES["pool"]) -> None:
        self.model, self.ops, self.block_size, self.runtime = model, ops, block_size, runtime
        a = model.args
        first = model.model.layers[0].self_attn.spec
        self.hidden, self.H, self.Hkv, self.D = a.hidden_size, first.num_heads, first.num_kv_heads, first.head_dim
        self.I = a.intermediate_size
        self.eps = model.model.norm.eps
        self.num_layers = len(model.model.layers)
        self.layers = (_Layer * self.num_layers)(*(self._layer_desc(layer, cache)
                                                  for layer, cache in zip(model.model.layers, kv_caches)))
        self._kv_caches = kv_caches  # the descriptors point into them
        self.inputs = DecodeInputs(block_size)
        self.rope = RopeTable(model.model.rotary_emb, self.D)
        self.embed = model.model.embed_tokens.weight
        self._scratch = _Scratch(0, {})
        self._step: _Step | None = None
        self._step_key: tuple = ()
        # The LM head runs in the same call when a native kernel holds it (else the runner's module).
        head = native_packed(model.lm_head)
        self.lm_head = _linear_desc(head) if head is not None else _Linear()
        self.vocab_size = head.rows if head is not None else 0
        # The pool runs float32 weights only; quantized ones stay on OpenMP.
        linears = [L.qkv for L in self.layers] + [L.o for L in self.layers] + [L.gate_up for L in self.layers] + [
            L.down for L in self.layers] + ([self.lm_head] if self.lm_head.weight else [])
        self.pooled = runtime.name == "pool" and all(w.bits == 32 for w in linears)
        # Per layer, then the final norm and LM head.
        self.layer_wall_ns = torch.zeros(self.num_layers + 1, dtype=torch.int64)
        self.layer_cpu_ns = torch.zeros(self.num_layers + 1, dtype=torch.int64)

    @classmethod
    def build(cls, model, kv_caches: list, ops: CpuOps | None, block_size: int,
              runtime: DecodeRuntime = DECODE_RUNTIMES["pool"]) -> "NativeDecodeStack | None":
        """The native stack for this model, or None (logged) when some part of it is unsupported."""
        reason = "the native CPU kernels are not loaded" if ops is None or not hasattr(ops, "decode_stack") else \
            unsupported_reason(model, kv_caches)
        if reason is not None:
            logger.info("decode steps run layer by layer (native decode stack not used: %s)", reason)
            return None
        return cls(model, kv_caches, ops, block_size, runtime)

    def _layer_desc(self, layer, cache: Tensor) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        return _Layer(layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                      *(_linear_desc(native_packed(p)) for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                                                  mlp.down_proj)),
                      cache[0].data_ptr(), cache[1].data_ptr(), attn.spec.sliding_window or 0)

    @staticmethod
    def accepts(reqs: list[ScheduledRequest], max_rows: int = 1) -> bool:
        """A decode step: every request samples and computes at most ``max_rows`` tokens (one for
        a plain decode; 1 + k to verify k drafted tokens, or a draft model catching up)."""
        return all(r.sample and r.num_tokens <= max_rows for r in reqs)

    def prepare(self, reqs: list[ScheduledRequest]) -> int:
        """This step's inputs into the persistent buffers (``DecodeInputs``); returns the row count."""
        return self.inputs.update(reqs)

    def _step_args(self, n: int) -> _Step:
        """The step descriptor: rebuilt when a buffer moves (more rows, a wider block table), else
        only its row count changes."""
        inputs, scratch = self.inputs, self._scratch
        key = (inputs.scalars.data_ptr(), inputs.table.data_ptr(), self.rope.cos.data_ptr())
        if scratch.rows < n or self._step is None or self._step_key != key:
            if scratch.rows < n:
                qkv = (self.H + 2 * self.Hkv) * self.D
                shapes = {"residual": self.hidden, "h": self.hidden, "x": self.hidden, "qkv": qkv,
                          "attn": self.H * self.D, "act": self.I}
                scratch = self._scratch = _Scratch(inputs.rows, {k: torch.empty(inputs.rows, w, dtype=torch.float32)
                                                                 for k, w in shapes.items()})
            t = scratch.tensors
            self._step = _Step(self.num_layers, n, self.hidden, self.H, self.Hkv, self.D, self.I, self.block_size,
                               inputs.table.shape[1], self.eps, self.D ** -0.5, self.model.model.norm.weight.data_ptr(),
                               self.rope.cos.data_ptr(), self.rope.sin.data_ptr(), inputs.scalars[2].data_ptr(),
                               inputs.table.data_ptr(), inputs.scalars[3].data_ptr(), t["residual"].data_ptr(),
                               t["h"].data_ptr(), t["x"].data_ptr(), t["qkv"].data_ptr(), t["attn"].data_ptr(),
                               t["act"].data_ptr(), 0, 0, self.runtime.code if self.pooled else 0, self.lm_head, 0)
            self._step_key = key
        self._step.n = n
        return self._step

    def forward(self, n: int, timer: NullTimer | StepTimer = NULL_TIMER) -> tuple[Tensor, Tensor | None]:
        """The step ``prepare`` filled, one row per token in request order: the final normalised
        hidden states (n, hidden), and the logits (n, vocab) float32 when the LM head runs here
        (None: the caller projects the hidden states). With an enabled ``timer``, each layer's time
        is charged to ``layer.<i>``; ``charge_head`` then moves the LM head's to ``logits``."""
        scalars = self.inputs.scalars
        self.rope.gather(scalars[1, :n], self.inputs.max_position)
        step = self._step_args(n)
        t = self._scratch.tensors
        torch.index_select(self.embed, 0, scalars[0, :n], out=t["residual"][:n])
        logits = torch.empty(n, self.vocab_size) if self.lm_head.weight else None
        step.logits = 0 if logits is None else logits.data_ptr()
        timed = timer.enabled
        if timed:
            self.layer_wall_ns.zero_()
            self.layer_cpu_ns.zero_()
            step.layer_wall_ns, step.layer_cpu_ns = self.layer_wall_ns.data_ptr(), self.layer_cpu_ns.data_ptr()
        self.ops.decode_stack(step, self.layers)
        if timed:
            step.layer_wall_ns = step.layer_cpu_ns = 0
            times = list(zip(self.layer_wall_ns.tolist(), self.layer_cpu_ns.tolist()))
            for i, (wall, cpu) in enumerate(times[:-1]):
                timer.add(f"layer.{i}", wall * 1e-9, cpu * 1e-9)
        return t["h"][:n], logits

    def sampling_threads(self) -> contextlib.AbstractContextManager:
        """The torch threads for the sampling after a step (one while the pool runs the steps)."""
        return self.runtime.torch_threads() if self.pooled else contextlib.nullcontext()

    def charge_head(self, timer: NullTimer | StepTimer) -> None:
        """Move the final norm's and LM head's time of the last timed ``forward`` from ``forward`` to ``logits``."""
        if timer.enabled:
            timer.move("forward", "logits", self.layer_wall_ns[-1].item() * 1e-9, self.layer_cpu_ns[-1].item() * 1e-9)


class RopeTable:
    """cos/sin rows for any position, from a table grown in chunks and computed by the model's own
    ``RotaryEmbedding.cos_sin`` (the same elementwise ops, hence the same values as per step);
    ``gather`` copies a step's rows into buffers whose address stays put."""

    CHUNK = 1024

    def __init__(self, rotary_emb, head_dim: int) -> None:
        self.rotary_emb, self.head_dim = rotary_emb, head_dim
        self.table_cos = self.table_sin = torch.empty(0, head_dim)
        self.cos = self.sin = torch.empty(0, head_dim)

    def gather(self, positions: Tensor, max_position: int) -> None:
        """positions (n,) int64 -> self.cos[:n], self.sin[:n] (n, D)."""
        n = positions.shape[0]
        if max_position >= self.table_cos.shape[0]:
            size = (max_position // self.CHUNK + 1) * self.CHUNK
            cos, sin = self.rotary_emb.cos_sin(torch.arange(size), torch.float32)  # (size, 1, D)
            self.table_cos, self.table_sin = cos.view(size, -1).contiguous(), sin.view(size, -1).contiguous()
        if self.cos.shape[0] < n:
            self.cos, self.sin = torch.empty(n, self.head_dim), torch.empty(n, self.head_dim)
        torch.index_select(self.table_cos, 0, positions, out=self.cos[:n])
        torch.index_select(self.table_sin, 0, positions, out=self.sin[:n])


__all__ = ["DECODE_RUNTIMES", "DecodeInputs", "DecodeRuntime", "NativeDecodeStack", "native_packed",
           "unsupported_reason"]
