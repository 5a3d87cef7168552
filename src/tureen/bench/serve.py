"""``tureen bench serve``: load an OpenAI-compatible server and measure it like ``vllm bench serve``.

Flow: resolve the model (``GET /v1/models``) and a token codec, build the prompts, then for each
concurrency level (one, or each of ``--sweep-concurrency``) send every prompt on a Poisson/gamma
arrival schedule through a semaphore, streaming each response. Every run is bounded by
``--timeout`` per request and an overall deadline; Ctrl-C stops the run and the partial results
are still reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tureen.bench.client import RequestRecord, build_payload, first_model_id, make_http_client, send_request, \
    sync_http_client
from tureen.bench.datasets import SampleRequest, build_samples
from tureen.bench.metrics import compute_metrics
from tureen.bench.report import print_result, print_sweep, result_document, write_json
from tureen.bench.serve_config import LoadConfig, ServeBenchConfig, TargetConfig
from tureen.bench.spec_metrics import scrape_spec_counters
from tureen.bench.sse_client import StreamingClient
from tureen.bench.token_codec import LocalCodec, ServerCodec, TokenCodec

DEADLINE_SLACK_S = 30.0


def arrival_offsets(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send times (seconds from the run's start) of ``n`` requests.

    Gaps are gamma-distributed with shape ``burstiness`` and scale ``1/(rate*burstiness)`` (mean
    ``1/rate``); shape 1 is a Poisson process. As in vLLM, the times are rescaled so the last
    one lands at ``n/rate``, which keeps throughput comparable across seeds. ``rate=inf`` sends
    everything at once.
    """
    if math.isinf(rate):
        return np.zeros(n)
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / rate)
    else:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    times = np.cumsum(gaps)
    return times * ((n / rate) / times[-1]) if times[-1] > 0 else times


@dataclass
class RunPlan:
    """One timed run: these samples, at these send times, with this many in flight at most."""

    samples: list[SampleRequest]
    model: str
    concurrency: int | None
    offsets: np.ndarray
    deadline_s: float
    warmup: int = 0


@dataclass
class RunResult:
    concurrency: int | None
    records: list[RequestRecord]
    duration: float
    stopped: str | None = None  # None, "interrupted" (Ctrl-C) or "deadline"
    warmup_failed: int = 0
    client_cpu_s: float = 0.0  # this process's CPU time during the timed run (after the warm-up)
    metrics: dict[str, Any] = field(default_factory=dict)


def default_deadline(load: LoadConfig, target: TargetConfig, n: int, concurrency: int | None,
                     last_arrival: float) -> float:
    """A bound the run cannot exceed: arrival span + a full timeout per concurrency "wave"."""
    if load.max_duration is not None:
        return load.max_duration
    waves = math.ceil(n / concurrency) if concurrency else 1
    return last_arrival + waves * target.timeout + DEADLINE_SLACK_S


async def execute_run(target: TargetConfig, plan: RunPlan,
                      on_done: Callable[[RequestRecord], None] = lambda r: None) -> RunResult:
    """Send every request of ``plan``; return when all finished, on Ctrl-C, or at the deadline."""
    records = [RequestRecord(i, s.prompt_len, s.expected_output_len, kind=s.kind) for i, s in enumerate(plan.samples)]
    payloads = [build_payload(target, plan.model, s) for s in plan.samples]
    limit = asyncio.Semaphore(plan.concurrency) if plan.concurrency else contextlib.nullcontext()
    stop = asyncio.Event()
    restore_sigint = _stop_on_sigint(stop)
    try:
        async with make_http_client(target) as http:
            warmup_failed = await _warmup(http, target, payloads[0], plan.warmup, plan.concurrency)
            t0, cpu0 = time.perf_counter(), time.process_time()
            tasks: list[asyncio.Task] = []

            async def one(i: int) -> None:
                arrived = time.perf_counter()
                async with limit:
                    records[i].queue_time = time.perf_counter() - arrived
                    await _guarded_send(http, target, payloads[i], records[i], t0)
                on_done(records[i])

            async def dispatch() -> None:
                for i, offset in enumerate(plan.offsets):  # n iterations, each sleep bounded by the deadline
                    # uvloop's timers have millisecond resolution and may fire a little early: sleep again
                    while (delay := t0 + float(offset) - time.perf_counter()) > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(one(i)))
                await asyncio.gather(*tasks)

            stopped = await _wait_bounded(asyncio.create_task(dispatch()), stop, plan.deadline_s, tasks)
            duration, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        restore_sigint()
    _mark_cancelled(records, stopped)
    return RunResult(plan.concurrency, records, duration, stopped, warmup_failed, client_cpu_s=cpu)


