"""The host checks. Each is a small object with a name and ``run(host) -> Finding``; the host facts
(limits, disk, nvidia-smi output, torch's CUDA) are gathered once into ``HostFacts``."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from typing import Protocol

from tureen.doctor.host import HostFacts

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""


class Check(Protocol):
    name: str

    def run(self, host: HostFacts) -> Finding: ...


@dataclass(frozen=True)
class OpenFileLimit:
    minimum: int = 65535
    name: str = "open-file limit"

    def run(self, host: HostFacts) -> Finding:
        soft, hard = host.nofile
        if soft >= self.minimum:
            return Finding(self.name, OK, f"ulimit -n is {soft:,} (>= {self.minimum:,})")
        fix = (f"raise it to {self.minimum}: `ulimit -n {self.minimum}` in the service's shell, LimitNOFILE={self.minimum} "
               f"in its systemd unit, or `--ulimit nofile={self.minimum}:{self.minimum}` for docker run")
        if hard < self.minimum:
            fix += f" (the hard limit is {hard:,}: raise it in /etc/security/limits.conf first)"
        return Finding(self.name, FAIL, f"ulimit -n is {soft:,}; every stream holds a socket, so a busy server "
                                        f"runs out at {self.minimum:,} or less", fix)


@dataclass(frozen=True)
class DiskSpace:
    required_bytes: int | None  # None: no model given
    path: str
    margin: float = 1.1
    name: str = "disk space"

    def run(self, host: HostFacts) -> Finding:
        free = host.free_bytes(self.path)
        if free is None:
            return Finding(self.name, WARN, f"cannot stat {self.path}")
        if self.required_bytes is None:
            return Finding(self.name, SKIP, f"{free / 1e9:,.1f} GB free at {self.path}; pass MODEL to compare with "
                                            "its size")
        need = int(self.required_bytes * self.margin)
        if free >= need:
            return Finding(self.name, OK, f"{free / 1e9:,.1f} GB free at {self.path}; the model needs "
                                          f"{self.required_bytes / 1e9:,.1f} GB")
        return Finding(self.name, FAIL, f"{free / 1e9:,.1f} GB free at {self.path}, the model needs "
                                        f"{self.required_bytes / 1e9:,.1f} GB (+10%)",
                       f"free {(need - free) / 1e9:,.1f} GB, or point HF_HOME at a larger disk")


@dataclass(frozen=True)
class CudaAvailable:
    name: str = "CUDA"

    def run(self, host: HostFacts) -> Finding:
        if not host.gpus:
            return Finding(self.name, SKIP, "no NVIDIA GPU found (nvidia-smi not on PATH): CPU host")
        if host.torch_cuda_available:
            return Finding(self.name, OK, f"torch sees {host.torch_cuda_devices} CUDA device(s)")
        build = f"torch {host.torch_version} is a CPU build" if host.torch_cuda is None else \
            f"torch {host.torch_version} (CUDA {host.torch_cuda}) cannot use the GPU"
        return Finding(self.name, FAIL, f"nvidia-smi sees {len(host.gpus)} GPU(s) but {build}",
                       "install torch's CUDA build (pip install torch --index-url https://download.pytorch.org/whl/cu124) "
                       "and check the driver is loaded (nvidia-smi)")


def _version(text: str | None) -> tuple[int, ...] | None:
    match = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


@dataclass(frozen=True)
class DriverMatchesTorch:
    name: str = "driver vs torch CUDA"

    def run(self, host: HostFacts) -> Finding:
        if not host.gpus:
            return Finding(self.name, SKIP, "no NVIDIA GPU")
        driver, built = _version(host.driver_cuda), _version(host.torch_cuda)
        if driver is None or built is None:
            return Finding(self.name, SKIP, f"driver CUDA {host.driver_cuda or 'unknown'}, torch CUDA "
                                            f"{host.torch_cuda or 'none'}: cannot compare")
        if built <= driver:
            return Finding(self.name, OK, f"driver {host.driver_version} supports CUDA {host.driver_cuda}; "
                                          f"torch is built for CUDA {host.torch_cuda}")
        return Finding(self.name, FAIL, f"torch needs CUDA {host.torch_cuda} but driver {host.driver_version} "
                                        f"supports only {host.driver_cuda}",
                       "upgrade the NVIDIA driver, or install a torch built for an older CUDA")


@dataclass(frozen=True)
class PersistenceMode:
    name: str = "GPU persistence mode"

    def run(self, host: HostFacts) -> Finding:
        if not host.gpus:
            return Finding(self.name, SKIP, "no NVIDIA GPU")
        off = [g.index for g in host.gpus if g.persistence_mode.lower() == "disabled"]
        unknown = [g.index for g in host.gpus if g.persistence_mode.lower() not in ("enabled", "disabled")]
        if off:
            return Finding(self.name, WARN, f"disabled on GPU {', '.join(off)}: the driver unloads between "
                                            "processes and the next start pays seconds of init",
                           "sudo nvidia-smi -pm 1 (or enable nvidia-persistenced)")
        if unknown:
            return Finding(self.name, SKIP, f"nvidia-smi cannot tell on GPU {', '.join(unknown)}")
        return Finding(self.name, OK, f"enabled on all {len(host.gpus)} GPU(s)")


@dataclass(frozen=True)
class LockedClocks:
    name: str = "GPU clocks"

    def run(self, host: HostFacts) -> Finding:
        if not host.gpus:
            return Finding(self.name, SKIP, "no NVIDIA GPU")
        known = [g for g in host.gpus if g.app_clock_mhz and g.max_clock_mhz]
        if not known:
            return Finding(self.name, SKIP, "nvidia-smi reports no application/max clocks here")
        low = [g for g in known if g.app_clock_mhz < g.max_clock_mhz]
        if low:
            g = low[0]
            return Finding(self.name, WARN, f"GPU {g.index} application clock {g.app_clock_mhz} MHz < max "
                                            f"{g.max_clock_mhz} MHz: latency varies with boost",
                           f"lock them: sudo nvidia-smi -lgc {g.max_clock_mhz} (or -ac MEM,{g.max_clock_mhz})")
        return Finding(self.name, OK, f"application clocks at max on {len(known)} GPU(s)")


@dataclass(frozen=True)
class ModelFits:
    """Does the model fit, by ``tureen plan``'s figures, on the GPUs found (or the one named)?"""

    plan: object | None  # a PlanEstimate, or None without MODEL
    error: str | None = None
    name: str = "model fits"

    def run(self, host: HostFacts) -> Finding:
        if self.error:
            return Finding(self.name, FAIL, self.error)
        e = self.plan
        if e is None:
            return Finding(self.name, SKIP, "pass MODEL (and --gpu on a host without GPUs) to check")
        where = "CPU" if e.gpu is None else f"{e.num_gpus} x {e.gpu}"
        if e.fits:
            return Finding(self.name, OK, f"{e.model} on {where}: {e.max_concurrent_sequences:,} sequences of "
                                          f"{e.max_model_len:,} tokens fit in the KV budget")
        if e.gpu is None:
            fix = "lower --max-model-len or raise --kv-cache-memory (the CPU KV budget)"
        elif e.min_gpus:
            fix = f"use {e.min_gpus} GPUs (--num-gpus {e.min_gpus})"
        else:
            fix = "quantize the weights, lower --max-model-len, or use larger GPUs"
        return Finding(self.name, FAIL, f"{e.model} does not fit on {where} at max_model_len {e.max_model_len:,}",
                       fix + f"; see `tureen plan {e.model}`")


