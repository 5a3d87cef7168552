"""Native CPU kernels: built once with the system C compiler, loaded with ctypes, optional.

Two things make CPU decoding fast and plain torch ops do neither:

- **Paged decode attention** (``csrc/paged_attention.c``): reads K/V in place through the block
  tables. The torch path gathers every block into a padded buffer and lets SDPA read it again, so it
  moves each cached row across the memory bus three times. The C file is compiled on first use
  (``cc -O3 -march=native -fopenmp``, well under a second) into
  ``$TUREEN_CACHE_DIR/kernels/`` under a name hashed from the source, the flags and the CPU, so a
  changed source, compiler or machine gets its own build. It links the same ``libgomp.so.1`` soname
  that torch ships, so it runs on torch's OpenMP threads.
- **float32 linear layers on oneDNN with weights pre-packed** once at load time
  (``torch.ops.mkldnn``, part of every x86 CPU build of torch): 1.2-1.5x the GEMM throughput of
  ``F.linear`` at decode batch sizes, and 2-4x on the LM head.

``cpu_kernels="auto"`` uses them when they build and load, and otherwise logs why and falls back to
plain torch ops (same results up to float rounding); ``"on"`` makes that a hard error; ``"off"``
never tries. None of this applies on CUDA.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from tureen.errors import ConfigError

logger = logging.getLogger("tureen.executor")

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.c"
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
        target = cache_dir / f"paged_attention-{key}.so"
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
            logger.info("built the CPU paged-attention kernel: %s", target)
            return target
        Path(tmp).unlink(missing_ok=True)
        if proc is not None:
            errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()[-500:]}")
    raise KernelUnavailable("compiling csrc/paged_attention.c failed:\n" + "\n".join(errors))


class PagedDecodeKernel:
    """ctypes binding of ``tureen_paged_decode_f32`` (see the C file for layouts)."""

    def __init__(self, path: Path) -> None:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise KernelUnavailable(f"loading {path} failed: {e}") from e
        self._fn = lib.tureen_paged_decode_f32
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _I64,
                             _I64, ctypes.c_float, ctypes.c_int]
        self.path = path

    def __call__(self, q: Tensor, kv_cache: Tensor, block_table: Tensor, context_lens: Tensor, out: Tensor,
                 window: int | None, scale: float) -> None:
        """q, out: (n, H, D) float32 with contiguous heads; kv_cache (2, blocks, block_size, Hkv, D);
        block_table (n, max_blocks) int64; context_lens (n,) int64. Writes out in place."""
        n, h, d = q.shape
        _, _, bs, hkv, _ = kv_cache.shape
        for name, t in (("q", q), ("out", out)):
            if t.dtype != torch.float32 or t.stride(2) != 1 or t.stride(1) != d:
                raise ValueError(f"{name} must be float32 (n, H, D) with contiguous heads")
        if not (kv_cache.is_contiguous() and block_table.is_contiguous() and context_lens.is_contiguous()):
            raise ValueError("kv_cache, block_table and context_lens must be contiguous")
        if block_table.dtype != torch.int64 or context_lens.dtype != torch.int64 or block_table.shape[0] != n:
            raise ValueError("block_table (n, max_blocks) and context_lens (n,) must be int64")
        rc = self._fn(q.data_ptr(), q.stride(0), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(),
                      block_table.data_ptr(), block_table.shape[1], context_lens.data_ptr(), out.data_ptr(),
                      out.stride(0), n, h, hkv, d, bs, window or 0, scale, torch.get_num_threads())
        if rc != 0:
            raise MemoryError("paged attention kernel could not allocate its scratch buffers")


@functools.cache
def _load_paged_decode(cache_dir: Path) -> PagedDecodeKernel:
    return PagedDecodeKernel(_build(cache_dir))


def paged_decode_kernel(mode: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> PagedDecodeKernel | None:
    """The decode kernel for this engine, or None for the torch path (``mode``: auto | on | off)."""
    if mode == "off":
        return None
    unsupported = ("it runs on CPU only" if device.type != "cpu" else
                   "it supports float32 only" if dtype != torch.float32 else
                   "it needs head_dim to be a multiple of 8" if head_dim % 8 else None)
    failed = False
    if unsupported is None:
        from tureen.demo import default_cache_dir

        try:
            return _load_paged_decode(default_cache_dir() / "kernels")
        except KernelUnavailable as e:
            unsupported, failed = str(e), True
    if mode == "on":
        raise ConfigError(f"cpu_kernels='on' but the paged-attention kernel cannot be used: {unsupported}")
    if device.type == "cpu":
        logger.log(logging.WARNING if failed else logging.INFO,
                   "CPU paged-attention kernel not used (%s); decode attention runs on torch ops (slower)",
                   unsupported)
    return None


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
