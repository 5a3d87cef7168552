"""Results tables (rich) and the result JSON document."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

from tureen.bench.metrics import LATENCY_METRICS, percentile_key, per_request_arrays
from tureen.bench.serve_config import ServeBenchConfig

if TYPE_CHECKING:
    from tureen.bench.serve import RunResult

_HEADERS = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
            "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
_MAX_ERROR_EXAMPLES = 5


def print_result(console: Console, config: ServeBenchConfig, result: "RunResult") -> None:
    """The ``Serving Benchmark Result`` table of one run (vLLM's rows and wording)."""
    m = result.metrics
    title = "Serving Benchmark Result"
    if result.stopped:
        title += f" (PARTIAL: stopped by {'Ctrl-C' if result.stopped == 'interrupted' else 'the deadline'})"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, value in _summary_rows(config, result):
        table.add_row(label, value)
    for metric in LATENCY_METRICS:
        table.add_section()
        name = metric.upper()
        table.add_row(f"[bold]{_HEADERS[metric]}[/bold]", "")
        table.add_row(f"Mean {name} (ms)", f"{m[f'mean_{metric}_ms']:.2f}")
        table.add_row(f"Median {name} (ms)", f"{m[f'median_{metric}_ms']:.2f}")
        for p in config.report.percentiles:
            word = percentile_key(p, metric).split("_")[0].upper()
            table.add_row(f"{word} {name} (ms)", f"{m[percentile_key(p, metric)]:.2f}")
    console.print(table)
    if "cache" in m:
        _print_cache(console, m["cache"])
    _print_failures(console, result)


def _print_cache(console: Console, stats: dict[str, Any]) -> None:
    table = Table(title="Gateway cache (x-tureen-cache)", title_justify="left")
    for column in ("answer", "requests", "share", "median TTFT (ms)"):
        table.add_column(column, justify="right")
    for answer in ("hit", "semantic-hit", "miss"):
        row = stats[answer]
        ttft = "-" if row["p50_ttft_ms"] is None else f"{row['p50_ttft_ms']:.2f}"
        table.add_row(answer, str(row["count"]), f"{row['rate']:.1%}", ttft)
    console.print(table)
    for kind, answers in stats["by_kind"].items():
        console.print(f"  {kind}: " + ", ".join(f"{a} {n}" for a, n in sorted(answers.items())))


def _summary_rows(config: ServeBenchConfig, result: "RunResult") -> list[tuple[str, str]]:
    m = result.metrics
    rows = [("Successful requests", str(m["completed"])), ("Failed requests", _failed_text(m))]
    if m["not_sent"]:
        rows.append(("Requests not sent", str(m["not_sent"])))
    if result.concurrency is not None:
        rows.append(("Maximum request concurrency", str(result.concurrency)))
    if not math.isinf(config.load.request_rate):
        rows.append(("Request rate configured (RPS)", f"{config.load.request_rate:.2f}"))
    rows += [
        ("Benchmark duration (s)", f"{m['duration']:.2f}"),
        ("Total input tokens", str(m["total_input_tokens"])),
        ("Total generated tokens", str(m["total_output_tokens"])),
        ("Request throughput (req/s)", f"{m['request_throughput']:.2f}"),
    ]
    if m["request_goodput"] is not None:
        slos = " ".join(f"{k}:{v:g}" for k, v in config.report.goodput.items())
        rows.append((f"Request goodput (req/s) [{slos}]", f"{m['request_goodput']:.2f}"))
    rows += [
        ("Output token throughput (tok/s)", f"{m['output_throughput']:.2f}"),
        ("Peak output token throughput (tok/s)", f"{m['max_output_tokens_per_s']:.2f}"),
        ("Peak concurrent requests", str(m["max_concurrent_requests"])),
        ("Total token throughput (tok/s)", f"{m['total_token_throughput']:.2f}"),
    ]
    return rows


def _failed_text(m: dict[str, Any]) -> str:
    if not m["failed"]:
        return "0"
    reasons = ", ".join(f"{k}: {v}" for k, v in m["failure_reasons"].items())
    return f"{m['failed']} ({reasons})"


def _print_failures(console: Console, result: "RunResult") -> None:
    failed = [r for r in result.records if r.sent and not r.success]
    if result.warmup_failed:
        console.print(f"[yellow]{result.warmup_failed} warm-up request(s) failed[/yellow]")
    for r in failed[:_MAX_ERROR_EXAMPLES]:
        console.print(f"[red]request {r.index}: {r.error_reason}[/red]: {r.error}", markup=True,
                      highlight=False)
    if len(failed) > _MAX_ERROR_EXAMPLES:
        console.print(f"... and {len(failed) - _MAX_ERROR_EXAMPLES} more failed request(s)")


def print_sweep(console: Console, config: ServeBenchConfig, results: list["RunResult"]) -> None:
    """One row per concurrency level: the throughput / latency trade-off at a glance."""
    table = Table(title="Concurrency sweep (latencies in ms)", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True)
    headers = ["Conc", "OK/\nfail", "Req/s", "Out\ntok/s"]
    if config.report.goodput:
        headers.append("Goodput\nreq/s")
    headers += ["TTFT\nmean", "TTFT\np99", "TPOT\nmean", "TPOT\np99", "ITL\np99", "E2EL\np99"]
    for h in headers:
        table.add_column(h, justify="right", no_wrap=True)
    for result in results:
        table.add_row(*sweep_row(config, result))
    console.print(table)


def sweep_row(config: ServeBenchConfig, result: "RunResult") -> list[str]:
    m = result.metrics
    level = str(result.concurrency) + ("*" if result.stopped else "")  # * = partial (stopped early)
    row = [level, f"{m['completed']}/{m['failed']}", f"{m['request_throughput']:.2f}",
           f"{m['output_throughput']:.1f}"]
    if config.report.goodput:
        row.append(f"{m['request_goodput']:.2f}")
    row += [f"{m['mean_ttft_ms']:.1f}", f"{m['p99_ttft_ms']:.1f}", f"{m['mean_tpot_ms']:.1f}",
            f"{m['p99_tpot_ms']:.1f}", f"{m['p99_itl_ms']:.1f}", f"{m['p99_e2el_ms']:.1f}"]
    return row


def run_document(config: ServeBenchConfig, model: str, result: "RunResult") -> dict[str, Any]:
    """One run as JSON: vLLM's top-level fields and metrics, then per-request records."""
    load = config.load
    doc: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai" if config.target.endpoint == "completions" else "openai-chat",
        "model_id": model,
        "base_url": config.target.base_url,
        "endpoint": config.target.api_path,
        "num_prompts": len(result.records),
        "request_rate": "inf" if math.isinf(load.request_rate) else load.request_rate,
        "burstiness": "inf" if math.isinf(load.burstiness) else load.burstiness,
        "max_concurrency": result.concurrency,
        "stopped": result.stopped,
        "warmup_failed": result.warmup_failed,
        "client_cpu_s": round(result.client_cpu_s, 4),  # the benchmark client's own CPU during the run
    }
    doc.update(result.metrics)
    doc.update(per_request_arrays(result.records))
    doc["requests"] = [r.to_json() for r in result.records]
    return doc


def result_document(config: ServeBenchConfig, model: str, results: list["RunResult"]) -> dict[str, Any]:
    """A single run's document, or ``{"sweep": [...]}`` with one document per level."""
    if not config.load.sweep_concurrency:
        doc = run_document(config, model, results[0])
    else:
        doc = {"model_id": model, "sweep_concurrency": list(config.load.sweep_concurrency),
               "sweep": [run_document(config, model, r) for r in results]}
    doc["config"] = config.describe()
    doc["config"]["model"] = model
    return doc


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(document, fh, indent=2, allow_nan=False, default=str)
        fh.write("\n")
