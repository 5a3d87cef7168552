"""``tureen bench gateway``: the gateway's own overhead, measured side by side against the upstream.

One run starts a fast fake upstream (``tureen.bench.fake_upstream``: fixed TTFT and ITL), a
``tureen gateway`` in front of it with virtual keys, limits and Redis enabled (a local
``redis-server`` on a free port), and then, for each concurrency level, sends the same streamed
requests straight to the upstream and through the gateway. It reports the added p50/p99 TTFT and
end-to-end latency, the throughput ratio, errors, and the gateway process's CPU time per request.

The load generator is a small raw-HTTP/1.1 client on asyncio (keep-alive connections, chunked
decoding, SSE events counted without JSON parsing), so the client costs the same on both paths and
as little as possible on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

MASTER_ENV = "TUREEN_BENCH_MASTER_KEY"


@dataclass
class Sample:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    events: int = 0


@dataclass
class LevelResult:
    target: str
    streams: int
    requests: int
    errors: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    e2e_p50_ms: float
    e2e_p99_ms: float
    cpu_ms_per_request: float | None = None


@dataclass
class Comparison:
    streams: int
    direct: LevelResult
    gateway: LevelResult
    throughput_ratio: float = field(init=False)
    added_ttft_p50_ms: float = field(init=False)
    added_ttft_p99_ms: float = field(init=False)
    added_e2e_p50_ms: float = field(init=False)
    added_e2e_p99_ms: float = field(init=False)

    def __post_init__(self) -> None:
        d, g = self.direct, self.gateway
        self.throughput_ratio = g.tokens_per_s / d.tokens_per_s if d.tokens_per_s else 0.0
        self.added_ttft_p50_ms = g.ttft_p50_ms - d.ttft_p50_ms
        self.added_ttft_p99_ms = g.ttft_p99_ms - d.ttft_p99_ms
        self.added_e2e_p50_ms = g.e2e_p50_ms - d.e2e_p50_ms
        self.added_e2e_p99_ms = g.e2e_p99_ms - d.e2e_p99_ms


# ---- the load generator ---------------------------------------------------------------------
class RawConnection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads a chunked SSE response."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_stream(self, path: str, body: bytes, headers: dict[str, str]) -> Sample:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head = (f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n{extra}\r\n").encode()
        start = time.perf_counter()
        self.writer.write(head + body)
        try:
            return await self._read(start)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.close()
            return Sample(ok=False)

    async def _read(self, start: float) -> Sample:
        reader = self.reader
        assert reader is not None
        status_line = await reader.readline()
        status = int(status_line.split(b" ", 2)[1])
        chunked = False
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"content-length":
                length = int(value)
        if not chunked:
            await reader.readexactly(length)
            return Sample(ok=False)
        sample = Sample(ok=status == 200)
        done = False
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            data = await reader.readexactly(size + 2)
            if sample.events == 0:
                sample.ttft = time.perf_counter() - start
            sample.events += data.count(b"data: ")
            done = done or b"data: [DONE]" in data
            if b'"error"' in data:
                sample.ok = False
        sample.e2e = time.perf_counter() - start
        sample.ok = sample.ok and done
        sample.events -= 1 if done else 0
        return sample

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = self.reader = None


async def run_level(url: str, streams: int, requests: int, body: bytes, headers: dict[str, str]) -> list[Sample]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    samples: list[Sample] = []

    async def worker() -> None:
        conn = RawConnection(parts.hostname or "127.0.0.1", parts.port or 80)
        try:
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                samples.append(await conn.post_stream("/v1/chat/completions", body, headers))
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(streams)))
    return samples


def summarize(target: str, streams: int, samples: list[Sample], wall: float) -> LevelResult:
    good = [s for s in samples if s.ok]
    ttft = sorted(s.ttft * 1000 for s in good) or [0.0]
    e2e = sorted(s.e2e * 1000 for s in good) or [0.0]
    return LevelResult(target=target, streams=streams, requests=len(samples), errors=len(samples) - len(good),
                       wall_s=wall, tokens_per_s=sum(s.events for s in good) / wall if wall else 0.0,
                       ttft_p50_ms=_pct(ttft, 50), ttft_p99_ms=_pct(ttft, 99), e2e_p50_ms=_pct(e2e, 50),
                       e2e_p99_ms=_pct(e2e, 99))


def _pct(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, int(q) - 1))]


# ---- the processes --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"a benchmark process exited early; its log:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up in {timeout:g} s")


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live children (the gateway's workers).

    Read from each thread's ``schedstat`` (nanoseconds) where the kernel has it: ``stat``'s user +
    system time counts in clock ticks (10 ms), too coarse for a few short requests.
    """
    return sum(_process_cpu_seconds(p) for p in [pid, *_children(pid)])


