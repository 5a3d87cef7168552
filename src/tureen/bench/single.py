"""``tureen bench single [MODEL]``: one request alone, batch-1 decode, and where each step's time goes.

For each variant (default: unquantized, int8, int4 with groups of 128), in one run:

- batch-1 decode tokens per second: one prompt (``--input-len`` tokens), greedy, EOS ignored,
  ``--decode-tokens`` new tokens; the first token's time (the prefill) is measured on its own and
  taken out, as ``llama-bench -n`` does;
- the per-step breakdown of that decode (``engine/step_timing.py``): scheduling, input
  preparation, the forward pass and each decoder layer inside it, the LM head, sampling, the
  scheduler's update, output processing and detokenization, in microseconds per step;
- optionally llama.cpp's ``llama-bench`` on the same checkpoint converted to GGUF
  (``--llama-bench PATH --gguf VARIANT=FILE``), interleaved with tureen's runs so that a drifting
  machine load hits both alike, and the ratio tureen / llama.cpp.

Engines are built first; timed runs go round-robin over the variants, ``--repeats`` times, and the
best run counts. ``bench/llamacpp_compare.sh`` builds llama.cpp, converts the checkpoint and calls
this command. Writes ``bench-single.json`` and ``bench-single.png`` into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tureen.bench.quant import Variant
from tureen.entrypoints.engine_args import add_engine_args, engine_kwargs_from_args


@dataclass
class SingleResult:
    variant: str
    quantization: str | None
    decode_tokens_per_s: float = 0.0
    breakdown_us: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> wall_us, cpu_us, share
    step_us: float = 0.0
    llama_cpp_tokens_per_s: float | None = None
    llama_cpp_model: str | None = None

    @property
    def ratio(self) -> float | None:
        return self.decode_tokens_per_s / self.llama_cpp_tokens_per_s if self.llama_cpp_tokens_per_s else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    g = p.add_argument_group("single-stream benchmark")
    g.add_argument("--variants", default="none,int8,int4",
                   help="Comma-separated variants as in `tureen bench quant` (int8-a8: int8 activations), each "
                        "optionally with +lm_head (the "
                        "LM head quantized too, as llama.cpp's files have it) (default: none,int8,int4).")
    g.add_argument("--input-len", type=int, default=32, help="Prompt tokens (default: 32).")
    g.add_argument("--decode-tokens", type=int, default=128, help="New tokens per timed run (default: 128).")
    g.add_argument("--repeats", type=int, default=3, help="Timed runs per variant; the best counts (default: 3).")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads (and llama-bench -t) for every variant (default: torch's own choice).")
    g.add_argument("--llama-bench", default=None, metavar="PATH",
                   help="llama.cpp's llama-bench binary: run it side by side on the --gguf files.")
    g.add_argument("--gguf", action="append", default=[], metavar="VARIANT=FILE",
                   help="The GGUF file llama-bench runs for a variant (none=f32.gguf, int8=q8_0.gguf, ...); repeatable.")
    g.add_argument("--output-dir", default=".", help="Where bench-single.json and bench-single.png go (default: .).")
    p.set_defaults(func=run, kv_cache_memory="256MiB")


def run(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        variants = [Variant.parse(s) for s in args.variants.split(",") if s.strip()]
        ggufs = _parse_ggufs(args.gguf, variants)
    except ValueError as e:
        print(f"tureen bench single: error: {e}", file=sys.stderr)
        return 2
    if not variants or args.repeats < 1 or args.decode_tokens < 2 or args.input_len < 1:
        print("tureen bench single: error: need a variant, --repeats >= 1, --decode-tokens >= 2, --input-len >= 1",
              file=sys.stderr)
        return 2
    if ggufs and not args.llama_bench:
        print("tureen bench single: error: --gguf needs --llama-bench", file=sys.stderr)
        return 2
    base = engine_kwargs_from_args(args)
    if (base.get("quantization") is not None or base.get("quantize_lm_head")
            or base.get("quantization_activation", "none") != "none"):
        print("tureen bench single: error: pass quantization methods (and -a8, +lm_head) with --variants",
              file=sys.stderr)
        return 2
    import torch

    saved = torch.get_num_threads()
    try:
        if args.threads is not None:
            torch.set_num_threads(max(1, args.threads))
        results = _measure_all(args, variants, base, ggufs)
    finally:
        torch.set_num_threads(saved)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _print_table(results, args)
    document = {"model": args.model or "demo", "settings": {k: getattr(args, k) for k in (
        "variants", "input_len", "decode_tokens", "repeats", "threads", "llama_bench", "gguf")},
        "results": [{**asdict(r), "ratio_vs_llama_cpp": r.ratio} for r in results]}
    (out_dir / "bench-single.json").write_text(json.dumps(document, indent=2))
    plot_breakdown(out_dir / "bench-single.png", results)
    print(f"wrote {out_dir / 'bench-single.json'} and {out_dir / 'bench-single.png'}", file=sys.stderr)
    return 0


def _parse_ggufs(specs: list[str], variants: list[Variant]) -> dict[str, str]:
    """``VARIANT=FILE`` -> {variant name: file}; VARIANT as in --variants (none, int8, int4+lm_head, ...)."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise ValueError(f"--gguf takes VARIANT=FILE, got {spec!r}")
        v = Variant.parse(name)
        if v.name not in {x.name for x in variants}:
            raise ValueError(f"--gguf names variant {name!r}, which is not in --variants")
        if not Path(path).is_file():
            raise ValueError(f"--gguf file {path!r} does not exist")
        out[v.name] = path
    return out


