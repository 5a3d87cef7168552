"""``tureen bench soak --base-url URL --duration 10m``: a long mixed load, then every invariant checked.

``--concurrency`` streams run for ``--duration``. Each request is one of: a greedy stream (its text
must equal the offline engine's for the same prompt, with ``--model``; else the first answer seen
for that prompt), a stream the client leaves after two chunks (``--disconnect-share``), a bad
request (``--bad-share``: it must get a 4xx with the OpenAI error JSON), or a sampled request with
``n`` = 2, a seed and stop strings. Meanwhile ``/metrics`` and ``/health`` are polled, and the RSS
of each ``--pid`` process (with its children) sampled. Asserted at the end:

- zero lost requests: each got a complete answer, a documented error (4xx, or 503/504 with the
  OpenAI error JSON), or a disconnect the client caused;
- zero unplanned 5xx; zero greedy mismatches;
- zero leaked KV blocks on every engine: running and waiting back to 0, KV usage back to its idle
  value. The engines are ``--metrics-url`` (repeat it for each replica behind a gateway; default:
  ``--base-url`` itself);
- each ``--pid``'s RSS growth between the first and last minute (first and last fifth for short
  runs) under ``--max-rss-growth``.

The report (``--save-result``) and a PNG (``--plot``) give TTFT/ITL p50/p99 per time window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tureen.bench.fuzz import metrics_snapshot
from tureen.bench.fuzz_cases import is_openai_error

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The quick brown fox",
           "In the beginning", "A list of prime numbers:", "Dear colleague,", "The weather today"]
BAD_BODIES: list[Any] = [b"{not json", {"prompt": "x", "n": 0}, {"prompt": "x", "max_tokens": -3},
                         {"prompt": [10 ** 9]}, {"prompt": "x", "temperature": "hot"}, {"messages": "nope"}]
GREEDY_TOKENS = 16


@dataclass
class Outcome:
    kind: str  # greedy | disconnect | bad | sampled
    start: float
    status: int | None = None
    result: str = "lost"  # complete | documented_error | client_disconnect | lost | unplanned_5xx | mismatch
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    detail: str = ""


@dataclass
class SoakConfig:
    base_url: str
    duration: float = 600.0
    concurrency: int = 64
    disconnect_share: float = 0.3
    bad_share: float = 0.1
    api_key: str | None = None
    model: str | None = None  # checkpoint directory for the offline greedy references
    pids: tuple[int, ...] = ()
    max_rss_growth: float = 0.05
    window: float = 10.0
    seed: int = 0
    settle_s: float = 60.0
    metrics_urls: tuple[str, ...] = ()  # engines whose /metrics hold the KV figures (default: base_url)

    @property
    def engines(self) -> tuple[str, ...]:
        return self.metrics_urls or (self.base_url,)


class Soak:
    def __init__(self, config: SoakConfig, references: dict[str, str]) -> None:
        self.config = config
        self.references = dict(references)
        self.outcomes: list[Outcome] = []
        self.scrapes: list[dict[str, Any]] = []
        self.health: list[tuple[float, float, int]] = []  # (t, latency, status)
        self.rss: dict[int, list[tuple[float, int]]] = {pid: [] for pid in config.pids}  # per --pid, with children
        self.t0 = 0.0
        self.model: str | None = None

    # ----------------------------------------------------------------- requests

    def body(self, **fields: Any) -> dict[str, Any]:
        return {"model": self.model, **fields} if self.model else fields

    async def one(self, c: httpx.AsyncClient, rng: random.Random) -> Outcome:
        roll = rng.random()
        share = self.config
        if roll < share.bad_share:
            return await self.bad(c, rng)
        if roll < share.bad_share + share.disconnect_share:
            return await self.stream(c, Outcome("disconnect", self.now()), rng.choice(PROMPTS), leave_after=2)
        if roll < share.bad_share + share.disconnect_share + (1 - share.bad_share - share.disconnect_share) / 2:
            return await self.stream(c, Outcome("greedy", self.now()), rng.choice(PROMPTS))
        return await self.sampled(c, rng)

    async def stream(self, c: httpx.AsyncClient, out: Outcome, prompt: str, leave_after: int | None = None) -> Outcome:
        body = self.body(prompt=prompt, max_tokens=64 if leave_after else GREEDY_TOKENS, temperature=0,
                         ignore_eos=True, stream=True)
        text, chunks, last = "", 0, time.perf_counter()
        sent = last
        async with c.stream("POST", "/v1/completions", json=body) as r:
            out.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                return self.refused(out, r)
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                doc = json.loads(line[6:])
                if "error" in doc:
                    out.result, out.detail = "unplanned_5xx", f"error event: {doc['error'].get('message')}"
                    return out
                now = time.perf_counter()
                if out.ttft is None:
                    out.ttft = now - sent
                else:
                    out.itls.append(now - last)
                last = now
                text += doc["choices"][0].get("text", "")
                chunks += 1
                if leave_after is not None and chunks >= leave_after:
                    out.result = "client_disconnect"
                    return out  # leaving the block closes the connection mid-stream
        if leave_after is not None:  # finished before we left: still a complete answer
            out.result = "complete"
            return out
        return self.check_greedy(out, prompt, text)

    def check_greedy(self, out: Outcome, prompt: str, text: str) -> Outcome:
        expected = self.references.setdefault(prompt, text)
        out.result = "complete" if text == expected else "mismatch"
        if out.result == "mismatch":
            out.detail = f"{prompt!r}: got {text!r}, expected {expected!r}"
        return out

    async def sampled(self, c: httpx.AsyncClient, rng: random.Random) -> Outcome:
        out = Outcome("sampled", self.now())
        body = self.body(prompt=rng.choice(PROMPTS), max_tokens=12, n=2, seed=rng.randrange(1 << 30),
                         temperature=0.8, stop=["\n", "."])
        r = await c.post("/v1/completions", json=body)
        out.status = r.status_code
        if r.status_code != 200:
            return self.refused(out, r)
        choices = r.json().get("choices", [])
        ok = len(choices) == 2 and all(ch.get("finish_reason") in ("stop", "length") for ch in choices)
        out.result, out.detail = ("complete", "") if ok else ("lost", f"bad n=2 answer: {r.text[:200]}")
        return out

    async def bad(self, c: httpx.AsyncClient, rng: random.Random) -> Outcome:
        out = Outcome("bad", self.now())
        body = rng.choice(BAD_BODIES)
        path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
        content = body if isinstance(body, bytes) else json.dumps(self.body(**body)).encode()
        r = await c.post(path, content=content, headers={"content-type": "application/json"})
        out.status = r.status_code
        if r.status_code == 200:
            out.result, out.detail = "lost", f"a bad request was accepted: {content[:80]!r}"
            return out
        return self.refused(out, r)

    def refused(self, out: Outcome, r: httpx.Response) -> Outcome:
        documented = r.status_code < 500 or r.status_code in (503, 504)
        if documented and is_openai_error(r):
            out.result = "documented_error"
        else:
            out.result = "unplanned_5xx" if r.status_code >= 500 else "lost"
            out.detail = f"{r.status_code}: {r.text[:200]}"
        return out

    # ----------------------------------------------------------------- monitors

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def scrape(self, c: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                status = (await c.get("/health", timeout=10)).status_code
            except httpx.HTTPError:
                status = 0
            self.health.append((self.now(), time.perf_counter() - t, status))
            if len(self.health) % 5 == 0:
                await self.scrape_metrics(c)
            for pid, samples in self.rss.items():
                samples.append((self.now(), sum(_rss(p) for p in _with_children((pid,)))))
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def scrape_metrics(self, c: httpx.AsyncClient) -> None:
        """``/metrics`` of the service and of every engine behind it."""
        for url in dict.fromkeys((self.config.base_url, *self.config.engines)):
            try:
                text = (await c.get(url + "/metrics")).text
                self.scrapes.append({"t": self.now(), "url": url, "bytes": len(text)})
            except httpx.HTTPError as exc:
                self.scrapes.append({"t": self.now(), "url": url, "error": type(exc).__name__})

    async def worker(self, c: httpx.AsyncClient, i: int, deadline: float) -> None:
        rng = random.Random(self.config.seed * 1000 + i)
        while time.perf_counter() < deadline:
            start = self.now()
            try:
                out = await self.one(c, rng)
            except (httpx.HTTPError, json.JSONDecodeError) as exc:
                out = Outcome("?", start, result="lost", detail=f"{type(exc).__name__}: {exc}")
            self.outcomes.append(out)

    async def run(self, progress: Any = None) -> None:
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        limits = httpx.Limits(max_connections=self.config.concurrency + 8)
        async with httpx.AsyncClient(base_url=self.config.base_url, headers=headers, timeout=120,
                                     limits=limits) as c:
            self.t0 = time.perf_counter()
            deadline = self.t0 + self.config.duration
            stop = asyncio.Event()
            monitor = asyncio.create_task(self.scrape(c, stop))
            ticker = asyncio.create_task(_tick(progress, deadline)) if progress else None
            await asyncio.gather(*(self.worker(c, i, deadline) for i in range(self.config.concurrency)))
            stop.set()
            await monitor
            if ticker:
                ticker.cancel()


async def _tick(progress: Any, deadline: float) -> None:
    while True:
        progress(max(0.0, deadline - time.perf_counter()))
        await asyncio.sleep(1.0)


def _with_children(pids: tuple[int, ...]) -> list[int]:
    found = list(pids)
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                found += [int(p) for p in task.read_text().split()]
            except OSError:
                continue
    return found


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------- analysis


def windows(outcomes: list[Outcome], width: float) -> list[dict[str, Any]]:
    """TTFT and ITL p50/p99 per time window (requests by their start time)."""
    if not outcomes:
        return []
    rows = []
    end = max(o.start for o in outcomes)
    for lo in np.arange(0.0, end + width, width):
        inside = [o for o in outcomes if lo <= o.start < lo + width]
        ttft = [o.ttft for o in inside if o.ttft is not None]
        itl = [x for o in inside for x in o.itls]
        rows.append({"t": float(lo), "requests": len(inside),
                     **_percentiles("ttft", ttft), **_percentiles("itl", itl)})
    return rows


def _percentiles(name: str, values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"{name}_p50": None, f"{name}_p99": None}
    return {f"{name}_p50": float(np.percentile(values, 50)), f"{name}_p99": float(np.percentile(values, 99))}


def rss_growth(samples: list[tuple[float, int]], duration: float) -> float | None:
    """Mean RSS of the last minute over the first minute, less 1 (fifths for runs under 5 minutes)."""
    samples = [(t, v) for t, v in samples if v > 0]
    if len(samples) < 2:
        return None
    span = 60.0 if duration >= 300 else duration / 5
    first = [v for t, v in samples if t <= span]
    last = [v for t, v in samples if t >= samples[-1][0] - span]
    if not first or not last:
        return None
    return float(np.mean(last) / np.mean(first) - 1.0)


def settle(config: SoakConfig, idle: dict[str, float | None], url: str | None = None) -> dict[str, Any]:
    """Wait for running/waiting 0 and idle KV usage on the engine at ``url``; the leaked blocks are what stays held."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    deadline = time.monotonic() + config.settle_s
    with httpx.Client(base_url=url or config.base_url, headers=headers, timeout=10) as c:
        while True:
            now = metrics_snapshot(c)
            settled = (not now.get("vllm:num_requests_running") and not now.get("vllm:num_requests_waiting")
                       and now.get("vllm:kv_cache_usage_perc") == idle.get("vllm:kv_cache_usage_perc"))
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        blocks = _num_blocks(c)
    usage = (now.get("vllm:kv_cache_usage_perc") or 0.0) - (idle.get("vllm:kv_cache_usage_perc") or 0.0)
    return {"url": url or config.base_url, "metrics": now, "num_blocks": blocks,
            "leaked_blocks": round(usage * blocks) if blocks else None}


