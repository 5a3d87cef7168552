"""``tureen plan``: the capacity and cost planner on the command line.

The option flags are generated from ``PlanOptions`` (one help text per field); the namespace is
turned into ``PlanOptions`` here and goes no further.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from tureen.errors import TureenError
from tureen.plan.gpus import CATALOGUE
from tureen.plan.options import PlanOptions
from tureen.plan.presets import preset_names

_DESCRIPTION = """\
Plan serving a model before renting GPUs: weight memory, KV cache per token and per sequence,
the KV budget and how many sequences fit, the fewest GPUs that fit, decode and prefill speed
ceilings, cost per token, monthly cost, and the break-even volume against an API.

MODEL is a local checkpoint directory or config.json, a preset, or a Hugging Face hub id.
Presets: {presets}.
GPUs: {gpus}.
Sizes are decimal: 1 GB = 10^9 bytes."""


def _flags(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata["argparse"].get("flags") or ("--" + f.name.replace("_", "-"),)


def _add_option_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("plan options")
    for f in dataclasses.fields(PlanOptions):
        extra = {k: v for k, v in f.metadata["argparse"].items() if k != "flags"}
        default = "" if f.default is None else f" (default: {f.default})"  # None: the help explains
        group.add_argument(*_flags(f), dest=f.name, default=None, help=f.metadata["help"] + default, **extra)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plan", help="Capacity and cost planner: VRAM, KV cache, concurrency, speed, cost, break-even.",
        description=_DESCRIPTION.format(presets=", ".join(preset_names()), gpus=", ".join(CATALOGUE)),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="Checkpoint directory, config.json, preset name or hub id.")
    _add_option_flags(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--compare", metavar="GPU1,GPU2,...",
                     help="Plan on several GPUs and put them side by side (overrides --gpu).")
    out.add_argument("--json", action="store_true", help="Print JSON instead of a table "
                     "(a list of objects with --compare).")
    parser.set_defaults(func=run)
    return parser


def options_from_args(args: argparse.Namespace, gpu: str | None = None) -> PlanOptions:
    """Flags the user gave (others keep PlanOptions' defaults), with ``gpu`` replacing --gpu."""
    given: dict[str, Any] = {f.name: getattr(args, f.name) for f in dataclasses.fields(PlanOptions)
                             if getattr(args, f.name) is not None}
    if gpu is not None:
        given["gpu"] = gpu
    return PlanOptions(**given)


def _compare_gpus(args: argparse.Namespace) -> list[str | None]:
    if not args.compare:
        return [None]
    names = [name.strip() for name in args.compare.split(",") if name.strip()]
    if not names:
        raise TureenError("--compare needs a comma-separated list of GPUs, e.g. A100-80GB,H100-SXM")
    return names


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tureen.plan.estimate import estimate
    from tureen.plan.report import compare_table, plan_table, print_notes

    try:
        estimates = [estimate(args.model, options_from_args(args, gpu)) for gpu in _compare_gpus(args)]
    except TureenError as exc:
        print(f"tureen plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        payload = [e.to_dict() for e in estimates] if args.compare else estimates[0].to_dict()
        print(json.dumps(payload, indent=2))
        return 0
    console = Console(width=None if sys.stdout.isatty() else 120)  # wide enough for --compare in a pipe
    console.print(compare_table(estimates) if args.compare else plan_table(estimates[0]))
    print_notes(console, estimates)
    return 0
