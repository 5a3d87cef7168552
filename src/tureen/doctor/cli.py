"""``tureen doctor [MODEL]``: check the host the way the seeds' deployment checklists do.

Exit status: 0 when nothing failed (warnings allowed), 1 when a check failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit

from tureen.doctor.checks import (FAIL, CudaAvailable, DiskSpace, DriverMatchesTorch, Finding, LockedClocks,
                                  ModelFits, OpenFileLimit, PersistenceMode, RedisReachable)
from tureen.doctor.host import HostFacts, gather

# nvidia-smi product names -> the planner's catalogue; the first pattern that matches wins.
_GPU_NAMES = [(r"H200", "H200"), (r"H100.*PCIe", "H100-PCIe"), (r"H100", "H100-SXM"),
              (r"A100.*80\s*GB", "A100-80GB"), (r"A100", "A100-40GB"), (r"L40S", "L40S"),
              (r"\bA10G?\b", "A10"), (r"\bL4\b", "L4"), (r"4090", "RTX-4090")]
_STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "doctor", help="Check this host before serving: fd limit, disk, GPU driver/CUDA, fit, Redis.",
        description="Check the host before serving and print what to fix. Exit status 1 if a check fails.")
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="Checkpoint directory, preset or hub id: enables the disk-space and fit checks.")
    parser.add_argument("--gpu", help="GPU to plan for (default: the one nvidia-smi reports; 'cpu' for CPU).")
    parser.add_argument("--num-gpus", "--tensor-parallel-size", type=int, default=1, dest="num_gpus",
                        help="GPUs per replica for the fit check (default: 1).")
    parser.add_argument("--max-model-len", type=int, help="Context length for the fit check (default: the model's).")
    parser.add_argument("--kv-cache-memory", help="CPU KV budget for the fit check, as `tureen serve` takes it "
                                                  "(e.g. 8GiB; default: the engine's).")
    parser.add_argument("--gateway-config", type=Path, help="A gateway config: check its Redis is reachable.")
    parser.add_argument("--cache-dir", help="Where models are downloaded (default: $HF_HOME/hub or "
                                            "~/.cache/huggingface/hub).")
    parser.add_argument("--min-open-files", type=int, default=65535,
                        help="Required open-file limit (ulimit -n; default: 65535).")
    parser.add_argument("--json", action="store_true", help="Print the findings as JSON.")
    parser.set_defaults(func=run)
    return parser


def catalogue_gpu(product_name: str) -> str | None:
    return next((ours for pattern, ours in _GPU_NAMES if re.search(pattern, product_name, re.I)), None)


def _default_cache_dir() -> str:
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(hf_home, "hub")


def _plan(args: argparse.Namespace, host: HostFacts) -> ModelFits:
    if args.model is None:
        return ModelFits(plan=None)
    from tureen.errors import TureenError
    from tureen.plan import estimate

    gpu = args.gpu
    if gpu is None and host.gpus:
        gpu = catalogue_gpu(host.gpus[0].name)
        if gpu is None:
            return ModelFits(plan=None, error=f"GPU {host.gpus[0].name!r} is not in the planner's catalogue: "
                                              "pass --gpu")
    kwargs = {"gpu": gpu or "cpu", "num_gpus": args.num_gpus}
    if args.max_model_len:
        kwargs["max_model_len"] = args.max_model_len
    if args.kv_cache_memory and kwargs["gpu"] == "cpu":
        kwargs["kv_cache_memory"] = args.kv_cache_memory
    try:
        return ModelFits(plan=estimate(args.model, **kwargs))
    except TureenError as exc:
        return ModelFits(plan=None, error=f"cannot plan {args.model}: {exc}")


def _redis_check(path: Path | None) -> RedisReachable:
    if path is None:
        return RedisReachable(address=None)
    import yaml

    try:
        router = (yaml.safe_load(path.read_text()) or {}).get("router_settings") or {}
    except (OSError, yaml.YAMLError) as exc:
        return RedisReachable(address=None, source=f"cannot read {path}: {exc}")
    password = router.get("redis_password")
    if isinstance(password, str) and password.startswith("os.environ/"):
        password = os.environ.get(password.removeprefix("os.environ/"))
    if router.get("redis_url"):
        url = urlsplit(router["redis_url"])
        return RedisReachable(address=(url.hostname or "127.0.0.1", url.port or 6379), password=url.password)
    if router.get("redis_host"):
        return RedisReachable(address=(router["redis_host"], int(router.get("redis_port", 6379))), password=password)
    return RedisReachable(address=None, source=f"{path} configures no Redis (in-process limits)")


def findings(args: argparse.Namespace, host: HostFacts) -> list[Finding]:
    fit = _plan(args, host)
    local = args.model is not None and Path(args.model).exists()
    need = None if fit.plan is None or local else fit.plan.weight_bytes
    checks = [OpenFileLimit(minimum=args.min_open_files),
              DiskSpace(required_bytes=need, path=args.cache_dir or _default_cache_dir()),
              CudaAvailable(), DriverMatchesTorch(), PersistenceMode(), LockedClocks(), fit,
              _redis_check(args.gateway_config)]
    return [check.run(host) for check in checks]


def _print_table(results: list[Finding]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="tureen doctor", title_justify="left")
    for column in ("check", "status", "detail", "fix"):
        table.add_column(column, overflow="fold")
    for f in results:
        table.add_row(f.check, f"[{_STATUS_STYLE[f.status]}]{f.status}[/]", escape(f.detail), escape(f.fix))
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def run(args: argparse.Namespace) -> int:
    results = findings(args, gather())
    if args.json:
        print(json.dumps([asdict(f) for f in results], indent=2))
    else:
        _print_table(results)
    return 1 if any(f.status == FAIL for f in results) else 0