def settle_all(config: SoakConfig, idle: dict[str, dict[str, float | None]]) -> list[dict[str, Any]]:
    """``settle`` on every engine (the replicas behind a gateway), one after the other."""
    return [settle(config, idle[url], url) for url in config.engines]


def idle_snapshots(config: SoakConfig) -> dict[str, dict[str, float | None]]:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    snapshots = {}
    for url in config.engines:
        with httpx.Client(base_url=url, headers=headers, timeout=10) as c:
            snapshots[url] = metrics_snapshot(c)
    return snapshots


def _num_blocks(c: httpx.Client) -> int | None:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = c.get("/metrics").text
    except httpx.HTTPError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("vllm:cache_config_info") and "num_gpu_blocks" in sample.labels:
                return int(sample.labels["num_gpu_blocks"])
    return None


def offline_references(model: str, prompts: list[str] = PROMPTS) -> dict[str, str]:
    from tureen import LLM
    from tureen.sampling_params import SamplingParams

    llm = LLM(model, max_model_len=512, kv_cache_memory="64MiB")
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    texts = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    del llm  # the engine's memory goes before the load starts
    return dict(zip(prompts, texts))


def _leaked(engines: list[dict[str, Any]]) -> int | None:
    known = [e["leaked_blocks"] for e in engines if e["leaked_blocks"] is not None]
    return sum(known) if known else None


