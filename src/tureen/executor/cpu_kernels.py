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
  write (one pass each instead of three to five torch ops).

It is compiled on first use (``cc -O3 -march=native -fopenmp``, about a second) into
``$TUREEN_CACHE_DIR/kernels/`` under a name hashed from the source, the flags and the CPU, so a
changed source, compiler or machine gets its own build. It links the ``libgomp.so.1`` soname that
torch ships, so it runs on torch's own OpenMP threads. Without it, float32 linear layers still run
on **oneDNN with pre-packed weights** (``torch.ops.mkldnn``, part of torch's x86 CPU builds).

``cpu_kernels="auto"`` uses them when they build and load, and otherwise logs why and falls back to
plain torch ops (same results up to float rounding); ``"on"`` makes that a hard error; ``"off"``
never tries. None of this applies on CUDA.
"""

from __future__ import annotations

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
from pathlib import Path

import torch
from torch import Tensor

from tureen.errors import ConfigError

logger = logging.getLogger("tureen.executor")

SOURCE = Path(__file__).parent / "csrc" / "cpu_ops.c"
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


def _build(cache_dir: Path) -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise KernelUnavailable("no C compiler found (install gcc, or set CC)")
    source = SOURCE.read_bytes()
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
        cmd = [compiler, *flags, *_COMMON_FLAGS, "-o", tmp, str(SOURCE)]
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
                                  [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, i32, i32])

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

    def linear(self, x: Tensor, w: "PackedLinear") -> Tensor:
        """x (..., K) @ W^T + b -> (..., N), or silu(gate) * up (..., N / 2) for a gate_up weight."""
        _check_f32("x", x, contiguous=False)
        if x.shape[-1] != w.in_features:
            raise ValueError(f"x has {x.shape[-1]} features, the weight expects {w.in_features}")
        lead = x.shape[:-1]
        x2 = x if x.dim() == 2 and x.stride(-1) == 1 else x.reshape(-1, w.in_features).contiguous()
        out = torch.empty(x2.shape[0], w.out_features, dtype=torch.float32)
        self._linear(x2.data_ptr(), x2.stride(0), w.weight.data_ptr(), 0 if w.bias is None else w.bias.data_ptr(),
                     out.data_ptr(), x2.shape[0], w.rows, w.in_features, w.gate_up, torch.get_num_threads())
        return out.view(*lead, w.out_features)


@dataclass(frozen=True)
class PackedLinear:
    """A weight (and bias) in the panel layout of ``csrc/cpu_ops.c``; built by ``CpuOps.pack_linear``."""

    weight: Tensor  # (ceil(rows / 16), in_features, 16)
    bias: Tensor | None  # (ceil(rows / 16) * 16,)
    rows: int  # N of the original (N, K) weight
    in_features: int
    gate_up: bool

    @property
    def out_features(self) -> int:
        return self.rows // 2 if self.gate_up else self.rows


LINEAR_PANEL = 16  # columns per packed panel, as in csrc/cpu_ops.c


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
