"""``tureen bench http-overhead``: one workload offline and through ``tureen serve``, side by side.

The same engine settings run twice in one command, back to back for every level and round: in
this process through the offline engine, kept at exactly C requests in flight (a closed loop,
like a client at max concurrency C), then through a local ``tureen serve`` loaded by
``tureen bench serve --max-concurrency C``. Every run gets fresh random prompts (no prefix-cache
hits); the server stays idle while the offline engine runs, and the other way round. The
ratio of the two output throughputs is what the serving path costs. The benchmark client runs in
its own process and its CPU time is reported, so one can see it did not starve the server.

Where the difference goes is reported per output token, in CPU time (steadier than wall time on a
shared machine): the offline engine, and over HTTP the engine core process, the API server process
and the client. Single-stream latency is compared too (``--single-stream``): median time per
output token after the first, offline at batch 1 against ``tureen bench serve
--max-concurrency 1``; and the server's ``tureen:step_to_sse_write_seconds`` histogram gives how
long a token takes from the end of its engine step to the SSE write.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

WARMUP_REQUESTS = 8


HANDOFF_METRIC = "tureen:step_to_sse_write_seconds"


@dataclass
class Level:
    """One concurrency level; one entry per repeat in each list (offline and HTTP run back to back)."""

    concurrency: int
    num_prompts: int = 0
    offline_tok_s: list[float] = field(default_factory=list)
    http_tok_s: list[float] = field(default_factory=list)
    client_cpu_s: list[float] = field(default_factory=list)
    client_wall_s: list[float] = field(default_factory=list)
    http_latency_ms: list[dict[str, float]] = field(default_factory=list)
    offline_tpot_ms: list[float] = field(default_factory=list)  # median over requests, per round
    # CPU microseconds per output token, per round: "offline", "engine", "api", "client"
    cpu_us_per_token: list[dict[str, float]] = field(default_factory=list)
    handoff_ms: list[dict[str, float]] = field(default_factory=list)  # step end -> SSE write: p50, p99, mean

    @property
    def ratios(self) -> list[float]:
        return [h / o for h, o in zip(self.http_tok_s, self.offline_tok_s) if o]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="Checkpoint (default: the demo model).")
    p.add_argument("--num-prompts", type=int, default=96, help="Requests per level (default: 96).")
    p.add_argument("--input-len", type=int, default=128, help="Prompt tokens per request (default: 128).")
    p.add_argument("--output-len", type=int, default=128, help="Output tokens per request, EOS ignored (default: 128).")
    p.add_argument("--concurrency", default="32,64", help="Comma-separated stream counts (default: 32,64).")
    p.add_argument("--max-model-len", type=int, default=1024, help="Engine max_model_len (default: 1024).")
    p.add_argument("--kv-cache-memory", default="2GiB", help="Engine KV-cache budget (default: 2GiB).")
    p.add_argument("--decode-runtime", choices=["pool", "openmp"], default="pool",
                   help="The engine's decode_runtime, offline and served alike (default: pool).")
    p.add_argument("--repeat", type=int, default=1,
                   help="Rounds; each runs every level offline and over HTTP back to back, HTTP first in every "
                        "second round so that drift cancels over an even count (default: 1).")
    p.add_argument("--single-stream", type=int, default=8, metavar="N",
                   help="Also run N requests one at a time, offline at batch 1 and over HTTP with "
                        "--max-concurrency 1, to compare time per output token (0: skip; default: 8).")
    p.add_argument("--save-result", default=None, help="Write the figures as JSON to this file.")
    p.set_defaults(func=run)


def _levels(args: argparse.Namespace) -> list[int]:
    return [int(c) for c in str(args.concurrency).split(",") if c.strip()]


def build_levels(args: argparse.Namespace) -> list[Level]:
    """The single-stream level first (when asked), then the throughput levels."""
    single = [Level(1, args.single_stream)] if args.single_stream > 0 else []
    return single + [Level(c, args.num_prompts) for c in _levels(args)]


def _engine_kwargs(args: argparse.Namespace) -> dict:
    return {"max_num_seqs": max(_levels(args)), "max_model_len": args.max_model_len,
            "kv_cache_memory": args.kv_cache_memory, "decode_runtime": args.decode_runtime}


# ------------------------------------------------------------------------------------ offline


@dataclass
class OfflineRun:
    tok_s: float
    tpot_ms: float  # median over requests of (finished - first token) / (output tokens - 1)
    cpu_s: float  # this process's CPU time during the run
    tokens: int


def offline_throughput(engine, prompts: list[list[int]], output_len: int, concurrency: int) -> OfflineRun:
    """Output tok/s with ``concurrency`` requests always in flight (refilled as each finishes)."""
    from tureen.bench.metrics import offline_tpot_ms
    from tureen.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    pending = list(enumerate(prompts))
    produced = 0
    in_flight = 0
    tpots: list[float] = []
    cpu0, start = time.process_time(), time.perf_counter()
    while pending or in_flight:
        while pending and in_flight < concurrency:
            i, ids = pending.pop(0)
            engine.add_request(f"bench-{concurrency}-{i}", ids, params, prompt_token_ids=ids)
            in_flight += 1
        for out in engine.step():
            if out.finished:
                in_flight -= 1
                produced += sum(len(c.token_ids) for c in out.outputs)
                tpots.extend(offline_tpot_ms(out))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return OfflineRun(produced / wall, statistics.median(tpots) if tpots else 0.0, cpu, produced)


def random_prompts(tokenizer, n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    allowed = [t for t in range(tokenizer.vocab_size) if t not in special]
    return [[rng.choice(allowed) for _ in range(length)] for _ in range(n)]


class Offline:
    """The offline engine, loaded once in this process and warmed up."""

    def __init__(self, args: argparse.Namespace) -> None:
        from tureen import LLM

        self.llm = LLM(args.model, **_engine_kwargs(args))
        self.engine = self.llm.llm_engine
        self.output_len = args.output_len
        offline_throughput(self.engine, random_prompts(self.engine.tokenizer, WARMUP_REQUESTS, args.input_len, 1),
                           8, WARMUP_REQUESTS)
        self.num_prompts, self.input_len = args.num_prompts, args.input_len

    def measure(self, level: Level, seed: int) -> OfflineRun:
        prompts = random_prompts(self.engine.tokenizer, level.num_prompts, self.input_len, seed)
        return offline_throughput(self.engine, prompts, self.output_len, level.concurrency)


# --------------------------------------------------------------------------------------- HTTP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, log) -> subprocess.Popen:
    kw = _engine_kwargs(args)
    cmd = [sys.executable, "-m", "tureen.cli", "serve", *([args.model] if args.model else []),
           "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(kw["max_num_seqs"]),
           "--max-model-len", str(kw["max_model_len"]), "--kv-cache-memory", str(kw["kv_cache_memory"]),
           "--decode-runtime", kw["decode_runtime"], "--disable-uvicorn-access-log", "--max-queue-len", "1024"]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("tureen serve exited before it was healthy")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"tureen serve was not healthy within {timeout} s")


def bench_client(url: str, args: argparse.Namespace, level: Level, warmup: int, seed: int,
                 out: Path) -> tuple[float, float]:
    """Run ``tureen bench serve`` in a child process; returns (its CPU seconds, its wall seconds)."""
    cmd = [sys.executable, "-m", "tureen.cli", "bench", "serve", "--base-url", url, "--dataset", "random",
           "--input-len", str(args.input_len), "--output-len", str(args.output_len),
           "--num-prompts", str(level.num_prompts), "--ignore-eos", "--max-concurrency", str(level.concurrency),
           "--warmup", str(warmup), "--seed", str(seed), "--save-result", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"tureen bench serve failed with exit code {proc.returncode}")
    return usage.ru_utime + usage.ru_stime, time.perf_counter() - start


def measure_http(url: str, server: "ServerProcesses", args: argparse.Namespace, level: Level, warmup: int,
                 seed: int, workdir: Path) -> None:
    """One ``tureen bench serve`` run (after a warm-up run when asked), with its server-side costs."""
    out = workdir / f"serve-{level.concurrency}-{len(level.http_tok_s)}.json"
    if warmup:  # warm the server up first, so the CPU and hand-off counts below hold the timed run only
        bench_client(url, args, Level(level.concurrency, warmup), 0, seed + 10_000, out)
    before_cpu, before_handoff = server.cpu_s(), scrape_handoff(url)
    cpu, wall = bench_client(url, args, level, 0, seed, out)
    after_cpu, after_handoff = server.cpu_s(), scrape_handoff(url)
    doc = json.loads(out.read_text())
    tokens = doc.get("total_output_tokens") or level.num_prompts * args.output_len
    cpu = doc.get("client_cpu_s", cpu)  # the timed run alone, without the client's start-up
    level.client_cpu_s.append(cpu)
    level.client_wall_s.append(wall)
    level.http_tok_s.append(doc["output_throughput"])
    level.http_latency_ms.append({k: doc[k] for k in ("median_ttft_ms", "p99_ttft_ms", "median_itl_ms",
                                                       "p99_itl_ms", "median_tpot_ms") if k in doc})
    level.cpu_us_per_token.append({"api": (after_cpu[0] - before_cpu[0]) / tokens * 1e6,
                                   "engine": (after_cpu[1] - before_cpu[1]) / tokens * 1e6,
                                   "client": cpu / tokens * 1e6})
    level.handoff_ms.append(handoff_summary(before_handoff, after_handoff))


# -------------------------------------------------------------------- server-side accounting


class ServerProcesses:
    """CPU seconds of ``tureen serve``'s API process and of its engine core child (Linux /proc)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_s(self) -> tuple[float, float]:
        children = _children(self.pid)
        return _proc_cpu_s(self.pid), sum(_proc_cpu_s(c) for c in children)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in task.read_text().split()]
        except OSError:
            pass
    return out


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process; 0 where /proc is not there."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape_handoff(url: str) -> dict[float, float]:
    """Cumulative bucket counts of the server's step-to-SSE-write histogram, plus its sum under -1."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    name = HANDOFF_METRIC
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name + "_bucket":
                buckets[float(sample.labels["le"])] = buckets.get(float(sample.labels["le"]), 0.0) + sample.value
            elif sample.name == name + "_sum":
                buckets[-1.0] = buckets.get(-1.0, 0.0) + sample.value
    return buckets


def handoff_summary(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """p50 / p99 (linear within a bucket, as Prometheus' histogram_quantile) and mean, in ms, of one run."""
    delta = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
    total_s = delta.pop(-1.0, 0.0)
    edges = sorted(delta)
    count = delta.get(math.inf, 0.0)
    if not edges or count <= 0:
        return {}
    return {"p50": histogram_quantile(0.5, edges, delta) * 1000, "p99": histogram_quantile(0.99, edges, delta) * 1000,
            "mean": total_s / count * 1000, "count": count}


def histogram_quantile(q: float, edges: list[float], cumulative: dict[float, float]) -> float:
    """The q-quantile from cumulative bucket counts ``le -> count`` (edges ascending, +Inf last)."""
    rank = q * cumulative[edges[-1]]
    lower, below = 0.0, 0.0
    for le in edges:
        count = cumulative[le]
        if count >= rank:
            if math.isinf(le):
                return lower  # beyond the last finite bucket: its upper edge is all one can say
            return lower + (le - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = le, count
    return lower


def run_rounds(args: argparse.Namespace, levels: list[Level], workdir: Path) -> None:
    """Server up, offline engine loaded; then per round and level, offline and HTTP back to back:
    offline first in even rounds, HTTP first in odd ones, so a machine whose speed drifts within a
    round favours neither side over an even number of rounds."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(workdir / "server.log", "w") as log:
        server = start_server(args, port, log)
        try:
            offline = Offline(args)
            wait_healthy(url, server)
            for round_ in range(args.repeat):
                for i, level in enumerate(levels):
                    seed = 100 + round_ * len(levels) + i  # fresh prompts every run: no prefix-cache hits
                    http_first = round_ % 2 == 1
                    if http_first:
                        measure_http(url, ServerProcesses(server.pid), args, level, 0, seed, workdir)
                    run = offline.measure(level, seed)
                    level.offline_tok_s.append(run.tok_s)
                    level.offline_tpot_ms.append(run.tpot_ms)
                    if not http_first:
                        measure_http(url, ServerProcesses(server.pid), args, level,
                                     WARMUP_REQUESTS if round_ == 0 else 0, seed, workdir)
                    level.cpu_us_per_token[-1]["offline"] = run.cpu_s / max(run.tokens, 1) * 1e6
                    print(f"round {round_ + 1}, {level.concurrency} streams: offline {level.offline_tok_s[-1]:.1f}, "
                          f"HTTP {level.http_tok_s[-1]:.1f} output tok/s", file=sys.stderr)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


# ------------------------------------------------------------------------------------ report


def _spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def report(levels: list[Level], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Offline vs HTTP: {args.num_prompts} requests x {args.input_len} in / {args.output_len} "
                        f"out, EOS ignored; median (min-max) of {args.repeat} round(s)")
    for col in ("streams", "offline tok/s", "HTTP tok/s", "HTTP / offline", "TTFT p50 / p99 ms", "ITL p50 / p99 ms",
                "client CPU s / wall s"):
        table.add_column(col, justify="right")
    for lv in levels:
        lat = lv.http_latency_ms

        def pick(key: str) -> float:
            return statistics.median(d.get(key, 0.0) for d in lat)
        table.add_row(str(lv.concurrency), _spread(lv.offline_tok_s, ".0f"), _spread(lv.http_tok_s, ".0f"),
                      _spread(lv.ratios, ".3f"), f"{pick('median_ttft_ms'):.0f} / {pick('p99_ttft_ms'):.0f}",
                      f"{pick('median_itl_ms'):.1f} / {pick('p99_itl_ms'):.1f}",
                      f"{statistics.median(lv.client_cpu_s):.2f} / {statistics.median(lv.client_wall_s):.1f}")
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 140)
    console.print(table)
    console.print(cost_table(levels))
    if args.save_result:
        doc = {"levels": [asdict(lv) | {"ratios": lv.ratios} for lv in levels], "repeat": args.repeat}
        Path(args.save_result).write_text(json.dumps(doc, indent=2) + "\n")


def _median_of(rows: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else None


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def cost_table(levels: list[Level]):
    """Where the HTTP path's time goes: CPU per output token by process, the hand-off, TPOT."""
    from rich.table import Table

    table = Table(title="Per output token: CPU us by process (median of rounds); step end -> SSE write; "
                        "median TPOT, offline (batch = streams) vs HTTP")
    for col in ("streams", "offline engine", "HTTP engine core", "API server", "client", "hand-off p50 / p99 / mean ms",
                "TPOT offline / HTTP ms", "HTTP / offline TPOT"):
        table.add_column(col, justify="right")
    for lv in levels:
        cpu = lv.cpu_us_per_token
        off = statistics.median(lv.offline_tpot_ms) if lv.offline_tpot_ms else None
        http = _median_of(lv.http_latency_ms, "median_tpot_ms")
        table.add_row(str(lv.concurrency), *(_fmt(_median_of(cpu, k), ".0f") for k in ("offline", "engine", "api",
                                                                                        "client")),
                      " / ".join(_fmt(_median_of(lv.handoff_ms, k), ".2f") for k in ("p50", "p99", "mean")),
                      f"{_fmt(off, '.2f')} / {_fmt(http, '.2f')}",
                      _fmt(http / off if off and http else None, ".2f"))
    return table


def run(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    levels = build_levels(args)
    with tempfile.TemporaryDirectory(prefix="tureen-http-overhead-") as tmp:
        try:
            run_rounds(args, levels, Path(tmp))
        except RuntimeError as exc:
            print(f"error: {exc}\n--- server log ---\n{(Path(tmp) / 'server.log').read_text()[-4000:]}",
                  file=sys.stderr)
            return 1
    report(levels, args)
    return 0
