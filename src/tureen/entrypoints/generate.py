"""``tureen generate``: offline generation from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from tureen.entrypoints.engine_args import add_engine_args, engine_kwargs_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="Generate text offline (no server).",
        description="Generate completions for prompts with the offline engine. Without MODEL it uses the "
                    "built-in demo model, which has RANDOM weights and prints meaningless text.")
    add_engine_args(p)
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", action="append", default=None,
                   help="A prompt (repeat for several). Default: one short demo prompt.")
    g.add_argument("--prompts-file", default=None, help="A text file with one prompt per line.")
    g.add_argument("--chat", action="store_true", help="Treat each prompt as a user message and apply the chat template.")
    g.add_argument("--max-tokens", type=int, default=64, help="Tokens to generate per prompt (default: 64).")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0).")
    g.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass (default: 1).")
    g.add_argument("--top-k", type=int, default=0, help="Top-k sampling; 0 disables (default: 0).")
    g.add_argument("--n", type=int, default=1, help="Completions per prompt (default: 1).")
    g.add_argument("--stop", action="append", default=None, help="A stop string (repeatable).")
    g.add_argument("--ignore-eos", action="store_true", help="Keep generating after the EOS token.")
    g.add_argument("--request-seed", type=int, default=None, help="Per-request sampling seed.")
    g.add_argument("--json", action="store_true", help="Print one JSON object per prompt instead of text.")
    p.set_defaults(func=run)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    return prompts or ["The quick brown fox"]


def run(args: argparse.Namespace) -> int:
    from tureen import LLM, SamplingParams
    from tureen.errors import TureenError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        llm = LLM(args.model, **engine_kwargs_from_args(args))
        params = SamplingParams(
            n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
            stop=args.stop, ignore_eos=args.ignore_eos, seed=args.request_seed)
        prompts = _prompts(args)
        if args.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=True)
        else:
            outs = llm.generate(prompts, params, use_tqdm=True)
    except TureenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for out in outs:
        if args.json:
            print(json.dumps({"prompt": out.prompt, "num_cached_tokens": out.num_cached_tokens,
                              "outputs": [{"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
                                          for c in out.outputs]}))
            continue
        for c in out.outputs:
            print(f"--- prompt: {out.prompt!r}  [finish_reason={c.finish_reason}, tokens={len(c.token_ids)}]")
            print(c.text)
    if llm.llm_engine.is_demo_model:
        from tureen.demo import DEMO_MODEL_NOTICE
        print(f"note: {DEMO_MODEL_NOTICE}", file=sys.stderr)
    return 0
