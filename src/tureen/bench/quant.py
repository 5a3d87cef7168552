"""``tureen bench quant MODEL``: the same checkpoint unquantized and quantized, side by side.

For each variant (default: unquantized, int8, int4 with groups of 128, fp8), in one run:

- weight memory (every parameter and packed buffer) and KV-cache bytes per token;
- offline throughput on the ``tureen bench throughput`` workload (smaller by default);
- batch-1 decode tokens per second: one prompt, greedy, EOS ignored, the prefill's time
  measured separately and taken out;
- fidelity against the first variant (the reference, unquantized by default), teacher-forced
  over a held-out text: the mean KL divergence of the next-token distributions, KL(ref || variant),
  how often both pick the same top-1 token, and the perplexity of each on the text.

Every variant's engine is built first (each with ``--kv-cache-memory``, 512 MiB by default here);
the timed runs then go round-robin over the variants, ``--repeats`` times, and the best of each
counts: the figures are ratios, and on a shared machine the load drifts. The fidelity pass runs
last on each engine: it writes KV blocks directly, behind the scheduler's back, so no request may
follow it. Perplexity says nothing on the built-in demo model, whose weights are
random; the report says so when it is used.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tureen.bench.throughput import make_workload, run_tureen
from tureen.entrypoints.engine_args import add_engine_args, engine_kwargs_from_args


@dataclass(frozen=True)
class Variant:
    """One way to load the checkpoint: a ``quantization`` value (None: as stored) and its options."""

    name: str
    quantization: str | None
    group_size: int | None = None
    activation: str = "none"  # quantization_activation
    lm_head: bool = False  # quantize_lm_head
    lm_head_method: str | None = None  # lm_head_quantization: the head's own method

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        """``none``, ``int8``, ``fp8``, ``int4`` (group 128) or ``int4:G`` (G inputs per group, -1 per row);
        any other ``--quantization`` value (gptq, awq, ...) is passed through. A ``-a8`` suffix
        (``int8-a8``, ``int4:64-a8``) adds int8 activations (``quantization_activation=int8``), and a
        final ``+lm_head`` (``int4-a8+lm_head``) quantizes the LM head the same way, or with its own
        method: ``+lm_head:int8`` (``lm_head_quantization``)."""
        base, plus, extra = spec.strip().lower().partition("+")
        suffix, _, head = extra.strip().replace("-", "_").partition(":")
        if plus and (suffix != "lm_head" or head not in ("", "int8", "int4", "fp8")):
            raise ValueError(f"unknown variant suffix {'+' + extra!r} in {spec!r} (+lm_head or +lm_head:METHOD)")
        v = cls._parse_activation(base)
        if not plus:
            return v
        if v.quantization is None:
            raise ValueError(f"{spec!r}: +lm_head needs a quantized variant")
        return cls(f"{v.name} + {head + ' ' if head else ''}LM head", v.quantization, v.group_size, v.activation,
                   lm_head=True, lm_head_method=head or None)

    @classmethod
    def _parse_activation(cls, spec: str) -> "Variant":
        a8 = spec.endswith("-a8")
        v = cls._parse_weights(spec[:-3] if a8 else spec)
        if not a8:
            return v
        if v.quantization is None:
            raise ValueError(f"{spec!r}: int8 activations (-a8) need a quantized variant")
        return cls(f"{v.name} W8A8", v.quantization, v.group_size, "int8")

    @classmethod
    def _parse_weights(cls, spec: str) -> "Variant":
        name, _, group = spec.partition(":")
        if name in ("none", "unquantized", "fp32", "float32"):
            return cls("unquantized", None)
        if name == "int4":
            g = int(group) if group else 128
            return cls(f"int4 (group {g})" if g != -1 else "int4 (per row)", "int4", g)
        if group:
            raise ValueError(f"only int4 takes a group size, got {spec!r}")
        return cls(name, name)

    def engine_kwargs(self) -> dict:
        kw: dict = {"quantization": self.quantization}
        if self.group_size is not None:
            kw["quantization_group_size"] = self.group_size
        if self.activation != "none":
            kw["quantization_activation"] = self.activation
        if self.lm_head:
            kw["quantize_lm_head"] = True
        if self.lm_head_method:
            kw["lm_head_quantization"] = self.lm_head_method
        return kw


@dataclass
class Fidelity:
    positions: int
    mean_kl: float  # nats, KL(reference || variant), averaged over positions
    top1_agreement: float
    perplexity: float
    reference_perplexity: float

    def top1_margin(self) -> float:
        """Half the 95% interval of the top-1 agreement (normal approximation to the binomial): at
        99% over 1,024 positions it is 0.6 points, over 4,096 still 0.3."""
        p = self.top1_agreement
        return 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / max(self.positions, 1))


@dataclass
class VariantResult:
    variant: str
    quantization: str | None
    weight_bytes: int
    kv_bytes_per_token: int
    kv_cache: str
    linear_kernels: list[str]
    offline_output_tokens_per_s: float
    offline_seconds: float
    batch1_decode_tokens_per_s: float
    linear_pass_us: dict[str, float] = field(default_factory=dict)  # rows -> one pass over every linear layer
    fidelity: Fidelity | None = None
    ratios: dict[str, float] = field(default_factory=dict)  # against the first variant


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    g = p.add_argument_group("quantization report")
    g.add_argument("--variants", default="none,int8,int8-a8,int4,int4-a8,fp8",
                   help="Comma-separated variants; the first is the reference: none, int8, fp8, int4 (group 128) "
                        "or int4:G, each optionally with -a8 (int8 activations: int8-a8, int4-a8) and then +lm_head "
                        "(the LM head quantized too: int4-a8+lm_head, or with its own method: "
                        "int4-a8+lm_head:int8); other --quantization values pass through "
                        "(default: none,int8,int8-a8,int4,int4-a8,fp8).")
    g.add_argument("--num-prompts", type=int, default=32, help="Requests in the offline workload (default: 32).")
    g.add_argument("--input-len", type=int, nargs=2, default=[32, 128], metavar=("MIN", "MAX"),
                   help="Offline prompt length range in tokens (default: 32 128).")
    g.add_argument("--output-len", type=int, nargs=2, default=[16, 64], metavar=("MIN", "MAX"),
                   help="Offline output length range in tokens, EOS ignored (default: 16 64).")
    g.add_argument("--workload-seed", type=int, default=0, help="Seed for the random workload (default: 0).")
    g.add_argument("--decode-tokens", type=int, default=128,
                   help="Tokens generated by the batch-1 decode measurement (default: 128).")
    g.add_argument("--repeats", type=int, default=2,
                   help="Timed runs per variant; the best counts (default: 2).")
    g.add_argument("--text-file", default=None,
                   help="Held-out text for the fidelity pass (default: the source of Python's os module, "
                        "which is not in the demo tokenizer's training text).")
    g.add_argument("--fidelity-tokens", type=int, default=4096,
                   help="Tokens of the held-out text scored, in windows of at most 512 (default: 4096; "
                        "fewer leave the top-1 agreement too uncertain to judge a 99%% target: 1,024 give "
                        "a 95%% interval of ±0.6 points there).")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads for every variant (default: torch's own choice). 1 keeps the ratios "
                        "steady on a shared machine, where parallel regions wait on descheduled threads.")
    p.set_defaults(kv_cache_memory="512MiB")  # every variant's engine is alive at once
    g.add_argument("--output-dir", default=".", help="Where bench-quant.json and bench-quant.png go (default: .).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        variants = [Variant.parse(s) for s in args.variants.split(",") if s.strip()]
    except ValueError as e:
        print(f"tureen bench quant: error: {e}", file=sys.stderr)
        return 2
    if not variants or args.repeats < 1 or args.decode_tokens < 2 or args.fidelity_tokens < 2:
        print("tureen bench quant: error: need at least one variant, --repeats >= 1, --decode-tokens >= 2 and "
              "--fidelity-tokens >= 2", file=sys.stderr)
        return 2
    base = engine_kwargs_from_args(args)
    base["dtype"] = "float32" if base.get("dtype") == "auto" else base.get("dtype")
    if base.get("quantization") is not None or base.get("quantization_activation", "none") != "none":
        print("tureen bench quant: error: pass quantization methods with --variants, not --quantization",
              file=sys.stderr)
        return 2
    import torch

    threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            torch.set_num_threads(max(1, args.threads))
        results, reference, is_demo = _measure_all(args, variants, base)
    finally:
        torch.set_num_threads(threads)  # the caller's setting, when run in-process
    _add_ratios(results)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _print_table(results, is_demo, args)
    document = {"model": args.model or "demo", "demo_model": is_demo, "settings": _settings(args),
                "perplexity_note": _PPL_NOTE if is_demo else None,
                "results": [asdict(r) for r in results]}
    (out_dir / "bench-quant.json").write_text(json.dumps(document, indent=2))
    plot_results(out_dir / "bench-quant.png", results, is_demo)
    print(f"wrote {out_dir / 'bench-quant.json'} and {out_dir / 'bench-quant.png'}", file=sys.stderr)
    return 0


_PPL_NOTE = "the demo model has RANDOM weights: its perplexity means nothing (KL and top-1 agreement still do)"


def _settings(args: argparse.Namespace) -> dict:
    keys = ("variants", "num_prompts", "input_len", "output_len", "workload_seed", "decode_tokens", "repeats",
            "fidelity_tokens", "kv_cache_dtype", "threads")
    return {k: getattr(args, k, None) for k in keys}


def _measure_all(args, variants: list[Variant], base: dict):
    """Every engine is built first and the timed runs go round-robin (variant after variant, then
    the next repeat), so that a machine whose load drifts slows every variant alike."""
    from rich.console import Console

    console = Console(stderr=True)
    llms = []
    for v in variants:
        console.print(f"[bold]{v.name}[/bold]: loading")
        llms.append(_build(args.model, base, v))
    is_demo = llms[0].llm_engine.is_demo_model
    tok = llms[0].llm_engine.tokenizer
    work = make_workload(tok.vocab_size, set(tok.all_special_ids), args)
    warmup = make_workload(tok.vocab_size, set(tok.all_special_ids), argparse.Namespace(
        **{**vars(args), "workload_seed": args.workload_seed + 1})).prompts[:8]
    timings = [Timings() for _ in variants]
    for i in range(args.repeats):
        for v, llm, t in zip(variants, llms, timings):
            console.print(f"{v.name}: timed run {i + 1}/{args.repeats}")
            t.add(llm, work, warmup, args)
    results, reference = [], None
    for v, llm, t in zip(variants, llms, timings):  # fidelity last: it writes KV blocks behind the scheduler
        result = _result(llm, v, t)
        logprobs = _held_out_logprobs(llm, args)
        reference = logprobs if reference is None else reference
        result.fidelity = _fidelity(reference, logprobs)
        results.append(result)
    del llms
    gc.collect()
    return results, reference, is_demo


def _build(model: str | None, base: dict, v: Variant):
    from tureen import LLM

    return LLM(model, **{**base, **v.engine_kwargs()})


@dataclass
class Timings:
    """The best of each timed measurement over the repeats of one variant."""

    offline_seconds: float = math.inf
    offline_tokens: int = 0
    decode_tokens_per_s: float = 0.0
    linear_pass_us: dict[str, float] = field(default_factory=dict)

    def add(self, llm, work, warmup, args) -> None:
        r = run_tureen(llm, work, warmup)
        if r.seconds < self.offline_seconds:
            self.offline_seconds, self.offline_tokens = r.seconds, r.output_tokens
        self.decode_tokens_per_s = max(self.decode_tokens_per_s,
                                       _batch1_decode(llm, work.prompts[0][:32], args.decode_tokens))
        model = llm.llm_engine.runner.model
        for rows in LINEAR_ROWS:
            us = _linear_pass_us(model, rows)
            self.linear_pass_us[str(rows)] = min(self.linear_pass_us.get(str(rows), math.inf), us)


def _result(llm, v: Variant, t: Timings) -> VariantResult:
    from tureen.executor.quantization.factory import linear_kernels

    runner = llm.llm_engine.runner
    return VariantResult(
        variant=v.name, quantization=v.quantization, weight_bytes=runner.weight_bytes(),
        kv_bytes_per_token=runner.kv_bytes_per_token, kv_cache=runner.kv_cache_description(),
        linear_kernels=sorted(linear_kernels(runner.model)),
        offline_output_tokens_per_s=t.offline_tokens / t.offline_seconds, offline_seconds=t.offline_seconds,
        batch1_decode_tokens_per_s=t.decode_tokens_per_s, linear_pass_us=dict(t.linear_pass_us))


LINEAR_ROWS = (1, 32)  # a lone decode, a busy decode step


def _linear_pass_us(model, rows: int) -> float:
    """Microseconds for one pass over every linear layer of the model (LM head included) at ``rows``
    rows: the GEMMs alone, binding overhead included, engine overhead excluded. Best of 5 passes."""
    import torch

    layers = [layer for _, layer in model.linear_layers()]
    device = next(model.parameters()).device
    inputs = {k: torch.randn(rows, k, device=device) for k in {layer.in_features for layer in layers}}
    best = math.inf
    with torch.inference_mode():
        for i in range(6):  # the first pass warms up
            start = time.perf_counter()
            for layer in layers:
                layer(inputs[layer.in_features])
            if i:
                best = min(best, time.perf_counter() - start)
    return best * 1e6


def _batch1_decode(llm, prompt: list[int], tokens: int) -> float:
    """Decode tokens per second of one request alone: (n - 1) tokens after the first, whose time
    (the prefill) is measured on its own and subtracted."""
    from tureen import SamplingParams

    def timed(n: int) -> float:
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - start

    timed(2)  # warm-up
    first = min(timed(1) for _ in range(3))
    return (tokens - 1) / max(timed(tokens) - first, 1e-9)


def _held_out_ids(llm, args) -> list[int]:
    if args.text_file:
        text = Path(args.text_file).read_text(encoding="utf-8", errors="replace")
    else:
        import os

        text = Path(os.__file__).read_text(encoding="utf-8")
    ids = llm.llm_engine.tokenizer.encode(text, add_special_tokens=False)
    vocab = llm.llm_engine.runner.vocab_size
    return [t for t in ids if t < vocab][:args.fidelity_tokens]


def _held_out_logprobs(llm, args):
    """Teacher-forced next-token log-probabilities over the held-out text: [(ids, (T, vocab))] per window."""
    ids = _held_out_ids(llm, args)
    window = min(512, llm.llm_engine.max_model_len)
    return [(ids[i:i + window], _window_logprobs(llm.llm_engine.runner, ids[i:i + window]))
            for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1]


def _window_logprobs(runner, ids: list[int]):
    """One prefill of ``ids`` straight through the model (blocks 0.. of the cache, which nothing
    else uses any more), every position's log-softmax."""
    import torch

    from tureen.executor.attention import build_attention_metadata

    blocks = list(range(-(-len(ids) // runner.block_size)))
    with torch.inference_mode():
        meta = build_attention_metadata([len(ids)], [0], [blocks], runner.block_size, runner.device,
                                        runner.workspace, runner.cpu_ops)
        hidden = runner.model(torch.tensor(ids, device=runner.device), meta.positions, meta, runner.kv_caches)
        return runner.model.compute_logits(hidden).float().log_softmax(-1).cpu()  # (T, vocab)


def _fidelity(reference, variant) -> Fidelity:
    """KL(ref || variant), top-1 agreement and both perplexities, over every position that has a next token."""
    import torch

    kl = agree = nll = ref_nll = 0.0
    count = 0
    for (ids, ref), (_, lp) in zip(reference, variant):
        n = len(ids) - 1
        p_ref, p_var = ref[:n], lp[:n]  # (n, vocab) log-probabilities of the token after each position
        kl += float((p_ref.exp() * (p_ref - p_var)).sum())
        agree += float((p_ref.argmax(-1) == p_var.argmax(-1)).sum())
        nxt = torch.tensor(ids[1:])
        nll -= float(p_var.gather(1, nxt[:, None]).sum())
        ref_nll -= float(p_ref.gather(1, nxt[:, None]).sum())
        count += n
    return Fidelity(count, kl / count, agree / count, math.exp(nll / count), math.exp(ref_nll / count))


def _add_ratios(results: list[VariantResult]) -> None:
    ref = results[0]
    for r in results:
        r.ratios = {**{f"linear_pass_{rows}_rows": ref.linear_pass_us[rows] / r.linear_pass_us[rows]
                       for rows in r.linear_pass_us if rows in ref.linear_pass_us},
                    "weight_memory": r.weight_bytes / ref.weight_bytes,
                    "kv_bytes_per_token": r.kv_bytes_per_token / ref.kv_bytes_per_token,
                    "offline_throughput": r.offline_output_tokens_per_s / ref.offline_output_tokens_per_s,
                    "batch1_decode": r.batch1_decode_tokens_per_s / ref.batch1_decode_tokens_per_s}


def _print_table(results: list[VariantResult], is_demo: bool, args) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tureen bench quant: one checkpoint, the same prompts, one run (x: against the first row)")
    for col in ("variant", "weights MiB", "KV B/token", "offline tok/s", "batch-1 tok/s", "GEMMs 1 row us",
                "GEMMs 32 rows us", "mean KL", "top-1", "ppl*" if is_demo else "ppl"):
        table.add_column(col, justify="left" if col == "variant" else "right", no_wrap=True)
    for r in results:
        f = r.fidelity
        table.add_row(
            r.variant, f"{r.weight_bytes / 2**20:.1f} x{r.ratios['weight_memory']:.2f}", f"{r.kv_bytes_per_token}",
            f"{r.offline_output_tokens_per_s:.0f} x{r.ratios['offline_throughput']:.2f}",
            f"{r.batch1_decode_tokens_per_s:.0f} x{r.ratios['batch1_decode']:.2f}",
            *(f"{r.linear_pass_us[str(n)]:.0f} x{r.ratios[f'linear_pass_{n}_rows']:.2f}" for n in LINEAR_ROWS),
            f"{f.mean_kl:.1e}", f"{100 * f.top1_agreement:.1f}% ±{100 * f.top1_margin():.1f}",
            f"{f.perplexity:.1f}")
    console = Console()
    if not console.is_terminal:  # a log file: no reason to wrap at 80 columns
        console = Console(width=200)
    console.print(table)
    ref = results[0].fidelity
    console.print(f"fidelity: {ref.positions} positions of held-out text against {results[0].variant} (top-1 with "
                  "its 95% interval); "
                  f"best of {args.repeats} timed runs per variant; GEMMs: one pass over every linear layer "
                  f"(LM head included) with random inputs, x = speed-up" + (f"\n* {_PPL_NOTE}" if is_demo else ""))
    for r in results:
        console.print(f"linear kernels of {r.variant}: {', '.join(r.linear_kernels)}; KV cache: {r.kv_cache}")


def plot_results(path: Path, results: list[VariantResult], is_demo: bool) -> None:
    """Four bar charts, one bar per variant: weight memory, offline and batch-1 throughput, fidelity."""
    from matplotlib.figure import Figure

    names = [r.variant for r in results]
    fig = Figure(figsize=(16, 8), layout="constrained")
    axes = fig.subplots(2, 3)
    panels = [
        (axes[0][0], [r.weight_bytes / 2**20 for r in results], "weight memory (MiB)", "{:.1f}"),
        (axes[0][1], [r.offline_output_tokens_per_s for r in results], "offline output tok/s", "{:.0f}"),
        (axes[0][2], [r.batch1_decode_tokens_per_s for r in results], "batch-1 decode tok/s", "{:.0f}"),
        (axes[1][0], [r.linear_pass_us["1"] for r in results], "all linear layers, 1 row (us)", "{:.0f}"),
        (axes[1][1], [r.linear_pass_us["32"] for r in results], "all linear layers, 32 rows (us)", "{:.0f}"),
        (axes[1][2], [100 * r.fidelity.top1_agreement for r in results], "top-1 agreement with the reference (%)",
         "{:.1f}"),
    ]
    for ax, values, title, fmt in panels:
        bars = ax.bar(names, values, color=["#777777"] + ["#3b75af"] * (len(names) - 1))
        for bar, value in zip(bars, values):
            ax.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=9)
    kl = ", ".join(f"{r.variant}: {r.fidelity.mean_kl:.1e}" for r in results[1:])
    axes[1][2].set_xlabel(f"mean KL (nats): {kl}", fontsize=8)
    fig.suptitle("tureen bench quant" + (" (demo model, random weights)" if is_demo else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
