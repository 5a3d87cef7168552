"""CLI flags for the engine, generated from the config tree's field docs.

The argparse namespace never travels past the CLI: ``engine_config_from_args`` turns it into
an ``EngineConfig`` at the entry point.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from tureen.config import EngineConfig, engine_fields


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def arg_type(f: dataclasses.Field) -> Any:
    """The argparse type for a config field (None for a bool: a --flag/--no-flag pair)."""
    kind = str(f.type)
    if "bool" in kind:
        return None
    if kind.startswith("int | str"):
        return str
    if "float" in kind:
        return float
    if "int" in kind:
        return int
    return str


def add_engine_args(parser: argparse.ArgumentParser, *, with_model_positional: bool = True) -> None:
    """Add one flag per engine config field (plus the MODEL positional)."""
    group = parser.add_argument_group("engine")
    if with_model_positional:
        parser.add_argument("model", nargs="?", default=None,
                            help="Checkpoint directory or hub id (default: the built-in demo model, random weights).")
    for _, f in engine_fields():
        if f.name == "model":
            continue
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": f"{help_text} (default: {default})"}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if arg_type(f) is None:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            group.add_argument(_flag(f.name), *f.metadata.get("aliases", []), type=arg_type(f), **kwargs)
    group.add_argument("--speculative-config", dest="speculative_config", default=None, help=(
        "Speculative decoding as JSON (vLLM's keys): method (ngram | draft_model), num_speculative_tokens, "
        "prompt_lookup_max, prompt_lookup_min, model (a draft checkpoint, or \"self\"), quantization "
        "(int8 | int4 | fp8, for the draft), disable_by_batch_size (speculate only up to this many running "
        "requests; default 16). E.g. '{\"method\": \"ngram\", \"num_speculative_tokens\": 4}'."))


def engine_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = {f.name: getattr(args, f.name) for _, f in engine_fields() if f.name != "model"}
    if getattr(args, "speculative_config", None) is not None:
        kwargs["speculative_config"] = args.speculative_config
    return kwargs


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig.from_kwargs(getattr(args, "model", None), **engine_kwargs_from_args(args))
