"""``tureen bench structured``: what output constraints cost, measured side by side in one process.

The same batch runs twice per repeat, in alternating order: every request unconstrained, then
the same requests with a fraction of them carrying a JSON schema. Sampling parameters, prompts
and seeds are identical. Throughput counts the output tokens the requests returned (every
sampled token, the final EOS of a finished grammar included) over the run's wall time; both runs
are reported with their token counts. With ``ignore_eos`` the unconstrained requests all reach
``max_tokens``; a constrained request may finish early (its JSON is complete), which only shrinks
its run's batch, so the measured loss is then an upper bound. Process CPU time per token is
reported too: on a shared machine it moves less than wall time. ``--step-timing`` breaks a step
down by phase (``engine/step_timing.py``). The grammar compile times (cold, a new schema, a cache
hit) are measured on the engine's own manager.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from tureen.entrypoints.engine_args import add_engine_args, engine_kwargs_from_args

# Nested objects, arrays, enums, numbers with ranges and string patterns; strings are long enough
# that a random-weight model keeps writing until max_tokens most of the time.
DEFAULT_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 1000000},
        "kind": {"enum": ["note", "task", "event"]},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,12}$"}, "maxItems": 8},
        "author": {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                   "required": ["name"]},
        "body": {"type": "string"},
    },
    "required": ["id", "kind", "author", "body"],
}


@dataclass
class Run:
    label: str
    seconds: float
    output_tokens: int
    bitmask_fill_seconds: float = 0.0  # inside `seconds`: the engine filling the step bitmasks
    cpu_seconds: float = 0.0  # process CPU time (every thread) over the run
    phases: dict | None = None  # --step-timing: phase -> {"wall_us", "cpu_us", "share"} per step

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def cpu_ms_per_token(self) -> float:
        return self.cpu_seconds / self.output_tokens * 1e3


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    g = p.add_argument_group("workload")
    g.add_argument("--batch-size", type=int, default=32, help="Requests in the batch (default: 32).")
    g.add_argument("--constrained-fraction", type=float, default=0.5,
                   help="Fraction of the batch that carries the JSON schema (default: 0.5).")
    g.add_argument("--input-len", type=int, default=64, help="Prompt tokens per request (default: 64).")
    g.add_argument("--output-len", type=int, default=128, help="max_tokens per request (default: 128).")
    g.add_argument("--schema", default=None, help="JSON schema file for the constrained requests "
                                                  "(default: a nested built-in schema).")
    g.add_argument("--repeats", type=int, default=3, help="Alternating repeats of the pair (default: 3).")
    g.add_argument("--workload-seed", type=int, default=0, help="Seed for prompts and sampling (default: 0).")
    g.add_argument("--parts", action="store_true",
                   help="Only time the pieces a constrained step adds (bitmask fill, mask application) against "
                        "their alternatives, interleaved in one process; no end-to-end runs.")
    g.add_argument("--step-timing", action="store_true",
                   help="Time every step's phases and print them per batch (adds a little overhead to both).")
    g.add_argument("--save-result", default=None, help="Write the figures as JSON to this file.")
    p.set_defaults(func=run)


def _params(args: argparse.Namespace, schema: dict | None, constrained: int) -> list:
    from tureen import SamplingParams, StructuredOutputsParams

    spec = None if schema is None else StructuredOutputsParams(json=schema)
    return [SamplingParams(temperature=1.0, seed=args.workload_seed + i, max_tokens=args.output_len, ignore_eos=True,
                           structured_outputs=spec if i < constrained else None) for i in range(args.batch_size)]


def _timed(llm, label: str, prompts: list[list[int]], params: list, timer=None) -> Run:
    manager = llm.llm_engine.structured
    fill_before = manager.bitmask_seconds_total
    if timer is not None:
        timer.reset()
    start, cpu_start = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return Run(label, seconds, sum(len(o.outputs[0].token_ids) for o in outs),
               manager.bitmask_seconds_total - fill_before, cpu_seconds,
               None if timer is None else timer.report())


def compile_times(llm, schema: dict) -> dict[str, float]:
    """Milliseconds: the first compile (with the vocabulary scan), a new schema, and a cache hit."""
    from tureen import StructuredOutputsParams

    manager = llm.llm_engine.structured
    times = {}
    for label, spec in (("first_ms", StructuredOutputsParams(json=schema)),
                        ("new_schema_ms", StructuredOutputsParams(json={**schema, "title": "another"})),
                        ("cache_hit_ms", StructuredOutputsParams(json=schema))):
        start = time.perf_counter()
        manager.check(spec)
        times[label] = (time.perf_counter() - start) * 1e3
    return times


def run(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from tureen import LLM

    kwargs = engine_kwargs_from_args(args)
    kwargs["dtype"] = "float32" if kwargs.get("dtype") == "auto" else kwargs.get("dtype")
    llm = LLM(args.model, **kwargs)
    schema = json.load(open(args.schema)) if args.schema else DEFAULT_SCHEMA
    tok = llm.llm_engine.tokenizer
    rng = random.Random(args.workload_seed)
    allowed = [t for t in range(tok.vocab_size) if t not in set(tok.all_special_ids)]
    prompts = [[rng.choice(allowed) for _ in range(args.input_len)] for _ in range(args.batch_size)]
    constrained = round(args.batch_size * args.constrained_fraction)
    if args.parts:
        return _run_parts(args, llm, schema, constrained)
    compiled = compile_times(llm, schema)  # also warms the grammar cache: the timed runs measure decoding
    plain, mixed = _params(args, None, 0), _params(args, schema, constrained)
    llm.generate(prompts[:4], plain[:4], use_tqdm=False)  # warm-up
    timer = llm.llm_engine.enable_step_timing() if args.step_timing else None
    runs: list[Run] = []
    with Progress() as bar:
        task = bar.add_task("repeats", total=args.repeats)
        for r in range(args.repeats):
            pair = [("unconstrained", plain), (f"{constrained}/{args.batch_size} JSON schema", mixed)]
            for label, params in (pair if r % 2 == 0 else pair[::-1]):
                runs.append(_timed(llm, label, prompts, params, timer))
            bar.update(task, advance=1)
    _report(args, runs, compiled, constrained)
    return 0


def _run_parts(args: argparse.Namespace, llm, schema: dict, constrained: int) -> int:
    from tureen.bench.structured_parts import print_parts, time_parts

    vocab_size = llm.llm_engine.runner.vocab_size
    parts = time_parts(llm.llm_engine.structured, vocab_size, schema, args.batch_size, constrained,
                       rounds=max(args.repeats, 1), seed=args.workload_seed)
    print_parts(parts, args.batch_size, constrained, vocab_size)
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump({"parts": parts, "batch_size": args.batch_size, "constrained": constrained,
                       "vocab_size": vocab_size}, f, indent=2)
    return 0


def _report(args: argparse.Namespace, runs: list[Run], compiled: dict[str, float], constrained: int) -> None:
    from rich.console import Console

    labels = list(dict.fromkeys(r.label for r in runs))
    medians = {lab: statistics.median(r.tokens_per_s for r in runs if r.label == lab) for lab in labels}
    cpu = {lab: statistics.median(r.cpu_ms_per_token for r in runs if r.label == lab) for lab in labels}
    console = Console()
    console.print(_runs_table(args, runs, labels, medians, cpu))
    if args.step_timing:
        console.print(_phase_table(runs, labels))
    loss = 1 - medians[labels[1]] / medians[labels[0]]
    cpu_loss = 1 - cpu[labels[0]] / cpu[labels[1]]
    fill_share = statistics.median(r.bitmask_fill_seconds / r.seconds for r in runs if r.label == labels[1])
    print(f"throughput loss with constraints: {loss * 100:.1f}% (target <= 10%); by process CPU time per token: "
          f"{cpu_loss * 100:.1f}%; bitmask filling: {fill_share * 100:.1f}% of the constrained runs' time; "
          f"grammar compile: first {compiled['first_ms']:.0f} ms, new schema {compiled['new_schema_ms']:.1f} ms, "
          f"cache hit {compiled['cache_hit_ms']:.2f} ms", file=sys.stderr)
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump({"runs": [asdict(r) | {"tokens_per_s": r.tokens_per_s, "cpu_ms_per_token": r.cpu_ms_per_token}
                                for r in runs], "median_tokens_per_s": medians, "median_cpu_ms_per_token": cpu,
                       "throughput_loss": loss, "cpu_time_loss": cpu_loss, "bitmask_fill_share": fill_share,
                       "compile": compiled, "constrained": constrained, "batch_size": args.batch_size}, f, indent=2)


def _runs_table(args, runs: list[Run], labels: list[str], medians: dict, cpu: dict):
    from rich.table import Table

    table = Table(title=f"Structured outputs at batch {args.batch_size} (median of {args.repeats} alternating runs)")
    for col in ("batch", "output tok/s (median)", "runs (tok/s)", "output tokens", "CPU ms/token (median)"):
        table.add_column(col, justify="right")
    for lab in labels:
        mine = [r for r in runs if r.label == lab]
        table.add_row(lab, f"{medians[lab]:.1f}", ", ".join(f"{r.tokens_per_s:.0f}" for r in mine),
                      ", ".join(sorted({str(r.output_tokens) for r in mine})), f"{cpu[lab]:.2f}")
    return table


def _phase_table(runs: list[Run], labels: list[str]):
    """Median CPU (wall) microseconds per step of each phase, per batch: where a constraint's cost lands."""
    from rich.table import Table

    table = Table(title="Per step, by phase: CPU us (wall us), median over the runs")
    table.add_column("phase")
    for lab in labels:
        table.add_column(lab, justify="right")
    phases = list(dict.fromkeys(k for r in runs for k in (r.phases or {}) if not k.startswith("layer.")))
    for phase in phases:
        cells = []
        for lab in labels:
            values = [r.phases[phase] for r in runs if r.label == lab and phase in (r.phases or {})]
            cells.append(f"{statistics.median(v['cpu_us'] for v in values):.0f} "
                         f"({statistics.median(v['wall_us'] for v in values):.0f})" if values else "-")
        table.add_row(phase, *cells)
    return table