@dataclass(frozen=True)
class RedisReachable:
    """PING the gateway's Redis (from its config) with a raw RESP exchange: no client library needed."""

    address: tuple[str, int] | None
    password: str | None = None
    source: str = ""
    timeout_s: float = 3.0
    name: str = "Redis"
    extra: list[str] = field(default_factory=list)

    def run(self, host: HostFacts) -> Finding:
        if self.address is None:
            return Finding(self.name, SKIP, self.source or "no gateway config given (--gateway-config)")
        hostname, port = self.address
        try:
            with socket.create_connection((hostname, port), timeout=self.timeout_s) as s:
                s.settimeout(self.timeout_s)
                if self.password:
                    s.sendall(_resp("AUTH", self.password))
                    s.recv(256)
                s.sendall(_resp("PING"))
                reply = s.recv(256)
        except OSError as exc:
            return Finding(self.name, FAIL, f"cannot reach {hostname}:{port} ({exc.strerror or exc})",
                           "start Redis or fix router_settings.redis_host/redis_port in the gateway config")
        if reply.startswith(b"+PONG"):
            return Finding(self.name, OK, f"{hostname}:{port} answers PING")
        return Finding(self.name, FAIL, f"{hostname}:{port} answered {reply[:60]!r}",
                       "check router_settings.redis_password")


def _resp(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)
