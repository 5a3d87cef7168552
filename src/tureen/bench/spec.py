"""``tureen bench spec``: speculative decoding against none, side by side in one process.

Every method gets its own engine (the draft models load once); each (workload, batch size)
cell runs the same prompts and greedy parameters through every engine, in rotating order per
repeat, so a shared machine's noise falls on all of them alike. Reported per cell and method:
output tok/s (median), the speedup over no speculation, the acceptance rate (accepted / drafted
tokens) and the mean acceptance length (tokens per verified draft, the target's own included).

Workloads: ``echo`` prompts carry a passage the answer should repeat (code edits, extraction: the
n-gram proposer's home ground); ``ordinary`` prompts are plain text with nothing to copy. On the
demo model (random weights) neither answer means anything; what speculation can exploit is
whatever repetition the model's own output has, so read the acceptance column with the speedup.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

from tureen.bench.spec_metrics import SpecCounters
from tureen.entrypoints.engine_args import add_engine_args, engine_kwargs_from_args

METHODS = {
    "ngram": {"method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 5},
    "self-int8": {"method": "draft_model", "model": "self", "quantization": "int8"},
    "self-int4": {"method": "draft_model", "model": "self", "quantization": "int4"},
}

_PASSAGE = ("def merge(left, right):\n    out = []\n    i = j = 0\n    while i < len(left) and j < len(right):\n"
            "        if left[i] <= right[j]:\n            out.append(left[i])\n            i += 1\n        else:\n"
            "            out.append(right[j])\n            j += 1\n    return out + left[i:] + right[j:]\n")
_ORDINARY = ("The committee met on a rainy Tuesday to discuss the harbour budget, the ferry timetable and "
             "a proposal to plant trees along the northern road, and agreed to meet again in spring. ")


@dataclass
class Cell:
    workload: str
    batch_size: int
    method: str
    tokens_per_s: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)  # per run: the median request's time per token after the first
    counters: SpecCounters = SpecCounters()

    @property
    def median_tokens_per_s(self) -> float:
        return statistics.median(self.tokens_per_s)

    @property
    def median_tpot_ms(self) -> float | None:
        return statistics.median(self.tpot_ms) if self.tpot_ms else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    g = p.add_argument_group("workload")
    g.add_argument("--methods", default="ngram,self-int8,self-int4",
                   help=f"Comma-separated: {', '.join(METHODS)}, or draft:PATH for a draft checkpoint "
                        "(default: ngram,self-int8,self-int4).")
    g.add_argument("--num-speculative-tokens", type=int, default=4, help="k for every method (default: 4).")
    g.add_argument("--batch-sizes", default="1,32", help="Comma-separated batch sizes (default: 1,32).")
    g.add_argument("--workloads", default="echo,ordinary", help="echo and/or ordinary (default: both).")
    g.add_argument("--output-len", type=int, default=128, help="max_tokens per request (default: 128).")
    g.add_argument("--repeats", type=int, default=2, help="Rotating repeats per cell (default: 2).")
    g.add_argument("--disable-by-batch-size", type=int, default=16,
                   help="Speculation's running-request threshold for every method (0: never off; default 16).")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads for every engine (default: torch's own choice). 1 keeps the ratios steady "
                        "on a shared machine, where parallel regions wait on descheduled threads.")
    g.add_argument("--workload-seed", type=int, default=0, help="Seed for prompt variation (default: 0).")
    g.add_argument("--save-result", default=None, help="Write the figures as JSON to this file.")
    g.add_argument("--plot", default=None, help="Write a PNG of tok/s per cell and method.")
    # One engine per method lives at once (a draft's KV cache matches its target's): keep each small.
    p.set_defaults(func=run, kv_cache_memory="256MiB", max_num_seqs=64)


def method_specs(args: argparse.Namespace) -> dict[str, dict | None]:
    specs: dict[str, dict | None] = {"none": None}
    threshold = args.disable_by_batch_size or None
    for name in filter(None, (m.strip() for m in args.methods.split(","))):
        if name.startswith("draft:"):
            base = {"method": "draft_model", "model": name.removeprefix("draft:")}
        elif name in METHODS:
            base = METHODS[name]
        else:
            raise SystemExit(f"unknown method {name!r}; use {', '.join(METHODS)} or draft:PATH")
        specs[name] = {**base, "num_speculative_tokens": args.num_speculative_tokens,
                       "disable_by_batch_size": threshold}
    return specs


def workload_prompts(tokenizer, name: str, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        if name == "echo":
            text = _PASSAGE.replace("merge", rng.choice(["merge", "join", "zip_sorted", "combine"])) + f"# {i}\n"
            out.append(tokenizer.encode(f"Repeat this code exactly.\n{text}\nThe same code:\n{text[:40]}"))
        elif name == "ordinary":
            words = _ORDINARY.split()
            rng.shuffle(words)
            out.append(tokenizer.encode(" ".join(words) + f" ({i})"))
        else:
            raise SystemExit(f"unknown workload {name!r}; use echo or ordinary")
    return out


def _timed(llm, prompts, params, cell: Cell) -> None:
    from tureen.bench.metrics import offline_tpot_ms

    before = llm.llm_engine.scheduler.spec_stats.snapshot()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    cell.tokens_per_s.append(sum(len(o.outputs[0].token_ids) for o in outs) / seconds)
    tpots = [t for o in outs for t in offline_tpot_ms(o)]
    if tpots:
        cell.tpot_ms.append(statistics.median(tpots))
    delta = llm.llm_engine.scheduler.spec_stats.delta(before)
    step = SpecCounters(delta.num_drafts, delta.num_draft_tokens, delta.num_accepted_tokens)
    cell.counters = cell.counters.plus(step)


def run(args: argparse.Namespace) -> int:
    import torch

    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # the caller's setting, when run in-process


def _run(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from tureen import LLM, SamplingParams

    kwargs = engine_kwargs_from_args(args)
    kwargs.pop("speculative_config", None)
    kwargs["dtype"] = "float32" if kwargs.get("dtype") == "auto" else kwargs.get("dtype")
    specs = method_specs(args)
    llms = {label: LLM(args.model, speculative_config=spec, **kwargs) for label, spec in specs.items()}
    tokenizer = llms["none"].get_tokenizer()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    cells: list[Cell] = []
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for llm in llms.values():  # warm-up: kernels, allocator, caches
        llm.generate(workload_prompts(tokenizer, "ordinary", 2, 99), SamplingParams(max_tokens=8), use_tqdm=False)
    with Progress() as bar:
        task = bar.add_task("cells", total=len(workloads) * len(batches) * args.repeats)
        for workload in workloads:
            for batch in batches:
                prompts = workload_prompts(tokenizer, workload, batch, args.workload_seed)
                row = {label: Cell(workload, batch, label) for label in llms}
                cells += row.values()
                labels = list(llms)
                for r in range(args.repeats):
                    for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                        _timed(llms[label], prompts, params, row[label])
                    bar.update(task, advance=1)
                bar.console.print(f"{workload} batch {batch}: " + ", ".join(  # partial results as they come
                    f"{c.method} {c.median_tokens_per_s:.1f} tok/s" for c in row.values()))
    _report(args, cells)
    return 0


def summary(cells: list[Cell]) -> list[dict]:
    """One row per cell. ``speedup`` is end to end (prefill included, as a client sees a whole
    request); ``decode_speedup`` compares the time per token after the first, what speculation
    itself changes."""
    base = {(c.workload, c.batch_size): c for c in cells if c.method == "none"}
    return [{**{k: v for k, v in asdict(c).items() if k != "counters"}, **asdict(c.counters),
             "median_tokens_per_s": c.median_tokens_per_s,
             "speedup": c.median_tokens_per_s / base[(c.workload, c.batch_size)].median_tokens_per_s,
             "median_tpot_ms": c.median_tpot_ms,
             "decode_speedup": _ratio(base[(c.workload, c.batch_size)].median_tpot_ms, c.median_tpot_ms),
             "acceptance_rate": c.counters.acceptance_rate, "mean_acceptance_length": c.counters.mean_acceptance_length}
            for c in cells]


def _ratio(base: float | None, value: float | None) -> float | None:
    return base / value if base and value else None


def _report(args: argparse.Namespace, cells: list[Cell]) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = summary(cells)
    table = Table(title=f"Speculative decoding, k={args.num_speculative_tokens}, greedy, {args.output_len} tokens "
                        f"per request (median of {args.repeats} rotating runs)")
    for col in ("workload", "batch", "method", "tok/s", "speedup", "TPOT ms", "decode speedup", "acceptance",
                "mean accepted length"):
        table.add_column(col, justify="right")
    threshold = args.disable_by_batch_size or None
    for r in rows:
        off = r["method"] != "none" and threshold is not None and r["batch_size"] > threshold
        table.add_row(r["workload"], str(r["batch_size"]), r["method"], f"{r['median_tokens_per_s']:.1f}",
                      f"{r['speedup']:.2f}x", "-" if r["median_tpot_ms"] is None else f"{r['median_tpot_ms']:.2f}",
                      "-" if r["decode_speedup"] is None else f"{r['decode_speedup']:.2f}x",
                      "off (threshold)" if off else
                      "-" if r["method"] == "none" else "no drafts" if r["acceptance_rate"] is None else
                      f"{100 * r['acceptance_rate']:.1f}%",
                      "-" if r["mean_acceptance_length"] is None else f"{r['mean_acceptance_length']:.2f}")
    console = Console()
    if not console.is_terminal:  # a log file: no reason to wrap at 80 columns
        console = Console(width=160)
    console.print(table)
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(rows, f, indent=2)
    if args.plot:
        _plot(rows, args.plot)


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["workload"], r["batch_size"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(2 + 2 * len(groups), 4))
    for m, method in enumerate(methods):
        values = [next(r["median_tokens_per_s"] for r in rows if (r["workload"], r["batch_size"]) == g
                       and r["method"] == method) for g in groups]
        ax.bar([i + m * width for i in range(len(groups))], values, width, label=method)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [f"{w}\nbatch {b}" for w, b in groups])
    ax.set_ylabel("output tok/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
