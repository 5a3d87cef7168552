"""``tureen bench structured --parts``: the per-step pieces of a constraint, timed in isolation.

The end-to-end comparison in ``bench/structured.py`` needs a quiet machine to resolve a few
percent. This times the pieces a constrained step adds, each against its alternatives, on real
matcher states (the schema's grammar walked a random number of tokens) and interleaved round by
round in one process, so a shared machine slows every variant alike:

- filling the rows' bitmasks: one by one on the calling thread (what the engine does) against
  xgrammar's threaded ``BatchGrammarMatcher``;
- applying them to a batch of logits: the branch-free CPU path (what the sampler does) against
  xgrammar's CPU kernel and the plain torch ops, each on a fresh copy of the logits, as the
  sampler gets them; the copy alone is timed too;
- for scale, one unconstrained sampler call on the same batch (temperature 1, seeded).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import torch

from tureen.sampling_params import SamplingParams, StructuredOutputsParams


def _walked(backend, compiled, vocab_size: int, steps: int, gen: torch.Generator):
    """A fresh matcher advanced over ``steps`` random tokens its grammar allows (fewer if it ends)."""
    from tureen.executor.sampler import unpack_token_bitmask

    grammar = backend.new_grammar(compiled)
    for _ in range(steps):
        allowed = unpack_token_bitmask(backend.fill_bitmask([grammar]), vocab_size)[0].nonzero().flatten()
        token = int(allowed[torch.randint(len(allowed), (1,), generator=gen)])
        if not grammar.accept_tokens([token]) or grammar.is_terminated():
            break
    return grammar


def _variants(manager, vocab_size: int, schema: dict, batch_size: int, constrained: int,
              seed: int) -> dict[str, Callable[[], object]]:
    import xgrammar as xgr

    from tureen.engine.messages import ScheduledRequest
    from tureen.executor.sampler import Sampler, SamplingMetadata, apply_token_bitmask, apply_token_bitmask_cpu_

    backend = manager.backend
    compiled = manager.compile_async(StructuredOutputsParams(json=schema)).result()
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    grammars = [_walked(backend, compiled, vocab_size, rng.randint(0, 60), gen) for _ in range(constrained)]
    matchers = [g.matcher for g in grammars]
    bitmask = backend.fill_bitmask(grammars)  # (R, W)
    rows = sorted(rng.sample(range(batch_size), constrained))
    rows_t = torch.tensor(rows)
    full = torch.full((batch_size, bitmask.shape[-1]), -1, dtype=torch.int32)
    full[rows_t] = bitmask
    logits = torch.randn(batch_size, vocab_size, generator=gen)
    reqs = [ScheduledRequest(req_id=str(i), token_ids=[0], start_pos=0, block_ids=[0], sample=True,
                             sampling_params=SamplingParams(temperature=1.0, seed=i), prompt_token_ids=[1],
                             output_token_ids=[], step_seed=i) for i in range(batch_size)]
    meta = SamplingMetadata.from_requests(reqs, vocab_size, torch.device("cpu"))
    batch = xgr.BatchGrammarMatcher(max_threads=manager.config.structured_outputs_compile_threads)
    return {
        "fill: one by one (used)": lambda: backend.fill_bitmask(grammars),
        "fill: xgrammar BatchGrammarMatcher": lambda: batch.batch_fill_next_token_bitmask(
            matchers, xgr.allocate_token_bitmask(constrained, vocab_size)),
        "apply: numpy, branch-free (used)": lambda: apply_token_bitmask_cpu_(logits.clone(), rows_t, bitmask),
        "apply: xgrammar CPU kernel": lambda: xgr.apply_token_bitmask_inplace(
            logits.clone(), full, vocab_size=vocab_size, indices=rows),
        "apply: torch ops": lambda: apply_token_bitmask(logits.clone(), rows_t, bitmask),
        "copy of the logits (inside each apply)": logits.clone,
        "unconstrained sampler call (scale)": lambda: Sampler()(logits.clone(), meta),
    }


def time_parts(manager, vocab_size: int, schema: dict, batch_size: int, constrained: int, rounds: int = 7,
               calls: int = 50, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per variant: min and median microseconds a call over ``rounds`` interleaved rounds."""
    if not 0 < constrained <= batch_size:
        raise ValueError(f"--parts needs 1..{batch_size} constrained rows, got {constrained}")
    variants = _variants(manager, vocab_size, schema, batch_size, constrained, seed)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, call in variants.items():
            start = time.perf_counter()
            for _ in range(calls):
                call()
            samples[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: {"min_us": min(v), "median_us": statistics.median(v)} for name, v in samples.items()}


def print_parts(parts: dict[str, dict[str, float]], batch_size: int, constrained: int, vocab_size: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Per-step pieces: {constrained} constrained rows of {batch_size}, vocabulary {vocab_size}")
    for col in ("piece", "min us", "median us"):
        table.add_column(col, justify="right" if col != "piece" else "left")
    for name, t in parts.items():
        table.add_row(name, f"{t['min_us']:.0f}", f"{t['median_us']:.0f}")
    Console().print(table)
