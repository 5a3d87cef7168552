"""``tureen bench throughput``: one offline workload through tureen and through transformers.

transformers runs the way it is usually run for batch work: static batches in arrival order,
left-padded, each batch generating until its longest request is done. Only the tokens each
request asked for count as output, for both engines.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass

from tureen.entrypoints.engine_args import add_engine_args, engine_kwargs_from_args


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


@dataclass
class Result:
    engine: str
    seconds: float
    output_tokens: int
    prompt_tokens: int

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tokens_per_s(self) -> float:
        return (self.output_tokens + self.prompt_tokens) / self.seconds


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    g = p.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=128, help="Requests in the workload (default: 128).")
    g.add_argument("--input-len", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"),
                   help="Prompt length range in tokens, uniform per request (default: 32 256).")
    g.add_argument("--output-len", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"),
                   help="Output length range in tokens, uniform per request, EOS ignored (default: 16 256).")
    g.add_argument("--workload-seed", type=int, default=0, help="Seed for the random workload (default: 0).")
    g.add_argument("--hf-batch-size", type=int, default=16,
                   help="Static batch size for transformers (default: 16).")
    g.add_argument("--skip-hf", action="store_true", help="Measure tureen only.")
    g.add_argument("--save-result", default=None, help="Write the figures as JSON to this file.")
    p.set_defaults(func=run)


def make_workload(vocab_size: int, special_ids: set[int], args: argparse.Namespace) -> Workload:
    rng = random.Random(args.workload_seed)
    allowed = [t for t in range(vocab_size) if t not in special_ids]
    prompts = [[rng.choice(allowed) for _ in range(rng.randint(*args.input_len))] for _ in range(args.num_prompts)]
    return Workload(prompts, [rng.randint(*args.output_len) for _ in range(args.num_prompts)])


WARMUP_OUTPUT_LEN = 8


def run_tureen(llm, work: Workload, warmup: list[list[int]]) -> Result:
    from tureen import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in work.output_lens]
    llm.generate(warmup, SamplingParams(temperature=0.0, max_tokens=WARMUP_OUTPUT_LEN, ignore_eos=True),
                 use_tqdm=False)  # warm-up, excluded from timing
    start = time.perf_counter()
    outs = llm.generate(work.prompts, params, use_tqdm=True)
    seconds = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == work.num_output_tokens, "tureen must produce exactly the requested tokens"
    return Result("tureen", seconds, produced, work.num_prompt_tokens)


def run_transformers(model_dir: str, dtype: str, work: Workload, warmup: list[list[int]], batch_size: int) -> Result:
    import torch
    from rich.progress import Progress
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch_dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    model.generation_config.eos_token_id = None  # generate() merges this in; every request runs its full length
    batches = [range(i, min(i + batch_size, len(work.prompts))) for i in range(0, len(work.prompts), batch_size)]
    _hf_batch(model, GenerationConfig, warmup, WARMUP_OUTPUT_LEN)  # warm-up, excluded from timing
    start = time.perf_counter()
    from rich.console import Console

    with Progress(console=Console(stderr=True)) as bar:
        task = bar.add_task("transformers", total=len(work.prompts))
        for batch in batches:
            _hf_batch(model, GenerationConfig, [work.prompts[i] for i in batch], max(work.output_lens[i] for i in batch))
            bar.update(task, advance=len(batch))
    seconds = time.perf_counter() - start
    return Result("transformers", seconds, work.num_output_tokens, work.num_prompt_tokens)


def _hf_batch(model, GenerationConfig, prompts: list[list[int]], max_new_tokens: int) -> None:
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # (B, T) left-padded
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, generation_config=cfg)


def run(args: argparse.Namespace) -> int:
    import logging

    from tureen import LLM

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kwargs = engine_kwargs_from_args(args)
    kwargs["dtype"] = "float32" if kwargs.get("dtype") == "auto" else kwargs.get("dtype")
    llm = LLM(args.model, **kwargs)
    engine = llm.llm_engine
    tok = engine.tokenizer
    work = make_workload(tok.vocab_size, set(tok.all_special_ids), args)
    # Both engines warm up on one static batch of other prompts (no prefix-cache hits in the timed run).
    warmup = make_workload(tok.vocab_size, set(tok.all_special_ids), argparse.Namespace(
        **{**vars(args), "workload_seed": args.workload_seed + 1})).prompts[:args.hf_batch_size]
    print(f"workload: {args.num_prompts} requests, {work.num_prompt_tokens} prompt tokens, "
          f"{work.num_output_tokens} output tokens; model {engine.checkpoint_dir}"
          + (" (demo model: RANDOM weights)" if engine.is_demo_model else ""), file=sys.stderr)
    results = [run_tureen(llm, work, warmup)]
    if not args.skip_hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("error: transformers is not installed (pip install transformers); or pass --skip-hf", file=sys.stderr)
            return 2
        results.append(run_transformers(str(engine.checkpoint_dir), kwargs["dtype"], work, warmup, args.hf_batch_size))
    _report(results, args)
    return 0


def _report(results: list[Result], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Offline throughput (same workload, same checkpoint)")
    for col in ("engine", "seconds", "output tok/s", "total tok/s"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r.engine, f"{r.seconds:.2f}", f"{r.output_tokens_per_s:.1f}", f"{r.total_tokens_per_s:.1f}")
    Console().print(table)
    summary = {"results": [asdict(r) | {"output_tokens_per_s": r.output_tokens_per_s,
                                        "total_tokens_per_s": r.total_tokens_per_s} for r in results]}
    if len(results) == 2:
        summary["speedup_output_tokens_per_s"] = results[0].output_tokens_per_s / results[1].output_tokens_per_s
        print(f"tureen / transformers output throughput: {summary['speedup_output_tokens_per_s']:.2f}x "
              f"(transformers static batch size {args.hf_batch_size})")
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(summary, f, indent=2)
