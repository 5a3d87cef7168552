"""``tureen serve [MODEL]``: the OpenAI-compatible server.

The argparse namespace stops here: it becomes an ``EngineConfig`` and a ``ServerConfig``.
Heavy imports (uvicorn, the engine, torch) happen only when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from tureen.entrypoints.engine_args import arg_type
from tureen.errors import ConfigError
from tureen.server.config import ServerConfig, server_fields

API_KEY_ENV = "TUREEN_API_KEY"
TRACE = 5  # uvicorn's "trace" level


def add_server_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    for f in server_fields():
        meta = f.metadata
        default = f.default
        flags = ["--" + f.name.replace("_", "-"), *meta.get("aliases", [])]
        help_text = meta["help"] if "Default:" in meta["help"] else f"{meta['help']} (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text}
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if f.type in ("bool", bool):
            group.add_argument(*flags, action="store_true", **kwargs)
        else:
            group.add_argument(*flags, type=arg_type(f), **kwargs)


def add_parser(subparsers: Any) -> None:
    from tureen.entrypoints.engine_args import add_engine_args

    parser = subparsers.add_parser(
        "serve", help="Run the OpenAI-compatible HTTP server.",
        description="Serve a checkpoint over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /tokenize, /detokenize, /version, /health, /metrics). With no MODEL it serves the "
                    "built-in demo model, which has RANDOM weights.")
    add_engine_args(parser)
    add_server_args(parser)
    parser.set_defaults(func=serve)


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    values = {f.name: getattr(args, f.name) for f in server_fields()}
    if values["api_key"] is None:
        values["api_key"] = os.environ.get(API_KEY_ENV) or None
    return ServerConfig(**values)


def configure_logging(level: str) -> None:
    numeric = TRACE if level == "trace" else getattr(logging, level.upper())
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    from tureen.server import log_filter

    log_filter.install()


def serve(args: argparse.Namespace) -> int:
    from tureen.entrypoints.engine_args import engine_config_from_args

    try:
        server_config = server_config_from_args(args)
        engine_config = engine_config_from_args(args)
    except ConfigError as exc:
        print(f"tureen serve: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(server_config.log_level)
    from tureen.server.runner import run_server

    return run_server(engine_config, server_config)
