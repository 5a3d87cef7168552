"""``tureen bench``: ``serve`` (load-test a running server) and ``throughput`` (offline engine).

The ``serve`` flags are generated from ``bench/serve_config.py``'s field docs; the argparse
namespace becomes a ``ServeBenchConfig`` here and goes no further.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from typing import Any

from tureen.bench.serve_config import ServeBenchConfig, bench_serve_fields

_SERVE_EPILOG = """\
Metric names and definitions follow `vllm bench serve`: TTFT (send -> first content chunk),
TPOT ((E2EL - TTFT) / (output tokens - 1)), ITL (gaps between content chunks), E2EL (send ->
last chunk). Example:
  tureen bench serve --base-url http://127.0.0.1:8000 --dataset random --input-len 128 \\
      --output-len 64 --num-prompts 64 --sweep-concurrency 1,2,4,8 --save-result out.json --plot out.png
"""


def add_parser(subparsers: Any) -> None:
    bench = subparsers.add_parser("bench", help="Benchmarks: serve (load a server), throughput (offline).",
                                  description="Benchmark an inference server or the engine.")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    serve = sub.add_parser("serve", help="Load-test an OpenAI-compatible server (TTFT, TPOT, ITL, goodput).",
                           description="Load-test any OpenAI-compatible server, measured like vllm bench serve.",
                           epilog=_SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)
    gateway = _optional_module("tureen.bench.gateway")
    if gateway is not None:
        gw = sub.add_parser("gateway", help="The gateway's overhead: the same streams direct and through it.",
                            description=gateway.__doc__.split("\n\n")[1].replace("\n", " "))
        gateway.add_arguments(gw)
        gw.set_defaults(func=gateway.run)
    throughput = _throughput_module()
    if throughput is not None:
        tp = sub.add_parser("throughput", help="Offline engine throughput (no HTTP server).")
        throughput.add_arguments(tp)
        tp.set_defaults(func=throughput.run)
    from tureen.bench import http_overhead

    ho = sub.add_parser("http-overhead", help="One workload offline and through a local tureen serve: the ratio.",
                        description=http_overhead.__doc__.split("\n\n")[0])
    http_overhead.add_arguments(ho)

    from tureen.bench import quant

    qp = sub.add_parser("quant", help="Unquantized vs int8 / int4 / fp8: memory, speed and fidelity, side by side.",
                        description=(quant.__doc__ or "").split("\n\n")[0])
    quant.add_arguments(qp)

    from tureen.bench import fuzz

    fz = sub.add_parser("fuzz", help="Fuzz a running server or gateway from its OpenAPI document (schemathesis) "
                                     "and hand-written hostile inputs.",
                        description=fuzz.__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    fuzz.add_arguments(fz)

    from tureen.bench import soak

    sk = sub.add_parser("soak", help="A long mixed load (disconnects, bad requests, n>1, seeds, stops) against a "
                                     "server or gateway, then every invariant checked; latency PNG.",
                        description=soak.__doc__.split("\n\n")[0])
    soak.add_arguments(sk)

    from tureen.bench import block_hash

    bh = sub.add_parser("block-hash", help="Cost of the prefix-cache hash strategies (sha256, blake2b, builtin).",
                        description=block_hash.__doc__.split("\n\n")[0])
    block_hash.add_arguments(bh)

    from tureen.bench import single

    sp = sub.add_parser("single", help="One request alone: batch-1 decode speed and its per-step breakdown.",
                        description=(single.__doc__ or "").split("\n\n")[0])
    single.add_arguments(sp)

    from tureen.bench import structured

    st = sub.add_parser("structured", help="Cost of structured outputs: a half-constrained batch vs unconstrained.",
                        description=structured.__doc__)
    structured.add_arguments(st)

    from tureen.bench import spec

    sp = sub.add_parser("spec", help="Speculative decoding (n-gram, self-draft, draft model) against none, side by side.",
                        description=spec.__doc__.split("\n\n")[0])
    spec.add_arguments(sp)


def _throughput_module() -> Any:
    """The lead's ``tureen.bench.throughput``, or None while it does not exist."""
    try:
        return importlib.import_module("tureen.bench.throughput")
    except ModuleNotFoundError as exc:
        if exc.name != "tureen.bench.throughput":
            raise
        return None


def _optional_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return None


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _show_default(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return "none" if value in (None, {}) else str(value)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``ServeBenchConfig`` field; every default is None so the config's applies."""
    for section, f in bench_serve_fields():
        meta = f.metadata
        flag = "--" + f.name.replace("_", "-")
        help_text = meta.get("help", "")
        if "Default:" not in help_text and "(default:" not in help_text:
            help_text += f" (default: {_show_default(_field_default(f))})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if "nargs" in meta:
            kwargs["nargs"] = meta["nargs"]
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        kind = str(f.type)
        if kind == "bool":
            parser.add_argument(flag, action="store_true", **kwargs)
        elif "parse" in meta or kind.startswith(("str", "Path")):
            parser.add_argument(flag, type=str, **kwargs)
        elif kind.startswith("float"):
            parser.add_argument(flag, type=float, **kwargs)
        elif kind.startswith("int"):
            parser.add_argument(flag, type=int, **kwargs)
        else:
            parser.add_argument(flag, type=str, **kwargs)


def serve_config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    values = {f.name: getattr(args, f.name) for _, f in bench_serve_fields() if getattr(args, f.name) is not None}
    if "api_key" not in values and os.environ.get("OPENAI_API_KEY"):
        values["api_key"] = os.environ["OPENAI_API_KEY"]
    return ServeBenchConfig.from_kwargs(**values)


def run_serve(args: argparse.Namespace) -> int:
    from tureen.bench.serve import bench_serve
    from tureen.bench.token_codec import ServerUnavailableError
    from tureen.errors import ConfigError, TureenError

    try:
        config = serve_config_from_args(args)
        code, _ = bench_serve(config)
    except ConfigError as exc:
        print(f"tureen bench serve: error: {exc}", file=sys.stderr)
        return 2
    except ServerUnavailableError as exc:
        print(f"tureen bench serve: server error: {exc}", file=sys.stderr)
        return 1
    except TureenError as exc:  # e.g. a tokenizer directory that does not load
        print(f"tureen bench serve: error: {exc}", file=sys.stderr)
        return 1
    return code
