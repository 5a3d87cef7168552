"""``tureen cache calibrate --pairs FILE.jsonl``: see ``tureen.gateway.cache.calibrate``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

_EPILOG = """\
Examples:
  tureen cache calibrate                                  # the shipped pairs, the default model
  tureen cache calibrate --pairs my-pairs.jsonl --target 0.005 --plot calib.png
  tureen cache calibrate --config gateway.yaml            # the model named in cache_params
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("cache", help="The gateway's response caches: calibrate the semantic tier.",
                                   epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cache_command", metavar="COMMAND", required=True)
    cal = sub.add_parser("calibrate", help="Measure true/false-hit rates per similarity threshold on labelled "
                                           "pairs and recommend one.", epilog=_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    cal.add_argument("--pairs", type=Path, default=None, metavar="FILE.jsonl",
                     help='labelled pairs, one {"a": ..., "b": ..., "same": true|false} a line '
                          "(default: the shipped set)")
    cal.add_argument("--model", default=None, help="embedding model id or directory (default: the config's, "
                                                   "else sentence-transformers/all-MiniLM-L6-v2)")
    cal.add_argument("--config", default=None, metavar="FILE", help="gateway.yaml whose cache_params name the model")
    cal.add_argument("--target", type=float, default=0.01, help="highest acceptable false-hit rate (default 0.01)")
    cal.add_argument("--plot", type=Path, default=Path("cache-calibration.png"), help="PNG plot to write")
    cal.add_argument("--json", type=Path, default=None, help="also write the result as JSON")
    cal.add_argument("--markdown", action="store_true", help="also print the table as Markdown (for README)")
    cal.set_defaults(func=calibrate_command)


def _model(args: argparse.Namespace) -> tuple[str, str, int | None]:
    from tureen.gateway.cache.settings import CacheParams

    params = CacheParams()
    if args.config:
        from tureen.gateway.config import GatewayConfigError, load_config

        try:
            params = load_config(args.config)[0].litellm_settings.cache_params
        except GatewayConfigError as exc:
            print(f"tureen cache: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    return args.model or params.qdrant_semantic_cache_embedding_model, params.embedding_device, \
        params.embedding_threads


def calibrate_command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from tureen.gateway.cache import calibrate as cal
    from tureen.gateway.cache.embedding import EmbeddingModelMissing, load_encoder

    console = Console()
    if not 0 <= args.target < 1:
        print("tureen cache: --target must be in [0, 1)", file=sys.stderr)
        return 2
    try:
        pairs = cal.read_pairs(args.pairs or cal.shipped_pairs())
    except (OSError, ValueError) as exc:
        print(f"tureen cache: {exc}", file=sys.stderr)
        return 2
    name, device, threads = _model(args)
    try:
        with console.status(f"loading {name}"):
            encoder = load_encoder(name, device, threads)
    except EmbeddingModelMissing as exc:
        print(f"tureen cache: {exc}", file=sys.stderr)
        return 2
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"embedding {len(pairs)} pairs", total=2 * len(pairs))
        sims = cal.similarities(pairs, encoder.encode, advance=lambda n: progress.advance(task, n))
    result = cal.calibrate(pairs, sims, name, args.target)
    console.print(cal.table(result))
    _summary(console, result)
    cal.plot(result, args.plot)
    console.print(f"plot: {args.plot}")
    if args.json:
        args.json.write_text(cal.to_json(result))
    if args.markdown:
        print(cal.markdown(result))  # plain: rich would wrap the long header line
    return 0


def _summary(console, result) -> None:
    rec = result.row(result.recommended)
    if rec is None:
        console.print(f"no threshold up to 0.99 keeps false hits at or below {result.target:.1%} even with "
                      f"verification: do not enable the semantic tier for this model")
    else:
        console.print(f"recommended similarity_threshold: [bold]{rec.threshold:.2f}[/bold] (with verification): "
                      f"true hits {rec.true_hit_verified:.1%}, false hits {rec.false_hit_verified:.1%}")
    alone = result.row(result.recommended_cosine_only)
    console.print("cosine only: " + (f"{alone.threshold:.2f} (true hits {alone.true_hit:.1%}, false hits "
                                     f"{alone.false_hit:.1%})" if alone else
                                     f"no threshold keeps false hits at or below {result.target:.1%}"))
    for check, rates in result.per_check.items():
        console.print(f"  at {result.recommended or 0.99:.2f}, the {check} check alone: true hits "
                      f"{rates['true_hit']:.1%}, false hits {rates['false_hit']:.1%}")