def _measure_all(args, variants: list[Variant], base: dict, ggufs: dict[str, str]) -> list[SingleResult]:
    from rich.console import Console

    from tureen import LLM

    console = Console(stderr=True)
    llms = []
    for v in variants:
        console.print(f"[bold]{v.name}[/bold]: loading")
        llms.append(LLM(args.model, **{**base, **v.engine_kwargs()}))
    tok = llms[0].llm_engine.tokenizer
    special = set(tok.all_special_ids)
    prompt = [t for t in range(tok.vocab_size) if t not in special][100:100 + args.input_len]
    results = [SingleResult(v.name, v.quantization, llama_cpp_model=ggufs.get(v.name)) for v in variants]
    for i in range(args.repeats):
        llama_round: dict[str, float] = {}  # one llama-bench run per file and round
        for llm, r in zip(llms, results):
            console.print(f"{r.variant}: timed run {i + 1}/{args.repeats}")
            r.decode_tokens_per_s = max(r.decode_tokens_per_s, batch1_decode(llm, prompt, args.decode_tokens))
            if r.llama_cpp_model:
                if r.llama_cpp_model not in llama_round:
                    llama_round[r.llama_cpp_model] = llama_bench(args.llama_bench, r.llama_cpp_model,
                                                                 args.decode_tokens, args.threads)
                r.llama_cpp_tokens_per_s = max(r.llama_cpp_tokens_per_s or 0.0, llama_round[r.llama_cpp_model])
    for llm, r in zip(llms, results):
        timer = step_breakdown(llm, prompt, args.decode_tokens)
        r.breakdown_us, r.step_us = timer.report(), timer.step_us()
    return results


def _greedy(n: int):
    from tureen import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def batch1_decode(llm, prompt: list[int], tokens: int) -> float:
    """Decode tokens per second of one request alone: the (tokens - 1) after the first, whose time
    (the prefill) is measured on its own and subtracted."""
    def timed(n: int) -> float:
        start = time.perf_counter()
        llm.generate([prompt], _greedy(n), use_tqdm=False)
        return time.perf_counter() - start

    timed(4)  # warm-up
    first = min(timed(1) for _ in range(3))
    return (tokens - 1) / max(timed(tokens) - first, 1e-9)


def step_breakdown(llm, prompt: list[int], tokens: int):
    """One request of ``tokens`` new tokens driven step by step with the step timer on; the prefill
    step is left out, so the report is per decode step."""
    engine = llm.llm_engine
    saved = engine.step_timer
    timer = engine.enable_step_timing()
    try:
        engine.add_request("bench-single", prompt, _greedy(tokens))
        engine.step()  # the prefill (and first token)
        timer.reset()
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.step_timer = saved
        if hasattr(engine.runner, "step_timer"):
            engine.runner.step_timer = saved
    return timer


def llama_bench(binary: str, gguf: str, tokens: int, threads: int | None) -> float:
    """llama.cpp's batch-1 decode tokens per second (``llama-bench -p 0 -n tokens``, one repetition)."""
    cmd = [binary, "-m", gguf, "-p", "0", "-n", str(tokens), "-r", "1", "-o", "json"]
    if threads:
        cmd += ["-t", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    rows = json.loads(proc.stdout)
    return float(rows[0]["avg_ts"])


def _print_table(results: list[SingleResult], args) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"batch-1 decode, {args.input_len} prompt tokens, {args.decode_tokens} new tokens "
                        f"(best of {args.repeats})")
    for col in ("variant", "tok/s", "ms/token", "llama.cpp tok/s", "ratio"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r.variant, f"{r.decode_tokens_per_s:.0f}", f"{1e3 / r.decode_tokens_per_s:.2f}",
                      "-" if r.llama_cpp_tokens_per_s is None else f"{r.llama_cpp_tokens_per_s:.0f}",
                      "-" if r.ratio is None else f"{r.ratio:.2f}x")
    console = Console()
    console.print(table)
    phases = list(dict.fromkeys(k for r in results for k in r.breakdown_us))
    bd = Table(title="per decode step: wall us (thread CPU us)")
    bd.add_column("phase")
    for r in results:
        bd.add_column(r.variant, justify="right")
    for phase in phases:
        bd.add_row(phase, *(_cell(r.breakdown_us.get(phase)) for r in results))
    bd.add_row("step", *(f"{r.step_us:.0f}" for r in results))
    console.print(bd)


def _cell(v: dict[str, float] | None) -> str:
    return "-" if v is None else f"{v['wall_us']:.0f} ({v['cpu_us']:.0f})"


def plot_breakdown(path: Path, results: list[SingleResult]) -> None:
    """One stacked bar per variant: microseconds per decode step by phase (layers inside forward)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.subplots()
    phases = [p for p in dict.fromkeys(k for r in results for k in r.breakdown_us) if not p.startswith("layer.")]
    bottoms = [0.0] * len(results)
    names = [r.variant for r in results]
    for phase in phases:
        values = [r.breakdown_us.get(phase, {}).get("wall_us", 0.0) for r in results]
        ax.bar(names, values, bottom=bottoms, label=phase)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    for x, r in enumerate(results):
        label = f"{r.decode_tokens_per_s:.0f} tok/s"
        if r.llama_cpp_tokens_per_s:
            label += f"\nllama.cpp {r.llama_cpp_tokens_per_s:.0f} ({r.ratio:.2f}x)"
        ax.annotate(label, (x, bottoms[x]), ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("us per decode step (wall)")
    ax.set_ylim(0, max(bottoms + [1.0]) * 1.25)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("tureen bench single: batch-1 decode step breakdown")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)


__all__ = ["add_arguments", "run", "batch1_decode", "step_breakdown", "llama_bench", "SingleResult"]
