"""``tureen bench block-hash``: what each prefix-cache hash strategy costs, per block and per engine step.

Two measurements, side by side in one run for ``sha256``, ``blake2b`` and ``builtin``
(``tureen.engine.block_hash``):

- the hash of one full block (``--block-size`` tokens), in microseconds;
- the offline engine on ``--model`` (``--num-prompts`` prompts of ``--input-len`` tokens, each
  generating ``--output-len``), prefix caching on: seconds per engine step, and its ratio to
  ``builtin``. Each strategy runs ``--repeats`` times, interleaved, and the best run counts.
"""

from __future__ import annotations

import argparse
import json
import time
import timeit
from typing import Any

from tureen.engine.block_hash import HASH_ALGOS, make_block_hasher


def per_block_us(algo: str, block_size: int, number: int = 20000) -> float:
    hasher = make_block_hasher(algo)
    tokens = list(range(1000, 1000 + block_size))
    parent = hasher(None, tokens)
    return timeit.timeit(lambda: hasher(parent, tokens), number=number) / number * 1e6


def engine_step_s(model: str, algo: str, num_prompts: int, input_len: int, output_len: int) -> float:
    from tureen import LLM
    from tureen.sampling_params import SamplingParams

    llm = LLM(model, max_model_len=input_len + output_len + 8, kv_cache_memory="256MiB",
              prefix_caching_hash_algo=algo)
    prompts = [[(7 * i + j) % 200 + 3 for j in range(input_len)] for i in range(num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    del llm
    return elapsed / output_len  # all prompts run as one batch: one step per output token (prefill shared out)


def run_bench(model: str | None, block_size: int, num_prompts: int, input_len: int, output_len: int,
              repeats: int) -> dict[str, Any]:
    result: dict[str, Any] = {"block_size": block_size, "per_block_us": {}, "step_s": {}, "step_ratio_to_builtin": {}}
    for algo in HASH_ALGOS:
        result["per_block_us"][algo] = min(per_block_us(algo, block_size) for _ in range(3))
    if model:
        best: dict[str, float] = {}
        for _ in range(repeats):
            for algo in HASH_ALGOS:  # interleaved: machine noise hits each strategy alike
                step = engine_step_s(model, algo, num_prompts, input_len, output_len)
                best[algo] = min(best.get(algo, float("inf")), step)
        result["step_s"] = best
        result["step_ratio_to_builtin"] = {a: best[a] / best["builtin"] for a in HASH_ALGOS}
        result["workload"] = {"num_prompts": num_prompts, "input_len": input_len, "output_len": output_len,
                              "repeats": repeats}
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="Checkpoint directory for the engine measurement.")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--save-result", default=None)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    result = run_bench(args.model, args.block_size, args.num_prompts, args.input_len, args.output_len, args.repeats)
    table = Table(title=f"prefix-cache block hash ({args.block_size}-token blocks)")
    for column in ("strategy", "per block (us)", "engine step (ms)", "step / builtin"):
        table.add_column(column)
    for algo in HASH_ALGOS:
        step = result["step_s"].get(algo)
        ratio = result["step_ratio_to_builtin"].get(algo)
        table.add_row(algo, f"{result['per_block_us'][algo]:.2f}", f"{step * 1000:.2f}" if step else "-",
                      f"{ratio:.3f}" if ratio else "-")
    Console().print(table)
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(result, f, indent=2)
    return 0
