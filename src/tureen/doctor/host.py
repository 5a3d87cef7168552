"""Facts about the host, gathered once: limits, free disk, GPUs from nvidia-smi, torch's CUDA."""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
from dataclasses import dataclass, field

NVIDIA_SMI_FIELDS = "index,name,memory.total,persistence_mode,clocks.applications.graphics,clocks.max.graphics"


@dataclass(frozen=True)
class Gpu:
    index: str
    name: str
    memory_mib: int | None
    persistence_mode: str  # Enabled | Disabled | [N/A]
    app_clock_mhz: int | None
    max_clock_mhz: int | None


@dataclass
class HostFacts:
    nofile: tuple[int, int]
    gpus: list[Gpu] = field(default_factory=list)
    driver_version: str | None = None
    driver_cuda: str | None = None  # the CUDA version the driver supports (nvidia-smi's header)
    torch_version: str | None = None
    torch_cuda: str | None = None  # the CUDA torch was built for; None for a CPU build
    torch_cuda_available: bool = False
    torch_cuda_devices: int = 0

    @staticmethod
    def free_bytes(path: str) -> int | None:
        probe = path
        while probe and not os.path.exists(probe):  # the cache dir may not exist yet: use its parent
            probe = os.path.dirname(probe.rstrip("/"))
        try:
            return shutil.disk_usage(probe or "/").free
        except OSError:
            return None


def _int(text: str) -> int | None:
    match = re.match(r"\s*(\d+)", text)
    return int(match.group(1)) if match else None


def _nvidia_smi(*args: str) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        res = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def read_gpus() -> tuple[list[Gpu], str | None, str | None]:
    """GPUs, driver version and the driver's CUDA version, from nvidia-smi (empty when absent)."""
    table = _nvidia_smi(f"--query-gpu={NVIDIA_SMI_FIELDS}", "--format=csv,noheader,nounits")
    if table is None:
        return [], None, None
    gpus = []
    for line in table.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) == 6:
            gpus.append(Gpu(cells[0], cells[1], _int(cells[2]), cells[3], _int(cells[4]), _int(cells[5])))
    header = _nvidia_smi() or ""
    driver = re.search(r"Driver Version:\s*([\d.]+)", header)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return gpus, driver.group(1) if driver else None, cuda.group(1) if cuda else None


def _torch_facts(facts: HostFacts) -> None:
    try:
        import torch
    except ImportError:
        return
    facts.torch_version = torch.__version__
    facts.torch_cuda = torch.version.cuda
    facts.torch_cuda_available = bool(torch.cuda.is_available())
    facts.torch_cuda_devices = torch.cuda.device_count() if facts.torch_cuda_available else 0


def gather() -> HostFacts:
    facts = HostFacts(nofile=resource.getrlimit(resource.RLIMIT_NOFILE))
    facts.gpus, facts.driver_version, facts.driver_cuda = read_gpus()
    if facts.gpus:  # torch (slow to import) only matters on a GPU host
        _torch_facts(facts)
    return facts
