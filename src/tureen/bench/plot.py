"""PNG charts of a benchmark with matplotlib's Agg canvas (no display, no global backend switch).

A sweep draws the batch-size trade-off: output throughput against p99 TTFT and p99 TPOT, one
point per concurrency level, plus the TTFT and E2E latency CDFs per level. A single run draws
the TTFT and E2E latency histograms with their CDFs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from tureen.bench.serve import RunResult


def plot_results(path: Path, results: list["RunResult"], *, sweep: bool) -> None:
    if sweep:
        fig = Figure(figsize=(12, 9), layout="constrained")
        axes = fig.subplots(2, 2)
        _tradeoff(axes[0][0], results, "p99_ttft_ms", "p99 TTFT (ms)")
        _tradeoff(axes[0][1], results, "p99_tpot_ms", "p99 TPOT (ms)")
        for result in results:
            label = f"c={result.concurrency}"
            _cdf(axes[1][0], _ms(result, "ttft"), label)
            _cdf(axes[1][1], _ms(result, "e2el"), label)
        _label_cdf(axes[1][0], "TTFT distribution")
        _label_cdf(axes[1][1], "E2E latency distribution")
    else:
        fig = Figure(figsize=(12, 4.5), layout="constrained")
        axes = fig.subplots(1, 2)
        _histogram(axes[0], _ms(results[0], "ttft"), "TTFT")
        _histogram(axes[1], _ms(results[0], "e2el"), "E2E latency")
    fig.suptitle("tureen bench serve")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)


def _ms(result: "RunResult", metric: str) -> np.ndarray:
    return np.asarray([getattr(r, metric) * 1000.0 for r in result.records if r.success])


def _tradeoff(ax: Axes, results: list["RunResult"], key: str, ylabel: str) -> None:
    x = [r.metrics["output_throughput"] for r in results]
    y = [r.metrics[key] for r in results]
    ax.plot(x, y, marker="o")
    for xi, yi, r in zip(x, y, results):
        ax.annotate(f"c={r.concurrency}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("output throughput (tok/s)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"throughput vs {ylabel.split(' (')[0]}")
    ax.grid(True, alpha=0.3)


def _cdf(ax: Axes, values: np.ndarray, label: str) -> None:
    if values.size:
        xs = np.sort(values)
        ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=label)


def _label_cdf(ax: Axes, title: str) -> None:
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _histogram(ax: Axes, values: np.ndarray, name: str) -> None:
    ax.set_title(f"{name} distribution ({values.size} requests)")
    ax.set_xlabel("ms")
    ax.set_ylabel("requests")
    if not values.size:
        ax.text(0.5, 0.5, "no successful requests", ha="center", va="center", transform=ax.transAxes)
        return
    ax.hist(values, bins=min(50, max(5, values.size // 2)), alpha=0.6)
    cdf_ax = ax.twinx()
    _cdf(cdf_ax, values, "CDF")
    cdf_ax.set_ylabel("CDF")
    cdf_ax.set_ylim(0, 1.02)
    for p in (50, 99):
        v = float(np.percentile(values, p))
        ax.axvline(v, linestyle="--", linewidth=1, color="gray")
        ax.annotate(f"p{p}={v:.0f}", (v, 0), textcoords="offset points", xytext=(3, 10), fontsize=8)
