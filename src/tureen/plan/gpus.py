"""GPU catalogue: spec-sheet memory, bandwidth and dense tensor throughput, plus a rental price.

Memory is the spec-sheet figure in decimal GB (10^9 bytes), as vendors and the sizing guides
quote it; the cards hold slightly more (GiB), so budgets built on it are a little conservative.
TFLOPS are dense (no 2:4 sparsity) tensor-core peaks; ``fp8_tflops`` is ``None`` where the chip
has no FP8 units (Ampere). Prices are representative on-demand cloud rates per GPU-hour in US
dollars; they vary by provider and month, so ``--gpu-price`` overrides them.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from tureen.errors import ConfigError


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gb: float  # 10^9 bytes
    bandwidth_gb_s: float  # 10^9 bytes per second
    bf16_tflops: float  # dense
    fp8_tflops: float | None  # dense; None when unsupported
    hourly_price: float  # US$ per GPU-hour

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)

    @property
    def bandwidth_bytes_s(self) -> float:
        return self.bandwidth_gb_s * 1e9

    def flops_per_s(self, use_fp8: bool) -> float:
        """Peak dense FLOP/s for the matmul precision in use (FP8 only where the chip has it)."""
        tflops = self.fp8_tflops if use_fp8 and self.fp8_tflops else self.bf16_tflops
        return tflops * 1e12


CATALOGUE: dict[str, GpuSpec] = {g.name: g for g in (
    GpuSpec("RTX-4090", 24, 1008, 165.2, 330.3, 0.50),
    GpuSpec("A10", 24, 600, 125, None, 0.75),
    GpuSpec("L4", 24, 300, 121, 242, 0.70),
    GpuSpec("L40S", 48, 864, 362, 733, 1.50),
    GpuSpec("A100-40GB", 40, 1555, 312, None, 1.30),
    GpuSpec("A100-80GB", 80, 2039, 312, None, 1.80),
    GpuSpec("H100-PCIe", 80, 2000, 756, 1513, 2.50),
    GpuSpec("H100-SXM", 80, 3350, 989, 1979, 3.00),
    GpuSpec("H200", 141, 4800, 989, 1979, 3.80),
)}

DEFAULT_GPU = "H100-SXM"

# Common spellings that name one catalogue entry unambiguously enough for planning.
_ALIASES = {
    "4090": "RTX-4090", "geforce-rtx-4090": "RTX-4090",
    "a100": "A100-80GB", "a100-sxm": "A100-80GB", "a100-40g": "A100-40GB", "a100-80g": "A100-80GB",
    "h100": "H100-SXM", "h100-sxm5": "H100-SXM", "h100-80gb": "H100-SXM",
    "h200-sxm": "H200", "h200-141gb": "H200",
}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.strip().lower())


_BY_KEY = {**{_key(a): CATALOGUE[n] for a, n in _ALIASES.items()}, **{_key(n): g for n, g in CATALOGUE.items()}}


def find_gpu(name: str) -> GpuSpec:
    """Look a GPU up by name, case-insensitively; a clear ConfigError names the choices."""
    gpu = _BY_KEY.get(_key(name))
    if gpu is not None:
        return gpu
    close = difflib.get_close_matches(_key(name), list(_BY_KEY), n=1, cutoff=0.6)
    hint = f" Did you mean {_BY_KEY[close[0]].name}?" if close else ""
    raise ConfigError(f"unknown GPU {name!r}.{hint} Known GPUs: {', '.join(CATALOGUE)}")
