"""Native CPU kernels: built once with the system C compiler, loaded with ctypes, optional.

Plain torch ops leave large costs on the table when serving on a CPU. ``csrc/cpu_ops.c`` holds:

- **the GEMM of every float32 linear layer**, on weights packed once into 16-column panels, with a
  6x16 register tile and the next panel prefetched while the current one computes; the MLP's
  gate/up projection writes silu(gate) * up directly. At decode batch sizes it runs at 85-90% of
  an AVX2 core's FMA peak, where oneDNN's packed kernels reach 65-75%;
- **paged decode attention**: the torch attention path gathers every block into a padded buffer and
  lets SDPA read it again, so each cached K/V row crosses the memory bus three times; the C kernel
  reads it once, in place, through the block table;
- RMSNorm fused with the residual add, silu(gate) * up, in-place rotary embedding and the KV-cache
  write (one pass each instead of three to five torch ops);
- **weight-only int8 and int4 GEMMs** (``csrc/quant_linear.c``): the same panels and register tile
  on weights that stay 8 or 4 bits wide in memory and are widened to float in registers, with
  per-channel or per-group scales and zeros and the same fused gate/up epilogue. Decode reads
  every weight once per step, so a quarter or an eighth of the bytes is what makes it faster;
- **W8A8-dynamic int8 / int4 GEMMs** (``csrc/quant_w8a8.c``, ``quantization_activation="int8"``):
  x quantized to int8 per row and block on every call, exact integer dot products with VNNI
  (avx512vnni or avxvnni, generic C elsewhere, chosen from cpuid at run time). A different numeric
  strategy from the weight-only kernels, reached through the same ``tureen_linear_quant`` entry.

Bindings are ctypes calls on raw pointers. A ``torch.library`` operator built with
``torch.utils.cpp_extension`` was measured as the alternative (2-core AVX-512 VM, torch 2.13): it
costs 10-13 us a call from Python against 2.0-2.5 us for the bare ctypes call (about 6.5 us with
this module's argument checks), and a minute of C++ compilation on first use; so ctypes it is.

It is compiled on first use (``cc -O3 -march=native -fopenmp``, a few seconds) into
``$TUREEN_CACHE_DIR/kernels/`` under a name hashed from the source, the flags and the CPU, so a
changed source, compiler or machine gets its own build. It links the ``libgomp.so.1`` soname that
torch ships, so it runs on torch's own OpenMP threads. Without it, float32 linear layers still run
on **oneDNN with pre-packed weights** (``torch.ops.mkldnn``, part of torch's x86 CPU builds).

``cpu_kernels="auto"`` uses them when they build and load, and otherwise logs why and falls back to
plain torch ops (same results up to float rounding); ``"on"`` makes that a hard error; ``"off"``
never tries. None of this applies on CUDA.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from tureen.errors import ConfigError

logger = logging.getLogger("tureen.executor")

CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "cpu_ops.c"  # the float32 kernels; every csrc/*.c is compiled into one library
# Tried in order: the first that compiles wins (no -march=native or no OpenMP on odd toolchains).
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)
_COMMON_FLAGS = ["-std=gnu11", "-shared", "-fPIC", "-fno-math-errno"]
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class KernelUnavailable(RuntimeError):
    """A native kernel could not be built or loaded; the message says why."""


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.machine() + platform.processor()


def _sources() -> tuple[list[Path], bytes]:
    """The C files to compile, and every byte the build depends on (headers included)."""
    files = sorted(CSRC.glob("*.[ch]"))
    return [f for f in files if f.suffix == ".c"], b"\0".join(f.name.encode() + b"\0" + f.read_bytes() for f in files)


def _build(cache_dir: Path) -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise KernelUnavailable("no C compiler found (install gcc, or set CC)")
    sources, source = _sources()
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags + _COMMON_FLAGS).encode(),
                                         _cpu_signature().encode()])).hexdigest()[:16]
        target = cache_dir / f"cpu_ops-{key}.so"
        if target.is_file():
            return target
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
        os.close(fd)
        cmd = [compiler, *flags, *_COMMON_FLAGS, "-o", tmp, *map(str, sources), "-lm"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            proc = None
            errors.append(f"{' '.join(cmd)}: {e}")
        if proc is not None and proc.returncode == 0:
            os.replace(tmp, target)  # atomic: concurrent builders each install a complete file
            logger.info("built the native CPU kernels: %s", target)
            return target
        Path(tmp).unlink(missing_ok=True)
        if proc is not None:
            errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()[-500:]}")
    raise KernelUnavailable("compiling csrc/cpu_ops.c failed:\n" + "\n".join(errors))


def _check_f32(name: str, t: Tensor, contiguous: bool = True) -> None:
    if t.dtype != torch.float32 or not t.is_cpu or (contiguous and not t.is_contiguous()):
        raise ValueError(f"{name} must be a{' contiguous' if contiguous else ''} float32 CPU tensor")


_KV_FORMATS = {torch.int8: 0, torch.float8_e4m3fn: 1}  # as in csrc/kv_quant.c


def _kv_format(data: Tensor, scales: Tensor) -> int:
    if data.dtype not in _KV_FORMATS or not data.is_cpu or not data.is_contiguous() or data.dim() != 5:
        raise ValueError("a quantized KV cache must be a contiguous (2, blocks, block_size, Hkv, D) int8 or "
                         "float8_e4m3fn CPU tensor")
    if data.shape[-1] % 8:
        raise ValueError("the quantized attention kernel needs head_dim to be a multiple of 8")
    _check_f32("scales", scales)
    if scales.shape != data.shape[:4]:
        raise ValueError(f"scales must have shape {tuple(data.shape[:4])}, got {tuple(scales.shape)}")
    return _KV_FORMATS[data.dtype]


def _rows(t: Tensor) -> tuple[int, int]:
    """(rows, row stride) of a 2-D or 3-D tensor whose rows are each dense (any gap between rows)."""
    if t.dim() not in (2, 3) or t.stride(-1) != 1 or (t.dim() == 3 and t.stride(1) != t.shape[2]):
        raise ValueError(f"expected (rows, ...) with each row dense, got shape {tuple(t.shape)} strides {t.stride()}")
    return t.shape[0], t.stride(0)


class CpuOps:
    """ctypes bindings of ``csrc/cpu_ops.c`` (layouts are documented there); float32 CPU tensors."""

    def __init__(self, path: Path) -> None:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise KernelUnavailable(f"loading {path} failed: {e}") from e
        self.path = path
        self._slots_checked: Tensor | None = None
        f32, i32 = ctypes.c_float, ctypes.c_int
        self._decode = self._bind(lib.tureen_paged_decode_f32, ctypes.c_int, [
            _PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _I64, _I64, f32, i32])
        self._rms_norm = self._bind(lib.tureen_rms_norm_f32, None,
                                    [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, f32, i32])
        self._silu_mul = self._bind(lib.tureen_silu_mul_f32, None, [_PTR, _PTR, _I64, _I64, i32])
        self._rope = self._bind(lib.tureen_rope_f32, None, [_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, i32])
        self._write_kv = self._bind(lib.tureen_write_kv_f32, None,
                                    [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, i32])
        self._pack_linear = self._bind(lib.tureen_pack_linear_f32, None, [_PTR, _PTR, _PTR, _PTR, _I64, _I64, i32])
        self._linear = self._bind(lib.tureen_linear_f32, None,
                                  [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, i32, i32])
        self._write_kv_quant = self._bind(lib.tureen_write_kv_quant, None, [
            _PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, i32, i32])
        self._decode_quant = self._bind(lib.tureen_paged_decode_quant, i32, [
            _PTR, _I64, _PTR, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _I64, _I64, f32, i32,
            i32])
        self._linear_quant = self._bind(lib.tureen_linear_quant, i32, [
            _PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, i32, i32, i32, i32])

        self._w8a8_isa = self._bind(lib.tureen_w8a8_set_isa, i32, [i32])

        self._decode_stack = self._bind(lib.tureen_decode_stack_f32, i32, [_PTR, _PTR, i32])
        self._argmax = self._bind(lib.tureen_argmax_rows_f32, None, [_PTR, _I64, _I64, _I64, _PTR])
        self._pool_stats = self._bind(lib.tureen_pool_stats, None, [_PTR])
        self._pool_debug_stall = self._bind(lib.tureen_pool_debug_stall, None, [_I64, _I64])
        self._pool_debug_hold = self._bind(lib.tureen_pool_debug_hold, None, [ctypes.c_int])
        self._stack_layout = self._bind(lib.tureen_decode_stack_layout, _I64, [_I64])

    @staticmethod
    def _bind(fn, restype, argtypes):
        fn.restype, fn.argtypes = restype, argtypes
        return fn

    def paged_decode(self, q: Tensor, kv_cache: Tensor, block_table: Tensor, context_lens: Tensor, out: Tensor,
                     window: int | None, scale: float) -> None:
        """q, out: (n, H, D) with contiguous heads; kv_cache (2, blocks, block_size, Hkv, D);
        block_table (n, max_blocks) int64; context_lens (n,) int64. Writes out in place."""
        n, h, d = q.shape
        _, _, bs, hkv, _ = kv_cache.shape
        for name, t in (("q", q), ("out", out)):
            _check_f32(name, t, contiguous=False)
            _rows(t)
        _check_f32("kv_cache", kv_cache)
        for name, t in (("block_table", block_table), ("context_lens", context_lens)):
            if t.dtype != torch.int64 or not t.is_contiguous() or t.shape[0] != n:
                raise ValueError(f"{name} must be a contiguous int64 tensor with one row per query")
        rc = self._decode(q.data_ptr(), q.stride(0), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(),
                          block_table.data_ptr(), block_table.shape[1], context_lens.data_ptr(), out.data_ptr(),
                          out.stride(0), n, h, hkv, d, bs, window or 0, scale, torch.get_num_threads())
        if rc != 0:
            raise MemoryError("paged attention kernel could not allocate its scratch buffers")

    def write_kv(self, kv_cache: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
        """k, v (T, Hkv, D), each row dense, into slots ``slot_mapping`` (T,) int64 of
        kv_cache (2, num_blocks, block_size, Hkv, D)."""
        _check_f32("kv_cache", kv_cache)
        for name, t in (("k", k), ("v", v)):
            _check_f32(name, t, contiguous=False)
            _rows(t)
        t = k.shape[0]
        if slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous() or slot_mapping.shape != (t,):
            raise ValueError("slot_mapping must be a contiguous int64 tensor with one slot per token")
        row = kv_cache.shape[3] * kv_cache.shape[4]
        if slot_mapping is not self._slots_checked:  # every layer of a step shares one slot mapping
            if t and (int(slot_mapping.min()) < 0 or int(slot_mapping.max()) >= kv_cache[0].numel() // row):
                raise IndexError("slot_mapping points outside the KV cache")
            self._slots_checked = slot_mapping
        self._write_kv(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), kv_cache[0].data_ptr(),
                       kv_cache[1].data_ptr(), slot_mapping.data_ptr(), t, row, torch.get_num_threads())

    def write_kv_quant(self, data: Tensor, scales: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
        """``write_kv`` into a quantized cache: data (2, num_blocks, block_size, Hkv, D) int8 or
        float8_e4m3fn, scales (2, num_blocks, block_size, Hkv) float32 (``csrc/kv_quant.c``)."""
        fmt = _kv_format(data, scales)
        for name, t in (("k", k), ("v", v)):
            _check_f32(name, t, contiguous=False)
            _rows(t)
        t = k.shape[0]
        if slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous() or slot_mapping.shape != (t,):
            raise ValueError("slot_mapping must be a contiguous int64 tensor with one slot per token")
        _, blocks, bs, hkv, d = data.shape
        if slot_mapping is not self._slots_checked:  # every layer of a step shares one slot mapping
            if t and (int(slot_mapping.min()) < 0 or int(slot_mapping.max()) >= blocks * bs):
                raise IndexError("slot_mapping points outside the KV cache")
            self._slots_checked = slot_mapping
        self._write_kv_quant(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), data.data_ptr(), scales.data_ptr(),
                             slot_mapping.data_ptr(), t, blocks * bs, hkv, d, fmt, torch.get_num_threads())

    def paged_decode_quant(self, q: Tensor, data: Tensor, scales: Tensor, block_table: Tensor,
                           context_lens: Tensor, out: Tensor, window: int | None, scale: float) -> None:
        """``paged_decode`` reading a quantized cache (layout as in ``write_kv_quant``) in place."""
        fmt = _kv_format(data, scales)
        n, h, d = q.shape
        _, blocks, bs, hkv, _ = data.shape
        for name, t in (("q", q), ("out", out)):
            _check_f32(name, t, contiguous=False)
            _rows(t)
        for name, t in (("block_table", block_table), ("context_lens", context_lens)):
            if t.dtype != torch.int64 or not t.is_contiguous() or t.shape[0] != n:
                raise ValueError(f"{name} must be a contiguous int64 tensor with one row per query")
        rc = self._decode_quant(q.data_ptr(), q.stride(0), data.data_ptr(), scales.data_ptr(), blocks * bs,
                                block_table.data_ptr(), block_table.shape[1], context_lens.data_ptr(), out.data_ptr(),
                                out.stride(0), n, h, hkv, d, bs, window or 0, scale, fmt, torch.get_num_threads())
        if rc != 0:
            raise MemoryError("paged attention kernel could not allocate its scratch buffers")

    def argmax(self, x: Tensor) -> list[int]:
        """The index of each row's first maximum (a NaN counts as the maximum), as
        ``x.argmax(-1).tolist()``, on the calling thread. x (rows, V) float32 with dense rows."""
        _check_f32("x", x, contiguous=False)
        if x.dim() != 2 or x.stride(1) != 1 or x.shape[1] == 0:
            raise ValueError(f"x must be (rows, V) with dense rows and V > 0, got {tuple(x.shape)}")
        out = torch.empty(x.shape[0], dtype=torch.int64)
        self._argmax(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], out.data_ptr())
        return out.tolist()

    def pool_stats(self) -> dict[str, int]:
        """csrc/pool.c's counters since load: tasks recomputed for a late thread, results dropped, and
        calls that ran on their own thread because another call held the pool."""
        out = (ctypes.c_int64 * 3)()
        self._pool_stats(out)
        return {"steals": out[0], "dropped": out[1], "alone": out[2]}

    def pool_debug_stall(self, every: int, ns: int) -> None:
        """Test only: a pool worker sleeps ``ns`` at every ``every``-th of its stall points (after taking
        a task, and before committing one), as a thread whose core another process took would (0: off)."""
        self._pool_debug_stall(every, ns)

    @contextlib.contextmanager
    def pool_debug_held(self) -> Iterator[None]:
        """Test only: hold csrc/pool.c's pool, as another thread's call would; calls meanwhile run alone."""
        self._pool_debug_hold(1)
        try:
            yield
        finally:
            self._pool_debug_hold(0)

    def decode_stack(self, step: ctypes.Structure, layers: ctypes.Array) -> None:
        """One pure-decode step through every layer (``csrc/decode_stack.c``). ``step`` and ``layers``
        are the ctypes mirrors built by ``executor/decode_stack.py``, checked here against the C
        layout once; the pointers in them are that module's responsibility."""
        if not getattr(self, "_stack_checked", False):
            sizes = (ctypes.sizeof(layers._type_._fields_[2][1]), ctypes.sizeof(layers._type_),
                     ctypes.sizeof(step))
            if sizes != tuple(self._stack_layout(i) for i in range(3)):
                raise RuntimeError(f"decode stack structs do not match the C layout: {sizes}")
            self._stack_checked = True
        if self._decode_stack(ctypes.byref(step), layers, torch.get_num_threads()):
            raise MemoryError("the decode stack could not allocate a kernel's scratch buffer")

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None,
                 out: Tensor | None = None) -> Tensor:
        """RMSNorm of x (T, N); with ``residual``, first ``residual += x`` (in place) and normalise that.
        ``out`` (contiguous, may be x itself) receives the result; by default a new tensor."""
        _check_f32("x", x, contiguous=False)
        _check_f32("weight", weight)
        rows, stride = _rows(x)
        if residual is not None:
            _check_f32("residual", residual)
            if residual.shape != x.shape:
                raise ValueError("residual must have the shape of x")
        if out is None:
            out = torch.empty(x.shape, dtype=x.dtype)
        elif out.shape != x.shape:
            raise ValueError("out must have the shape of x")
        _check_f32("out", out)
        self._rms_norm(x.data_ptr(), stride, 0 if residual is None else residual.data_ptr(), weight.data_ptr(),
                       out.data_ptr(), rows, x.shape[-1], eps, torch.get_num_threads())
        return out

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        """(T, 2I) -> silu(gate_up[:, :I]) * gate_up[:, I:], (T, I)."""
        _check_f32("gate_up", gate_up)
        t, two_i = gate_up.shape
        out = torch.empty(t, two_i // 2, dtype=gate_up.dtype)
        self._silu_mul(gate_up.data_ptr(), out.data_ptr(), t, two_i // 2, torch.get_num_threads())
        return out

    def rope_(self, x: Tensor, cos: Tensor, sin: Tensor) -> None:
        """Rotate-half RoPE in place on x (T, heads, D) with contiguous heads; cos/sin (T, [1,] D)."""
        _check_f32("x", x, contiguous=False)
        rows, stride = _rows(x)
        for name, t in (("cos", cos), ("sin", sin)):
            _check_f32(name, t)
            if t.numel() != rows * x.shape[-1]:
                raise ValueError(f"{name} must hold one (D,) row per token")
        self._rope(x.data_ptr(), stride, rows, x.shape[1], x.shape[2], cos.data_ptr(), sin.data_ptr(),
                   torch.get_num_threads())

    def pack_linear(self, weight: Tensor, bias: Tensor | None = None, gate_up: bool = False) -> "PackedLinear":
        """Pack a (N, K) float32 weight (and its bias) for ``linear``. ``gate_up``: the weight is
        [gate; up] stacked (N = 2I, I a multiple of 8) and ``linear`` returns silu(gate) * up."""
        _check_f32("weight", weight)
        n, k = weight.shape
        if gate_up and n % LINEAR_PANEL:
            raise ValueError(f"a gate_up weight needs 2I rows with I a multiple of 8, got {n}")
        panels = -(-n // LINEAR_PANEL)
        packed = torch.empty(panels, k, LINEAR_PANEL, dtype=torch.float32)
        packed_bias = None
        if bias is not None:
            _check_f32("bias", bias)
            if bias.shape != (n,):
                raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
            packed_bias = torch.empty(panels * LINEAR_PANEL, dtype=torch.float32)
        self._pack_linear(weight.data_ptr(), 0 if bias is None else bias.data_ptr(), packed.data_ptr(),
                          0 if packed_bias is None else packed_bias.data_ptr(), n, k, gate_up)
        return PackedLinear(packed, packed_bias, n, k, gate_up)

    def linear(self, x: Tensor, w: "PackedLinear | PackedQuantLinear") -> Tensor:
        """x (..., K) @ W^T + b -> (..., N), or silu(gate) * up (..., N / 2) for a gate_up weight.
        ``w`` is a float32 (``pack_linear``) or a quantized (``pack_linear_int8/int4``) weight.

        Called for every linear layer of every step: the checks are the few that keep the kernel
        in bounds, and a 2-D input with dense rows goes straight through (measured: the binding
        costs about 3.5 us a call, 1.5 us of it ctypes itself)."""
        shape = x.shape
        if x.dtype != torch.float32 or not x.is_cpu or shape[-1] != w.in_features:
            raise ValueError(f"x must be a float32 CPU tensor with {w.in_features} features, got {x.dtype} "
                             f"{tuple(shape)} on {x.device}")
        x2 = x if len(shape) == 2 and x.stride(1) == 1 else x.reshape(-1, w.in_features).contiguous()
        rows = x2.shape[0]
        out = torch.empty(rows, w.out_features, dtype=torch.float32)
        if w.bits == 32:
            self._linear(x2.data_ptr(), x2.stride(0), out.data_ptr(), rows, *w.kernel_args, torch.get_num_threads())
        elif self._linear_quant(x2.data_ptr(), x2.stride(0), out.data_ptr(), rows, *w.kernel_args,
                                torch.get_num_threads()):
            raise MemoryError("the quantized linear kernel could not allocate its scratch buffer")
        return out if len(shape) == 2 else out.view(*shape[:-1], w.out_features)

    linear_int8 = linear_int4 = linear  # the packed weight knows its format

    def pack_linear_int8(self, q: Tensor, scales: Tensor, zeros: Tensor | None = None, group_size: int = -1,
                         bias: Tensor | None = None, gate_up: bool = False) -> "PackedQuantLinear":
        """Pack an 8-bit weight, value ``(q - zeros) * scales``, for ``linear``.

        q (N, K): int8 (zeros default 0) or uint8 (zeros default 128: GPTQ's unsigned 8-bit);
        scales, zeros: (N,) for one per output channel, or (N, K / group_size) for groups of
        ``group_size`` consecutive inputs. ``gate_up`` as in ``pack_linear``."""
        if q.dtype not in (torch.int8, torch.uint8):
            raise ValueError(f"an 8-bit weight must be int8 or uint8, got {q.dtype}")
        if q.dtype == torch.uint8:  # store q - 128 as int8; (q - z) = (q - 128) - (z - 128)
            zeros = (torch.full_like(scales, 128.0) if zeros is None else zeros.float()) - 128.0
            q = (q.to(torch.int16) - 128).to(torch.int8)
        return _pack_quant(q, scales, zeros, group_size, bias, gate_up, bits=8)

    def pack_linear_int4(self, q: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
                         bias: Tensor | None = None, gate_up: bool = False) -> "PackedQuantLinear":
        """Pack a 4-bit weight for ``linear``: q (N, K) uint8 holding 0..15, one value per element;
        value ``(q - zeros) * scales`` with scales, zeros (N, K / group_size) (``group_size`` -1:
        one group per row, (N,) or (N, 1)); zeros None means 0."""
        if q.dtype != torch.uint8:
            raise ValueError(f"a 4-bit weight must be uint8 holding 0..15, got {q.dtype}")
        if q.numel() and int(q.max()) > 15:
            raise ValueError("a 4-bit weight holds values 0..15 only")
        return _pack_quant(q, scales, zeros, group_size, bias, gate_up, bits=4)

    def pack_linear_w8a8(self, q: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, bits: int,
                         bias: Tensor | None = None, gate_up: bool = False) -> "PackedQuantLinear":
        """Pack an 8- or 4-bit weight for ``linear`` with **int8 activations** (``csrc/quant_w8a8.c``):
        every call quantizes x to int8 per row and block of inputs and multiplies in integers (VNNI).
        Not the exact weight-only product: a separate numeric strategy (``quantization_activation``).

        q, scales, zeros as in ``pack_linear_int8`` (bits 8) or ``pack_linear_int4`` (bits 4); the
        group (the whole row for one scale per row) must be a multiple of 32 inputs."""
        if bits == 8:
            if q.dtype not in (torch.int8, torch.uint8):
                raise ValueError(f"an 8-bit weight must be int8 or uint8, got {q.dtype}")
            if q.dtype == torch.int8:  # the kernel multiplies unsigned bytes: q + 128, zero + 128
                zeros = (torch.zeros_like(scales, dtype=torch.float32) if zeros is None else zeros.float()) + 128.0
                q = (q.to(torch.int16) + 128).to(torch.uint8)
            elif zeros is None:
                zeros = torch.full_like(scales, 128.0, dtype=torch.float32)
        elif bits == 4:
            if q.dtype != torch.uint8 or (q.numel() and int(q.max()) > 15):
                raise ValueError("a 4-bit weight must be uint8 holding 0..15")
        else:
            raise ValueError(f"int8 activations take 8- or 4-bit weights, got {bits} bits")
        k = q.shape[-1]
        group = k if group_size in (-1, k) else group_size
        if group <= 0 or k % group or group % W8A8_MIN_GROUP:
            raise ValueError(f"int8 activations need a group size that divides the {k} input features and is a "
                             f"multiple of {W8A8_MIN_GROUP}, got {group_size}")
        return _pack_quant(q, scales, zeros, group_size, bias, gate_up, bits=bits, activation="int8")

    @property
    def w8a8_isa(self) -> str:
        """The implementation the int8-activation kernels run on: avx512vnni, avxvnni or generic."""
        return W8A8_ISAS[self._w8a8_isa(-1)]

    def set_w8a8_isa(self, isa: str) -> str:
        """Force an implementation of the int8-activation kernels (``auto``: the best this CPU has).
        The environment variable ``TUREEN_W8A8_ISA`` does the same at load. Raises ValueError when
        the CPU lacks it."""
        code = {"auto": 0, **{name: i for i, name in W8A8_ISAS.items()}}.get(isa)
        if code is None:
            raise ValueError(f"unknown int8-activation ISA {isa!r} (auto, {', '.join(W8A8_ISAS.values())})")
        got = self._w8a8_isa(code)
        if got < 0:
            raise ValueError(f"this CPU cannot run the {isa} int8-activation kernels")
        return W8A8_ISAS[got]

    def w8a8_supported_isas(self) -> list[str]:
        """Every implementation this CPU can run (the current choice is kept)."""
        current = self._w8a8_isa(-1)
        ok = [name for code, name in W8A8_ISAS.items() if self._w8a8_isa(code) == code]
        self._w8a8_isa(current)
        return ok


@dataclass(frozen=True)
class PackedLinear:
    """A weight (and bias) in the panel layout of ``csrc/cpu_ops.c``; built by ``CpuOps.pack_linear``."""

    weight: Tensor  # (ceil(rows / 16), in_features, 16)
    bias: Tensor | None  # (ceil(rows / 16) * 16,)
    rows: int  # N of the original (N, K) weight
    in_features: int
    gate_up: bool
    bits = 32

    @property
    def out_features(self) -> int:
        return self.rows // 2 if self.gate_up else self.rows

    @functools.cached_property
    def kernel_args(self) -> tuple:
        """The weight's arguments of ``tureen_linear_f32``, in order (the tensors outlive them)."""
        return (self.weight.data_ptr(), 0 if self.bias is None else self.bias.data_ptr(), self.rows,
                self.in_features, self.gate_up)


LINEAR_PANEL = 16  # columns per packed panel, as in csrc/cpu_ops.c and csrc/quant_linear.c
ACT_INT8 = 0x100  # flag in the kernel's ``bits``: int8 activations (csrc/quant_w8a8.c)
W8A8_MIN_GROUP = 32  # int8-activation blocks are 32, 64 or 128 inputs and tile each weight group
W8A8_ISAS = {1: "generic", 2: "avxvnni", 3: "avx512vnni"}  # as in csrc/quant_w8a8.c


@dataclass(frozen=True)
class PackedQuantLinear:
    """An int8 or int4 weight (its scales, zeros and bias) in the layout of ``csrc/quant_linear.c``;
    built by ``CpuOps.pack_linear_int8`` / ``pack_linear_int4``."""

    qweight: Tensor  # (panels, in_features, 16) int8, or (panels, in_features, 8) uint8 (two 4-bit values a byte)
    params: Tensor  # (panels, groups, 2, 16) float32: scales, then zeros
    bias: Tensor | None  # (panels * 16,)
    rows: int
    in_features: int
    group_size: int  # in_features when there is one scale per output channel
    weight_bits: int  # 8 or 4
    has_zero: bool
    gate_up: bool
    activation: str = "float32"  # "int8": x quantized per block on every call (csrc/quant_w8a8.c layout)

    @property
    def bits(self) -> int:
        """The kernel's format code: the weight bits, with ACT_INT8 set for int8 activations."""
        return self.weight_bits | (ACT_INT8 if self.activation == "int8" else 0)

    @property
    def out_features(self) -> int:
        return self.rows // 2 if self.gate_up else self.rows

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.params, self.bias) if t is not None)

    @functools.cached_property
    def kernel_args(self) -> tuple:
        """The weight's arguments of ``tureen_linear_quant``, in order (the tensors outlive them)."""
        return (self.qweight.data_ptr(), self.params.data_ptr(), 0 if self.bias is None else self.bias.data_ptr(),
                self.rows, self.in_features, self.group_size, self.bits, self.has_zero, self.gate_up)


def _panel_rows(n: int, gate_up: bool) -> Tensor:
    """For each packed column (panels * 16), the weight row it holds; n (a zero row) for padding."""
    if not gate_up:
        idx = torch.arange(-(-n // LINEAR_PANEL) * LINEAR_PANEL)
        return torch.where(idx < n, idx, n)
    half = LINEAR_PANEL // 2
    gate = torch.arange(n // 2).view(-1, half)  # (panels, 8)
    return torch.cat((gate, gate + n // 2), dim=1).reshape(-1)


def _to_panels(t: Tensor, order: Tensor) -> Tensor:
    """(N, C) -> (panels, C, 16): column j of panel p is row order[16p + j] of t (zeros for padding)."""
    padded = torch.cat((t, t.new_zeros(1, t.shape[1])))
    return padded[order].view(-1, LINEAR_PANEL, t.shape[1]).transpose(1, 2).contiguous()


def _vnni_chunks(packed: Tensor, bits: int) -> Tensor:
    """(panels, K, 16) unsigned bytes -> csrc/quant_w8a8.c's (panels, K / 4 or K / 8, 16, 4) chunks."""
    panels, k, _ = packed.shape
    if bits == 8:
        return packed.view(panels, k // 4, 4, LINEAR_PANEL).transpose(2, 3).contiguous()
    eight = packed.view(panels, k // 8, 8, LINEAR_PANEL)
    both = eight[:, :, :4] | (eight[:, :, 4:] << 4)  # inputs 8i + j (low nibble) and 8i + 4 + j (high)
    return both.transpose(2, 3).contiguous()


def _pack_quant(q: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, bias: Tensor | None,
                gate_up: bool, bits: int, activation: str = "float32") -> PackedQuantLinear:
    if q.dim() != 2 or q.is_cuda:
        raise ValueError(f"the weight must be a (N, K) CPU tensor, got shape {tuple(q.shape)}")
    n, k = q.shape
    group = k if group_size in (-1, k) else group_size
    if group <= 0 or k % group:
        raise ValueError(f"group_size {group_size} does not divide the {k} input features")
    groups = k // group
    if gate_up and n % LINEAR_PANEL:
        raise ValueError(f"a gate_up weight needs 2I rows with I a multiple of 8, got {n}")
    params = []
    for name, t in (("scales", scales), ("zeros", zeros)):
        t = torch.zeros(n, groups) if t is None else t.detach().float().reshape(n, -1)
        if t.shape != (n, groups):
            raise ValueError(f"{name} must have shape ({n}, {groups}) for group_size {group_size}, got "
                             f"{tuple(t.shape)}")
        params.append(t)
    has_zero = bool(params[1].any())
    order = _panel_rows(n, gate_up)
    packed = _to_panels(q, order)  # (panels, K, 16)
    if activation == "int8":
        packed = _vnni_chunks(packed, bits)
    elif bits == 4:
        packed = (packed[..., :LINEAR_PANEL // 2] | (packed[..., LINEAR_PANEL // 2:] << 4)).contiguous()
    packed_params = torch.stack([_to_panels(t, order) for t in params], dim=2).contiguous()  # (panels, G, 2, 16)
    packed_bias = None
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        packed_bias = torch.cat((bias.detach().float(), bias.new_zeros(1, dtype=torch.float32)))[order].contiguous()
    return PackedQuantLinear(packed, packed_params, packed_bias, n, k, group, bits, has_zero, gate_up, activation)


@functools.cache
def _load(cache_dir: Path) -> CpuOps:
    return CpuOps(_build(cache_dir))


def load_cpu_ops(mode: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> CpuOps | None:
    """The native ops for this engine, or None for plain torch ops (``mode``: auto | on | off)."""
    if mode == "off":
        return None
    unsupported = ("they run on CPU only" if device.type != "cpu" else
                   "they support float32 only" if dtype != torch.float32 else
                   "the attention kernel needs head_dim to be a multiple of 8" if head_dim % 8 else None)
    failed = False
    if unsupported is None:
        from tureen.demo import default_cache_dir

        try:
            return _load(default_cache_dir() / "kernels")
        except KernelUnavailable as e:
            unsupported, failed = str(e), True
    if mode == "on":
        raise ConfigError(f"cpu_kernels='on' but the native CPU kernels cannot be used: {unsupported}")
    if device.type == "cpu":
        logger.log(logging.WARNING if failed else logging.INFO,
                   "native CPU kernels not used (%s); running on plain torch ops (slower)", unsupported)
    return None


# ---- huge pages -----------------------------------------------------------------------------------

_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 << 20


def empty_with_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised CPU tensor whose memory the kernel is asked to back with 2 MiB pages.

    The paged-attention kernel jumps between blocks scattered over a pool of gigabytes; with 4 KiB
    pages nearly every block costs a TLB miss. Best effort: on systems without transparent huge
    pages (or outside Linux) this is a plain ``torch.empty``. madvise must come before the memory
    is first touched, so the caller initialises the tensor afterwards.
    """
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if nbytes < 2 * _HUGE_PAGE or not sys.platform.startswith("linux"):
        return torch.empty(shape, dtype=dtype)
    raw = torch.empty(nbytes + _HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % _HUGE_PAGE
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(raw.data_ptr() + start), ctypes.c_size_t(nbytes // _HUGE_PAGE * _HUGE_PAGE),
                     _MADV_HUGEPAGE)  # failure (no THP support) leaves ordinary pages: nothing to do
    except (OSError, AttributeError):
        pass
    return raw[start:start + nbytes].view(dtype).view(shape)


# ---- oneDNN linear with pre-packed weights -------------------------------------------------------


def onednn_linear_available(mode: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether float32 linear layers should run on oneDNN with pre-packed weights."""
    if mode == "off" or device.type != "cpu" or dtype != torch.float32:
        return False
    ok = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    if not ok and mode == "on":
        raise ConfigError("cpu_kernels='on' but this torch build has no oneDNN (mkldnn) linear")
    return ok


def pack_linear_weight(weight: Tensor) -> Tensor:
    """(out, in) float32 -> oneDNN's blocked layout for ``packed_linear``. The hint (128 rows) is a
    decode batch; measured on AVX2, the packed weight is as fast for 1..2048 rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 128)


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