async def _wait_bounded(main: asyncio.Task, stop: asyncio.Event, deadline_s: float,
                        tasks: list[asyncio.Task]) -> str | None:
    """Wait for ``main``; on Ctrl-C or the deadline cancel everything still running."""
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({main, stopper}, timeout=deadline_s, return_when=asyncio.FIRST_COMPLETED)
    stopped = None if main in done else ("interrupted" if stop.is_set() else "deadline")
    for task in (main, stopper, *tasks):
        task.cancel()
    await asyncio.gather(main, stopper, *tasks, return_exceptions=True)
    return stopped


async def _guarded_send(http: StreamingClient, target: TargetConfig, payload: dict[str, Any],
                        record: RequestRecord, t0: float) -> None:
    try:
        await send_request(http, target, payload, record, t0)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a client-side surprise is still a counted failure, never a lost request
        record.fail("client_error", f"{type(exc).__name__}: {exc}")


def _mark_cancelled(records: list[RequestRecord], stopped: str | None) -> None:
    why = "Ctrl-C" if stopped == "interrupted" else "the overall deadline"
    for r in records:
        if r.sent and not r.success and not r.error_reason:
            r.fail("cancelled", f"still running at {why}")


async def _warmup(http: StreamingClient, target: TargetConfig, payload: dict[str, Any], n: int,
                  concurrency: int | None) -> int:
    """Send ``n`` unmeasured copies of the first request; return how many failed."""
    if n <= 0:
        return 0
    limit = asyncio.Semaphore(concurrency) if concurrency else contextlib.nullcontext()
    records = [RequestRecord(-1, 0, 0) for _ in range(n)]

    async def one(record: RequestRecord) -> None:
        async with limit:
            await _guarded_send(http, target, payload, record, time.perf_counter())

    await asyncio.gather(*(one(r) for r in records))
    return sum(1 for r in records if not r.success)


def _stop_on_sigint(stop: asyncio.Event) -> Callable[[], None]:
    """First Ctrl-C sets ``stop`` (partial results get printed); a second one interrupts as usual."""
    loop = asyncio.get_running_loop()

    def handler() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    try:
        loop.add_signal_handler(signal.SIGINT, handler)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
        return lambda: None
    return lambda: loop.remove_signal_handler(signal.SIGINT)


def fill_output_lens(records: list[RequestRecord], codec: TokenCodec | None) -> None:
    """Output tokens for successes without ``usage``: the tokenizer, else the content-chunk count."""
    for r in records:
        if not r.success or r.output_len_source:
            continue
        if codec is not None and r.generated_text:
            r.output_len, r.output_len_source = len(codec.encode(r.generated_text)), "tokenizer"
        else:
            r.output_len, r.output_len_source = len(r.itl) + (1 if r.generated_text else 0), "chunks"


