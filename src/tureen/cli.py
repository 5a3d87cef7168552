"""The ``tureen`` command: one subcommand per room (generate, serve, bench, plan, deploy, doctor, gateway, prompts)."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes ``add_parser(subparsers)``, which registers its subcommand and sets
# ``func(args) -> int`` on the parsed namespace. Heavy imports (torch) stay inside ``func``.
_SUBCOMMANDS = [
    "tureen.entrypoints.generate",
    "tureen.server.cli",
    "tureen.bench.cli",
    "tureen.plan.cli",
    "tureen.deploy.cli",
    "tureen.doctor.cli",
    "tureen.gateway.cli",
    "tureen.gateway.cache.cli",
    "tureen.prompts.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tureen", description="Serve Hugging Face LLM checkpoints fast.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a room that is not built yet
            if exc.name != name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
