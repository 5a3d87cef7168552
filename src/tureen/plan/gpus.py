"""GPU catalogue: device memory, bandwidth and dense tensor throughput, plus a rental price.

Memory is stored two ways, because two conventions are in use:

- ``memory_mib``: the total the device reports, in MiB as ``nvidia-smi`` prints it. This is the
  figure ``gpu_memory_utilization`` is applied to in vLLM and in tureen, and the planner's
  default (``memory_basis="reported"``). It is about 7% above the marketing figure because the
  marketing figure is in decimal GB while the chips carry binary-sized memory.
- ``nominal_gb``: the spec-sheet figure in decimal GB (10^9 bytes) that vendors and the sizing
  guides quote (``memory_basis="nominal"``; the guides' worked examples use it).

Where each reported figure comes from (public ``nvidia-smi`` outputs):

| GPU | MiB | source |
|---|---|---|
| RTX-4090 | 24,564 | vllm-project/vllm#7553 (4 x RTX 4090, ``23859MiB / 24564MiB``) |
| A10 | 23,028 | modal-labs/modal-client#2797 (list of nvidia-smi totals across Modal's fleet) |
| L4 | 23,034 | modal-labs/modal-client#2797 |
| L40S | 46,068 | modal-labs/modal-client#2797; akash-network/provider-configs#99 (``46068 MiB``) |
| A100-40GB | 40,960 | modal-labs/modal-client#2797 |
| A100-80GB | 81,920 | modal-labs/modal-client#2797; dexmal/dexbotic#41 (A800-SXM4-80GB, same board) |
| H100-PCIe | 81,559 | several public run reports print ``NVIDIA H100 PCIe, 81559 MiB`` (found by exact-string search; not an issue thread) |
| H100-SXM | 81,559 | modal-labs/modal-client#2797 (85,520,809,984 bytes); NVIDIA/nccl#1264 (``0MiB / 81559MiB``) |
| H200 | 143,771 | several public nvidia-smi tables of H200 SXM hosts print ``/ 143771MiB`` (exact-string search; not an issue thread) |

Caveat: on some boards CUDA's own total is a little below nvidia-smi's (an A100-SXM4-40GB reports
40,339 MiB to ``deviceQuery`` in bottlerocket-os/bottlerocket#3873, against 40,960 in nvidia-smi),
so plans for those boards are up to ~1.5% optimistic. TFLOPS are dense (no 2:4 sparsity)
tensor-core peaks from the vendors' datasheets; ``fp8_tflops`` is ``None`` where the chip has no
FP8 units (Ampere). Prices are representative on-demand cloud rates per GPU-hour in US dollars;
they vary by provider and month, so ``--gpu-price`` overrides them.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Callable

from tureen.errors import ConfigError

MIB = 2**20


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_mib: int  # total the device reports (nvidia-smi), MiB
    nominal_gb: float  # spec-sheet figure, 10^9 bytes
    bandwidth_gb_s: float  # 10^9 bytes per second
    bf16_tflops: float  # dense
    fp8_tflops: float | None  # dense; None when unsupported
    hourly_price: float  # US$ per GPU-hour

    @property
    def reported_memory_bytes(self) -> int:
        return self.memory_mib * MIB

    @property
    def nominal_memory_bytes(self) -> int:
        return int(self.nominal_gb * 1e9)

    @property
    def bandwidth_bytes_s(self) -> float:
        return self.bandwidth_gb_s * 1e9

    def flops_per_s(self, use_fp8: bool) -> float:
        """Peak dense FLOP/s for the matmul precision in use (FP8 only where the chip has it)."""
        tflops = self.fp8_tflops if use_fp8 and self.fp8_tflops else self.bf16_tflops
        return tflops * 1e12


# The memory basis: which of a GPU's two memory figures the plan starts from.
MEMORY_BASES: dict[str, Callable[[GpuSpec], int]] = {
    "reported": lambda g: g.reported_memory_bytes,
    "nominal": lambda g: g.nominal_memory_bytes,
}
DEFAULT_MEMORY_BASIS = "reported"


def gpu_memory_bytes(gpu: GpuSpec, basis: str) -> int:
    """The GPU's total memory under ``basis`` ("reported" or "nominal")."""
    return MEMORY_BASES[basis](gpu)


CATALOGUE: dict[str, GpuSpec] = {g.name: g for g in (
    GpuSpec("RTX-4090", 24_564, 24, 1008, 165.2, 330.3, 0.50),
    GpuSpec("A10", 23_028, 24, 600, 125, None, 0.75),
    GpuSpec("L4", 23_034, 24, 300, 121, 242, 0.70),
    GpuSpec("L40S", 46_068, 48, 864, 362, 733, 1.50),
    GpuSpec("A100-40GB", 40_960, 40, 1555, 312, None, 1.30),
    GpuSpec("A100-80GB", 81_920, 80, 2039, 312, None, 1.80),
    GpuSpec("H100-PCIe", 81_559, 80, 2000, 756, 1513, 2.50),
    GpuSpec("H100-SXM", 81_559, 80, 3350, 989, 1979, 3.00),
    GpuSpec("H200", 143_771, 141, 4800, 989, 1979, 3.80),
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