def run_level(config: ServeBenchConfig, plan: RunPlan, console: Console) -> RunResult:
    """One timed run with a progress bar."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    label = f"concurrency {plan.concurrency}" if plan.concurrency else "requests"
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=len(plan.samples))
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(execute_run(config.target, plan, lambda r: progress.advance(task)))


def _loop_factory() -> Any:
    """uvloop where installed: it halves the client's CPU time per stream chunk, CPU the server
    under test would otherwise lose on a small machine. The standard loop elsewhere."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def bench_serve(config: ServeBenchConfig, console: Console | None = None) -> tuple[int, dict[str, Any]]:
    """Run the whole benchmark; returns ``(exit code, result document)``."""
    console = console or _console()
    with sync_http_client(config.target) as client:
        model = config.target.model or first_model_id(client, wait_s=min(config.target.timeout, 120.0))
        codec: TokenCodec | None = (LocalCodec(config.target.tokenizer) if config.target.tokenizer
                                    else ServerCodec.probe(client, model))
        samples = build_samples(config.workload, codec)
        _print_header(console, config, model, samples)
        results, spec = [], SpecWatch(client, console) if config.target.speculative_config else None
        for concurrency in config.load.sweep_concurrency or (config.load.max_concurrency,):
            result = run_level(config, _plan(config, model, samples, concurrency), console)
            fill_output_lens(result.records, codec)
            result.metrics = compute_metrics(result.records, result.duration, config.report.percentiles,
                                             config.report.goodput)
            print_result(console, config, result)
            if spec is not None:
                spec.observe()
            results.append(result)
            if result.stopped == "interrupted":
                break
    if config.load.sweep_concurrency:
        print_sweep(console, config, results)
    document = result_document(config, model, results)
    if spec is not None:
        spec.annotate(document)
    _write_outputs(config, document, results, console)
    interrupted = any(r.stopped == "interrupted" for r in results)
    return (130 if interrupted else 0), document


class SpecWatch:
    """The server's speculative-decoding counters over each run (``bench/spec_metrics.py``)."""

    def __init__(self, client, console: Console) -> None:
        self.client, self.console = client, console
        self.last = scrape_spec_counters(client)
        self.levels: list[dict | None] = []
        if self.last is None:
            console.print("[yellow]--speculative-config was given, but the server's /metrics has no "
                          "vllm:spec_decode_* counters: is speculation on there?[/yellow]")

    def observe(self) -> None:
        now = scrape_spec_counters(self.client)
        if now is None or self.last is None:
            self.levels.append(None)
            return
        run, self.last = now.minus(self.last), now
        self.levels.append(run.document())
        rate, length = run.acceptance_rate, run.mean_acceptance_length
        self.console.print(f"Speculative decoding: {int(run.num_drafts)} drafts, acceptance "
                           + ("-" if rate is None else f"{100 * rate:.1f}%") + ", mean accepted length "
                           + ("-" if length is None else f"{length:.2f}"))

    def annotate(self, document: dict) -> None:
        """Each run's counters into the result document (``speculative_decoding``)."""
        runs = document.get("sweep", [document])
        for run, level in zip(runs, self.levels):
            run["speculative_decoding"] = level


def _console() -> Console:
    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough that tables never squeeze
        console.width = max(console.width, 160)
    return console


def _plan(config: ServeBenchConfig, model: str, samples: list[SampleRequest], concurrency: int | None) -> RunPlan:
    rng = np.random.default_rng(config.workload.seed)
    offsets = arrival_offsets(len(samples), config.load.request_rate, config.load.burstiness, rng)
    deadline = default_deadline(config.load, config.target, len(samples), concurrency, float(offsets[-1]))
    return RunPlan(samples, model, concurrency, offsets, deadline, config.load.warmup)


def _print_header(console: Console, config: ServeBenchConfig, model: str, samples: list[SampleRequest]) -> None:
    load = config.load
    process = "Poisson process" if load.burstiness == 1.0 else "Gamma distribution"
    console.print(f"Target: {config.target.base_url}{config.target.api_path}  model: {model}")
    console.print(f"Dataset: {config.workload.dataset}, {len(samples)} prompts")
    console.print(f"Traffic request rate: {load.request_rate}")
    console.print(f"Burstiness factor: {load.burstiness} ({process})")
    levels = load.sweep_concurrency or (load.max_concurrency,)
    console.print(f"Maximum request concurrency: {', '.join(str(c) for c in levels)}")


def _write_outputs(config: ServeBenchConfig, document: dict[str, Any], results: list[RunResult],
                   console: Console) -> None:
    if config.report.save_result is not None:
        write_json(config.report.save_result, document)
        console.print(f"Results written to {config.report.save_result}")
    if config.report.plot is not None:
        from tureen.bench.plot import plot_results  # matplotlib only when asked for

        plot_results(config.report.plot, results, sweep=bool(config.load.sweep_concurrency))
        console.print(f"Plot written to {config.report.plot}")