def _process_cpu_seconds(pid: int) -> float:
    try:
        threads = list(Path(f"/proc/{pid}/task").iterdir())
        return sum(int((t / "schedstat").read_text().split()[0]) for t in threads) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


class Stack:
    """The fake upstream, Redis and the gateway, each in its own process, torn down on exit."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        self.procs: list[subprocess.Popen] = []
        self.master_key = "sk-bench-master-" + os.urandom(8).hex()

    def _spawn(self, name: str, cmd: list[str], env: dict | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / f"{name}.log"
        proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc, log

    def start(self) -> tuple[str, str, dict[str, str], int]:
        a = self.args
        up_port, gw_port = _free_port(), _free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        proc, log = self._spawn("upstream", [sys.executable, "-m", "tureen.bench.fake_upstream", "--port",
                                             str(up_port), "--ttft-ms", str(a.ttft_ms), "--itl-ms", str(a.itl_ms),
                                             "--tokens", str(a.tokens)])
        _wait_up(upstream + "/health", proc, log)
        redis_url = self._redis() if a.policy == "redis" else None
        config = self._config(upstream, redis_url)
        path = self.workdir / "gateway.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        gateway = f"http://127.0.0.1:{gw_port}"
        proc, log = self._spawn("gateway", [sys.executable, "-m", "tureen.cli", "gateway", "--config", str(path),
                                            "--host", "127.0.0.1", "--port", str(gw_port), "--log-level",
                                            "warning", "--workers", str(a.gateway_workers)],
                                  env={MASTER_ENV: self.master_key})
        _wait_up(gateway + "/health", proc, log)
        return upstream, gateway, self._key_headers(gateway), proc.pid

    def _redis(self) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed; install it (apt-get install redis-server) or pass "
                             "--policy in-process / --policy off")
        port = _free_port()
        proc, log = self._spawn("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no"])
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return f"redis://127.0.0.1:{port}/0"
            except OSError:
                time.sleep(0.05)
        raise SystemExit(f"redis-server did not start:\n{log.read_text()[-1000:]}")

    def _config(self, upstream: str, redis_url: str | None) -> dict[str, Any]:
        config: dict[str, Any] = {
            "model_list": [{"model_name": "bench", "litellm_params": {"model": "hosted_vllm/fake",
                                                                        "api_base": upstream}}],
            "router_settings": {"num_retries": 2},
            "tureen_settings": {"health_check": {"interval_s": 5, "metrics_scrape_interval_s": 5}},
        }
        if self.args.policy != "off":
            config["general_settings"] = {"master_key": f"os.environ/{MASTER_ENV}"}
            if redis_url:
                config["router_settings"]["redis_url"] = redis_url
        return config

    def _key_headers(self, gateway: str) -> dict[str, str]:
        if self.args.policy == "off":
            return {}
        limits = {"rpm_limit": 10_000_000, "tpm_limit": 10_000_000_000, "max_parallel_requests": 100_000,
                  "key_alias": "bench"}
        r = httpx.post(gateway + "/key/generate", json=limits, timeout=10,
                       headers={"Authorization": f"Bearer {self.master_key}"})
        if r.status_code != 200:
            raise SystemExit(f"could not create a virtual key: HTTP {r.status_code} {r.text[:300]}")
        return {"authorization": f"Bearer {r.json()['key']}"}

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


# ---- the run --------------------------------------------------------------------------------
TARGETS = {1: ("added p50 TTFT <= 2 ms", lambda c: c.added_ttft_p50_ms <= 2.0),
           32: ("throughput >= 0.95x", lambda c: c.throughput_ratio >= 0.95),
           128: ("throughput >= 0.80x", lambda c: c.throughput_ratio >= 0.80)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--streams", default="1,32,128", help="concurrency levels (default: 1,32,128)")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per level and target (default: max(30, 3 x streams))")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per response (default: 64)")
    parser.add_argument("--ttft-ms", type=float, default=20.0, help="the fake upstream's TTFT (default: 20)")
    parser.add_argument("--itl-ms", type=float, default=10.0, help="the fake upstream's ITL (default: 10)")
    parser.add_argument("--policy", choices=["redis", "in-process", "off"], default="redis",
                        help="keys+limits in Redis (default; starts a local redis-server), in the gateway process, "
                             "or no keys at all")
    parser.add_argument("--gateway-workers", type=int, default=1,
                        help="gateway worker processes (tureen gateway --workers; default: 1)")
    parser.add_argument("--warmup", type=int, default=8, help="requests per target before each level (default: 8)")
    parser.add_argument("--save-result", default=None, metavar="FILE.json", help="write every figure as JSON")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="bar charts of ratio and added latency")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    levels = [int(x) for x in str(args.streams).split(",") if x.strip()]
    body = json.dumps({"model": "bench", "stream": True, "max_tokens": args.tokens,
                       "messages": [{"role": "user", "content": "benchmark the gateway, please"}]}).encode()
    with tempfile.TemporaryDirectory(prefix="tureen-bench-gw-") as tmp:
        stack = Stack(args, Path(tmp))
        try:
            upstream, gateway, headers, gw_pid = stack.start()
            comparisons = asyncio.run(_measure(console, levels, args, body, upstream, gateway, headers, gw_pid))
        finally:
            stack.stop()
    _report(console, comparisons, args)
    if args.save_result:
        Path(args.save_result).write_text(json.dumps({"settings": _settings(args),
                                                      "levels": [asdict(c) for c in comparisons]}, indent=2))
    if args.plot:
        _plot(comparisons, args.plot)
        console.print(f"plot: {args.plot}")
    errors = sum(c.direct.errors + c.gateway.errors for c in comparisons)
    return 1 if errors else 0


async def _measure(console, levels, args, body, upstream, gateway, headers, gw_pid) -> list[Comparison]:
    from rich.progress import Progress

    out = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("levels", total=len(levels) * 2)
        for streams in levels:
            n = args.requests or max(30, 3 * streams)
            results = {}
            for target, url, hdrs in (("direct", upstream, {}), ("gateway", gateway, headers)):
                progress.update(task, description=f"{streams} streams -> {target}")
                await run_level(url, streams, max(args.warmup, streams), body, hdrs)  # every connection warm
                cpu0 = _cpu_seconds(gw_pid)
                start = time.perf_counter()
                samples = await run_level(url, streams, n, body, hdrs)
                wall = time.perf_counter() - start
                result = summarize(target, streams, samples, wall)
                if target == "gateway":
                    result.cpu_ms_per_request = (_cpu_seconds(gw_pid) - cpu0) * 1000 / max(1, len(samples))
                results[target] = result
                progress.advance(task)
            out.append(Comparison(streams, results["direct"], results["gateway"]))
    return out


def _report(console, comparisons: list[Comparison], args) -> None:
    from rich.table import Table

    table = Table(title=f"gateway vs direct: fake upstream {args.tokens} tokens, TTFT {args.ttft_ms:g} ms, "
                        f"ITL {args.itl_ms:g} ms, policy {args.policy}, "
                        f"{args.gateway_workers} gateway worker(s)")
    for column in ("streams", "direct tok/s", "gateway tok/s", "ratio", "TTFT p50 +ms", "TTFT p99 +ms",
                   "E2E p50 +ms", "E2E p99 +ms", "errors", "gw CPU ms/req", "target"):
        table.add_column(column, justify="right")
    for c in comparisons:
        goal = TARGETS.get(c.streams)
        verdict = "" if goal is None else f"{goal[0]}: {'met' if goal[1](c) else 'MISSED'}"
        table.add_row(str(c.streams), f"{c.direct.tokens_per_s:,.0f}", f"{c.gateway.tokens_per_s:,.0f}",
                      f"{c.throughput_ratio:.3f}", f"{c.added_ttft_p50_ms:+.2f}", f"{c.added_ttft_p99_ms:+.2f}",
                      f"{c.added_e2e_p50_ms:+.2f}", f"{c.added_e2e_p99_ms:+.2f}",
                      f"{c.direct.errors}/{c.gateway.errors}", f"{c.gateway.cpu_ms_per_request or 0:.2f}", verdict)
    console.print(table)


def _settings(args) -> dict:
    return {k: getattr(args, k) for k in ("streams", "requests", "tokens", "ttft_ms", "itl_ms", "policy",
                                          "gateway_workers")}


def _plot(comparisons: list[Comparison], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(c.streams) for c in comparisons]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(labels, [c.throughput_ratio for c in comparisons], color="tab:blue")
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set(title="throughput through the gateway / direct", xlabel="concurrent streams", ylim=(0, 1.1))
    x = range(len(comparisons))
    right.bar([i - 0.2 for i in x], [c.added_ttft_p50_ms for c in comparisons], width=0.4, label="TTFT p50")
    right.bar([i + 0.2 for i in x], [c.added_e2e_p50_ms for c in comparisons], width=0.4, label="E2E p50")
    right.set_xticks(list(x), labels)
    right.set(title="latency added by the gateway (ms)", xlabel="concurrent streams")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
