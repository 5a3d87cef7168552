"""``tureen gateway``: run the gateway (``--config gateway.yaml``), and ``tureen gateway keys ...``.

With no ``--config`` the gateway starts open: one upstream at http://127.0.0.1:8000 (where
``tureen serve`` listens), any model name forwarded, no keys, an in-process limiter.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

logger = logging.getLogger("tureen.gateway")

_EPILOG = """\
The config file uses LiteLLM's config.yaml shape (model_list, router_settings, general_settings,
litellm_settings) plus tureen's own tureen_settings; see examples/gateway.yaml and README.md.
Examples:
  tureen gateway --config examples/gateway.yaml --port 4000
  tureen gateway --config gateway.yaml --check      # validate the file and exit
  tureen gateway                                    # open default: one upstream at 127.0.0.1:8000
  tureen gateway keys create --key-alias app        # virtual keys (see: tureen gateway keys --help)
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("gateway", help="An LLM gateway in front of OpenAI-compatible upstreams.",
                                   description="Route, retry and fail over across replicas; virtual keys, token-"
                                               "aware limits and budgets.",
                                   epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)
    keys_cli = _keys_cli()
    if keys_cli is not None:
        sub = parser.add_subparsers(dest="gateway_command", metavar="COMMAND", required=False)
        (getattr(keys_cli, "register", None) or keys_cli.add_parser)(sub)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="gateway.yaml (LiteLLM's shape); default: the open single-upstream default")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    parser.add_argument("--port", type=int, default=4000, help="port to listen on (default: 4000, as LiteLLM)")
    parser.add_argument("--upstream", default=None, metavar="URL",
                        help="with no --config: the one upstream's URL (default: http://127.0.0.1:8000)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log level (default: info); one JSON access line per request at info")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes sharing the port (default: 1); share limits through Redis")
    parser.add_argument("--check", action="store_true", help="validate the config, print a summary and exit")


def _keys_cli() -> Any:
    """GW-POLICY's ``tureen gateway keys`` subcommands, when that module exists."""
    try:
        return importlib.import_module("tureen.gateway.keys_cli")
    except ModuleNotFoundError as exc:
        if exc.name != "tureen.gateway.keys_cli":
            raise
        return None


def load(args: argparse.Namespace):
    """The config from ``--config`` (or the open default); exits 2 with one line on a bad file."""
    from tureen.gateway.config import DEFAULT_UPSTREAM, GatewayConfigError, default_config, load_config

    if args.config is None:
        return default_config(args.upstream or DEFAULT_UPSTREAM), []
    try:
        return load_config(args.config)
    except GatewayConfigError as exc:
        print(f"tureen gateway: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config, warnings = load(args)
    for warning in warnings:
        logger.warning(warning)
    if args.check:
        _summary(config)
        return 0
    if args.workers < 1:
        print("tureen gateway: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers > 1 and config.router_settings.redis_connection_url() is None:
        logger.warning("--workers %d without Redis: each worker keeps its own keys, limits and spend", args.workers)
    if args.config is None:
        logger.warning("NO --config: the gateway is OPEN. Anyone who reaches %s:%d can use the upstream at %s; "
                       "no keys are required and limits are in-process only.", args.host, args.port,
                       config.model_list[0].litellm_params.api_base)
    elif not config.keys_required:
        logger.warning("virtual keys are not required (tureen_settings.require_virtual_keys is false): the gateway "
                       "is open to anyone who can reach it")
    from tureen.gateway.serve import serve

    return serve(config, args.host, args.port, args.log_level, args.workers, (args.config, args.upstream))


def _summary(config) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="gateway config: deployments")
    for column in ("model_name", "upstream model", "api_base", "tier", "max_parallel", "weight"):
        table.add_column(column)
    for entry in config.model_list:
        p = entry.litellm_params
        table.add_row(entry.model_name, p.upstream_model, p.api_base or "-", entry.tureen_params.tier,
                      str(p.max_parallel_requests or "-"), f"{p.weight:g}")
    console = Console()
    console.print(table)
    console.print(f"routing: {config.router_settings.routing_strategy}, retries: {config.num_retries}, "
                  f"keys required: {config.keys_required}, redis: "
                  f"{'configured' if config.router_settings.redis_connection_url() else 'none (in-process)'}")
    cache = config.litellm_settings
    if cache.cache:
        params = cache.cache_params
        console.print(f"response cache: {', '.join(params.tiers)} tiers, ttl {params.ttl:g} s"
                      + (f", similarity_threshold {params.similarity_threshold:.2f}, embedding "
                         f"{params.qdrant_semantic_cache_embedding_model}" if "semantic" in params.tiers else ""))