def summarize(soak: Soak, engines: list[dict[str, Any]]) -> dict[str, Any]:
    outcomes = soak.outcomes
    count = lambda result: sum(1 for o in outcomes if o.result == result)  # noqa: E731
    health_lat = [lat for _, lat, status in soak.health if status == 200]
    by_pid = {pid: {"first_bytes": s[0][1] if s else None, "last_bytes": s[-1][1] if s else None,
                    "growth": rss_growth(s, soak.config.duration)} for pid, s in soak.rss.items()}
    growths = [r["growth"] for r in by_pid.values() if r["growth"] is not None]
    report = {
        "config": {k: v for k, v in asdict(soak.config).items() if k != "api_key"},
        "requests": len(outcomes), "complete": count("complete"), "documented_errors": count("documented_error"),
        "disconnects": count("client_disconnect"), "lost": count("lost"), "unplanned_5xx": count("unplanned_5xx"),
        "greedy_checked": sum(1 for o in outcomes if o.kind == "greedy" and o.result in ("complete", "mismatch")),
        "greedy_mismatches": count("mismatch"), "reference": "offline engine" if soak.config.model else "first answer",
        "leaked_blocks": _leaked(engines), "engines": engines,
        "rss_by_pid": by_pid, "rss_growth": max(growths) if growths else None, "metrics_scrapes": len(soak.scrapes),
        "metrics_scrape_errors": sum(1 for s in soak.scrapes if "error" in s),
        "metrics_scraped_urls": sorted({s["url"] for s in soak.scrapes if "error" not in s}),
        "health_checks": len(soak.health), "health_failures": sum(1 for _, _, s in soak.health if s != 200),
        **{f"health_{k}": v for k, v in _percentiles("latency", health_lat).items()},
        "windows": windows(outcomes, soak.config.window),
        "problems": [o.detail for o in outcomes if o.result in ("lost", "unplanned_5xx", "mismatch")][:50],
    }
    report["failures"] = failures(report, soak.config)
    return report


