"""Render plans as rich tables: one plan with per-GPU and total columns, or several side by side."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tureen.plan.estimate import PlanEstimate


def fmt_bytes(n: float | None) -> str:
    """Decimal units, as GPU spec sheets and the sizing guides use (1 GB = 10^9 bytes)."""
    if n is None:
        return "-"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f}"


def fmt_int(n: float | None) -> str:
    return "-" if n is None else f"{n:,.0f}" if float(n).is_integer() else f"{n:,.1f}"


def fmt_rate(n: float | None) -> str:
    return "-" if n is None else f"{n:,.0f} tok/s" if n >= 10 else f"{n:,.2f} tok/s"


def fmt_seconds(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:,.1f} ms" if s < 1 else f"{s:,.2f} s"


def fmt_money(x: float | None) -> str:
    return "-" if x is None else f"${x:,.2f}" if x >= 0.1 else f"${x:.3g}"


def fmt_bool(b: bool | None) -> str:
    return "-" if b is None else "yes" if b else "no"


def _div(value: float | None, n: int) -> float | None:
    return None if value is None else value / n


@dataclass(frozen=True)
class Row:
    label: Callable[[PlanEstimate], str]
    per_gpu: Callable[[PlanEstimate], Any] | None
    total: Callable[[PlanEstimate], Any]
    fmt: Callable[[Any], str]


def _row(label: str | Callable[[PlanEstimate], str], per_gpu, total, fmt) -> Row:
    return Row(label if callable(label) else (lambda e, text=label: text), per_gpu, total, fmt)


SECTIONS: list[tuple[str, list[Row]]] = [
    ("Model", [
        _row("parameters", lambda e: e.params_per_gpu, lambda e: e.params, fmt_count),
        _row("weights", lambda e: e.weight_bytes_per_gpu, lambda e: e.weight_bytes, fmt_bytes),
    ]),
    ("KV cache", [
        _row("KV cache per token", lambda e: e.kv_bytes_per_token_per_gpu, lambda e: e.kv_bytes_per_token, fmt_bytes),
        _row(lambda e: f"KV cache per sequence ({e.max_model_len:,} tokens)",
             lambda e: e.kv_bytes_per_sequence_per_gpu, lambda e: e.kv_bytes_per_sequence, fmt_bytes),
        _row(lambda e: f"GPU memory ({e.memory_basis})", lambda e: e.gpu_memory_bytes_per_gpu,
             lambda e: None if e.gpu_memory_bytes_per_gpu is None else e.gpu_memory_bytes_per_gpu * e.num_gpus,
             fmt_bytes),
        _row("usable memory", lambda e: e.usable_memory_bytes_per_gpu,
             lambda e: None if e.usable_memory_bytes_per_gpu is None else e.usable_memory_bytes_per_gpu * e.num_gpus,
             fmt_bytes),
        _row("KV budget", lambda e: e.kv_budget_bytes_per_gpu, lambda e: e.kv_budget_bytes, fmt_bytes),
        _row(lambda e: f"KV blocks ({e.block_size} tokens each)", lambda e: e.num_kv_blocks,
             lambda e: e.num_kv_blocks, fmt_int),
        _row(lambda e: f"max concurrent sequences at {e.max_model_len:,} tokens",
             lambda e: e.max_concurrent_sequences / e.num_gpus, lambda e: e.max_concurrent_sequences, fmt_int),
        _row(lambda e: f"max concurrent sequences at {e.avg_prompt_len + e.avg_output_len:,} tokens (avg)",
             lambda e: e.max_concurrent_sequences_avg / e.num_gpus, lambda e: e.max_concurrent_sequences_avg,
             fmt_int),
        _row("fits", None, lambda e: e.fits, fmt_bool),
        _row("fewest GPUs that fit", None, lambda e: e.min_gpus, fmt_int),
    ]),
    ("Speed ceilings", [
        _row("decode, batch 1 (one sequence)", None, lambda e: e.decode_tokens_per_s_batch1, fmt_rate),
        _row("batch size", None, lambda e: e.batch_size, fmt_int),
        _row("decode, at that batch", lambda e: e.decode_tokens_per_s_batch_per_gpu,
             lambda e: e.decode_tokens_per_s_batch, fmt_rate),
        _row(lambda e: f"prefill of {e.avg_prompt_len:,} tokens", None, lambda e: e.prefill_seconds, fmt_seconds),
        _row("serving (prefill + decode)", lambda e: _div(e.serving_tokens_per_s, e.num_gpus),
             lambda e: e.serving_tokens_per_s, fmt_rate),
    ]),
    ("Cost", [
        _row("GPU price per hour", lambda e: e.gpu_hourly_price, lambda e: e.hourly_cost, fmt_money),
        _row("per 1K output tokens", None, lambda e: e.cost_per_1k_output_tokens, fmt_money),
        _row("per 1M output tokens", None, lambda e: e.cost_per_1m_output_tokens, fmt_money),
        _row("monthly (GPUs, 730 h)", lambda e: e.monthly_cost_per_gpu, lambda e: e.monthly_cost, fmt_money),
        _row("monthly with ops", None, lambda e: e.monthly_cost_with_ops, fmt_money),
        _row("API per 1M output tokens (with input)", None, lambda e: e.api_cost_per_1m_output_tokens, fmt_money),
        _row("break-even, output tokens/day", None, lambda e: e.breakeven_tokens_per_day, fmt_count),
        _row("break-even with ops, output tokens/day", None, lambda e: e.breakeven_tokens_per_day_with_ops,
             fmt_count),
        _row("capacity, output tokens/day", lambda e: _div(e.output_tokens_per_day_capacity, e.num_gpus),
             lambda e: e.output_tokens_per_day_capacity, fmt_count),
    ]),
]


def _device_label(e: PlanEstimate) -> str:
    return "CPU" if e.gpu is None else f"{e.num_gpus} x {e.gpu}"


def _title(e: PlanEstimate) -> str:
    return escape(f"{e.model} on {_device_label(e)}  ({e.dtype}, weights {e.weight_quant}, "
            f"KV {e.kv_cache_dtype}, max_model_len {e.max_model_len:,})")


def plan_table(e: PlanEstimate) -> Table:
    table = Table(title=_title(e), title_justify="left")
    columns = ["per GPU", "total"] if e.gpu else ["CPU"]
    table.add_column("figure")
    for name in columns:
        table.add_column(name, justify="right")
    for section, rows in SECTIONS:
        table.add_section()
        table.add_row(f"[bold]{section}[/bold]", *[""] * len(columns))
        for row in rows:
            total = row.fmt(row.total(e))
            if e.gpu:
                table.add_row(row.label(e), row.fmt(row.per_gpu(e)) if row.per_gpu else "", total)
            else:
                table.add_row(row.label(e), total)
    return table


def compare_table(estimates: list[PlanEstimate]) -> Table:
    first = estimates[0]
    table = Table(title=escape(f"{first.model}: totals per replica  ({first.dtype}, weights {first.weight_quant}, "
                        f"KV {first.kv_cache_dtype}, max_model_len {first.max_model_len:,})"), title_justify="left")
    table.add_column("figure")
    for e in estimates:
        table.add_column(_device_label(e), justify="right")
    for section, rows in SECTIONS:
        table.add_section()
        table.add_row(f"[bold]{section}[/bold]", *[""] * len(estimates))
        for row in rows:
            table.add_row(row.label(first), *[row.fmt(row.total(e)) for e in estimates])
    return table


def print_notes(console: Console, estimates: list[PlanEstimate]) -> None:
    for e in estimates:
        for note in e.notes:
            prefix = f"{_device_label(e)}: " if len(estimates) > 1 else ""
            console.print(escape(f"note: {prefix}{note}"))