def failures(report: dict[str, Any], config: SoakConfig) -> list[str]:
    found = []
    for key in ("lost", "unplanned_5xx", "greedy_mismatches", "metrics_scrape_errors"):
        if report[key]:
            found.append(f"{key}: {report[key]}")
    for engine in report["engines"]:
        if engine["leaked_blocks"] not in (0, None):
            found.append(f"leaked KV blocks on {engine['url']}: {engine['leaked_blocks']}")
        if engine["leaked_blocks"] is None:
            found.append(f"no KV figures on {engine['url']}/metrics (behind a gateway, pass --metrics-url per replica)")
        metrics = engine["metrics"]
        if metrics.get("vllm:num_requests_running") or metrics.get("vllm:num_requests_waiting"):
            found.append(f"requests still running or waiting on {engine['url']} at the end: {metrics}")
    for pid, rss in report["rss_by_pid"].items():
        if rss["growth"] is not None and rss["growth"] > config.max_rss_growth:
            found.append(f"RSS of pid {pid} grew {rss['growth']:.1%} (bound {config.max_rss_growth:.0%})")
    if report["greedy_checked"] == 0:
        found.append("no greedy output was checked")
    return found


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["windows"]
    t = [r["t"] for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for ax, name in zip(axes, ("ttft", "itl")):
        for q, style in (("p50", "-"), ("p99", "--")):
            values = [r[f"{name}_{q}"] * 1000 if r[f"{name}_{q}"] is not None else np.nan for r in rows]
            ax.plot(t, values, style, label=f"{name.upper()} {q}")
        ax.set_ylabel("ms")
        ax.legend()
        ax.grid(alpha=0.3)
    axes[0].set_title(f"soak {report['config']['base_url']}: {report['requests']} requests, "
                      f"{report['config']['concurrency']} streams")
    axes[1].set_xlabel(f"time since start (s), {report['config']['window']:g} s windows")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_soak(config: SoakConfig, quiet: bool = False) -> dict[str, Any]:
    references = offline_references(config.model) if config.model else {}
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    idle = idle_snapshots(config)
    with httpx.Client(base_url=config.base_url, headers=headers, timeout=10) as c:
        data = c.get("/v1/models").json().get("data") or []
    soak = Soak(config, references)
    soak.model = data[0]["id"] if data else None
    if quiet:
        asyncio.run(soak.run())
    else:
        from rich.progress import Progress

        with Progress(transient=True) as progress:
            task = progress.add_task("soak", total=config.duration)
            asyncio.run(soak.run(lambda left: progress.update(task, completed=config.duration - left)))
    return summarize(soak, settle_all(config, idle))


def parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip()
    return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", required=True, help="tureen serve or tureen gateway, e.g. http://127.0.0.1:8000.")
    parser.add_argument("--duration", default="10m", help="How long to run: 30s, 10m, 1h (default: 10m).")
    parser.add_argument("--concurrency", type=int, default=64, help="Concurrent streams (default: 64).")
    parser.add_argument("--disconnect-share", type=float, default=0.3,
                        help="Share of requests the client leaves mid-stream (default: 0.3).")
    parser.add_argument("--bad-share", type=float, default=0.1, help="Share of bad requests (default: 0.1).")
    parser.add_argument("--api-key", default=None, help="Sent as 'Authorization: Bearer KEY'.")
    parser.add_argument("--model", default=None,
                        help="Checkpoint directory: greedy outputs are compared with the offline engine's. "
                             "Default: with the first answer seen for each prompt.")
    parser.add_argument("--metrics-url", action="append", default=[],
                        help="An engine (tureen serve, vLLM) whose /metrics must show no leaked KV blocks at the "
                             "end; repeat it for each replica behind a gateway (default: --base-url).")
    parser.add_argument("--pid", type=int, action="append", default=[],
                        help="A process whose RSS (with its children's) must stay within --max-rss-growth; repeat "
                             "for several (the gateway and each replica).")
    parser.add_argument("--max-rss-growth", type=float, default=0.05, help="RSS growth bound (default: 0.05).")
    parser.add_argument("--window", type=float, default=10.0, help="Seconds per latency window (default: 10).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-result", default=None, help="Write the report as JSON here.")
    parser.add_argument("--plot", default=None, help="Write TTFT/ITL p50/p99 over time as a PNG here.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = SoakConfig(args.base_url.rstrip("/"), parse_duration(args.duration), args.concurrency,
                        args.disconnect_share, args.bad_share, args.api_key, args.model, tuple(args.pid),
                        args.max_rss_growth, args.window, args.seed,
                        metrics_urls=tuple(u.rstrip("/") for u in args.metrics_url))
    report = run_soak(config)
    print_report(report)
    if args.save_result:
        Path(args.save_result).write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report, args.plot)
    return 0 if not report["failures"] else 1


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="soak")
    table.add_column("figure")
    table.add_column("value")
    for key in ("requests", "complete", "documented_errors", "disconnects", "lost", "unplanned_5xx",
                "greedy_checked", "greedy_mismatches", "leaked_blocks", "rss_growth", "metrics_scrapes",
                "health_checks", "health_failures", "health_latency_p50", "health_latency_p99"):
        value = report[key]
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    for engine in report["engines"]:
        table.add_row(f"leaked_blocks {engine['url']}", str(engine["leaked_blocks"]))
    for pid, rss in report["rss_by_pid"].items():
        growth = "?" if rss["growth"] is None else f"{rss['growth']:+.2%}"
        table.add_row(f"rss pid {pid}", f"{(rss['first_bytes'] or 0) / 2**20:.0f} -> "
                                        f"{(rss['last_bytes'] or 0) / 2**20:.0f} MiB ({growth})")
    Console().print(table)
    Console().print("failures: " + ("; ".join(report["failures"]) or "none"))
