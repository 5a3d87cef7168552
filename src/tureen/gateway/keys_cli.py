"""``tureen gateway keys create|list|info|update|delete``: the key admin API from a shell.

The CLI talks to a running gateway's admin API over HTTP (``--url``, default
``$TUREEN_GATEWAY_URL`` or http://127.0.0.1:4000) with the master key, so it works the same whether
the gateway keeps its keys in Redis or in-process, and it never needs Redis credentials. The master
key comes from, in order: ``--master-key-env NAME``, the config file's ``general_settings.master_key``
(``--config``), ``$TUREEN_MASTER_KEY``, ``$LITELLM_MASTER_KEY``. It is never a flag value, so it
never lands in shell history or ``ps``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

DEFAULT_URL = "http://127.0.0.1:4000"
MASTER_KEY_ENVS = ("TUREEN_MASTER_KEY", "LITELLM_MASTER_KEY")


class CLIError(Exception):
    """A one-line message for stderr; exit status 1 (2 for usage problems)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("keys", help="Manage virtual keys through a running gateway's admin API.",
                                   description=(__doc__ or "").replace("``", ""),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="Generate a key (POST /key/generate); the key is printed once.")
    _limit_flags(create)
    _common(create)
    listing = actions.add_parser("list", help="List keys (GET /key/list).")
    listing.add_argument("--team-id", help="only this team's keys")
    listing.add_argument("--key-alias", help="only the key with this alias")
    listing.add_argument("--page", type=int, default=1, help="page number (default: 1)")
    listing.add_argument("--size", type=int, default=100, help="keys per page, at most 100 (default: 100)")
    _common(listing)
    info = actions.add_parser("info", help="Show a key's settings and spend (GET /key/info).")
    info.add_argument("key", help="the key, or its token (SHA-256 hash)")
    _common(info)
    update = actions.add_parser("update", help="Change a key's settings (POST /key/update).")
    update.add_argument("key", help="the key, or its token (SHA-256 hash)")
    _limit_flags(update)
    _common(update)
    delete = actions.add_parser("delete", help="Delete keys (POST /key/delete).")
    delete.add_argument("keys", nargs="*", help="keys or tokens to delete")
    delete.add_argument("--key-alias", action="append", default=[], help="delete the key with this alias "
                                                                         "(repeatable)")
    _common(delete)
    parser.set_defaults(func=run)
    for sub in (create, listing, info, update, delete):
        sub.set_defaults(func=run)


def _limit_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--models", help="comma-separated public model names the key may use (empty: all)")
    add("--max-budget", type=float, help="spend limit per budget period, in the deployments' price unit (USD)")
    add("--budget-duration", help="budget period: 30s, 10m, 1h, 7d, 1mo (default: never resets)")
    add("--rpm-limit", type=int, help="requests per minute")
    add("--tpm-limit", type=int, help="tokens per minute (prompt + max_tokens at admission, real usage after)")
    add("--max-parallel-requests", type=int, help="requests in flight at once")
    add("--max-prompt-tokens", type=int, help="largest prompt accepted, in tokens")
    add("--duration", help="validity from now: 30d, 1h... (default: never expires)")
    add("--key-alias", help="a readable, unique name for the key")
    add("--team-id", help="the team the key belongs to (its spend and team limits)")
    add("--metadata", help="a JSON object stored with the key")
    add("--blocked", action=argparse.BooleanOptionalAction, default=None, help="block or unblock the key")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help=f"the gateway (default: $TUREEN_GATEWAY_URL or {DEFAULT_URL})")
    parser.add_argument("--config", dest="keys_config", default=None, metavar="FILE",
                        help="gateway.yaml: its general_settings.master_key is used")
    parser.add_argument("--master-key-env", default=None, metavar="NAME",
                        help="environment variable holding the master key")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP call (default: 10)")
    parser.add_argument("--json", action="store_true", help="print the raw JSON answer")


def master_key(args: argparse.Namespace) -> str:
    if args.master_key_env:
        if not os.environ.get(args.master_key_env):
            raise CLIError(f"environment variable {args.master_key_env} is not set", 2)
        return os.environ[args.master_key_env]
    config_path = args.keys_config or getattr(args, "config", None)
    if config_path:
        from tureen.gateway.config import GatewayConfigError, load_config
        try:
            config, _ = load_config(config_path)
        except GatewayConfigError as exc:
            raise CLIError(str(exc), 2) from None
        if config.general_settings.master_key is not None:
            return config.general_settings.master_key.get_secret_value()
    for name in MASTER_KEY_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    raise CLIError("no master key: set TUREEN_MASTER_KEY, or pass --config gateway.yaml or --master-key-env NAME", 2)


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in ("max_budget", "budget_duration", "rpm_limit", "tpm_limit", "max_parallel_requests",
                 "max_prompt_tokens", "duration", "key_alias", "team_id", "blocked"):
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    if args.models is not None:
        fields["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.metadata is not None:
        try:
            fields["metadata"] = json.loads(args.metadata)
        except json.JSONDecodeError as exc:
            raise CLIError(f"--metadata is not valid JSON: {exc}", 2) from None
        if not isinstance(fields["metadata"], dict):
            raise CLIError("--metadata must be a JSON object", 2)
    return fields


def _call(args: argparse.Namespace, method: str, path: str, **kwargs) -> dict[str, Any]:
    url = (args.url or os.environ.get("TUREEN_GATEWAY_URL") or DEFAULT_URL).rstrip("/")
    headers = {"Authorization": f"Bearer {master_key(args)}"}
    try:
        response = httpx.request(method, url + path, headers=headers, timeout=args.timeout, **kwargs)
    except httpx.HTTPError as exc:
        raise CLIError(f"cannot reach the gateway at {url}: {type(exc).__name__}") from None
    try:
        body = response.json()
    except ValueError:
        raise CLIError(f"{method} {path}: HTTP {response.status_code} without a JSON body") from None
    if response.status_code >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise CLIError(f"{method} {path}: HTTP {response.status_code}: {error.get('message', body)}")
    return body


def run(args: argparse.Namespace) -> int:
    console = Console(width=None if sys.stdout.isatty() else 160)  # piped: do not wrap the table at 80
    try:
        body = _dispatch(args)
    except CLIError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False)
        return exc.status
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        _show(console, args.keys_command, body)
    return 0


def _dispatch(args: argparse.Namespace) -> dict[str, Any]:
    from tureen.gateway.keys import token_of  # here, not at the top: `tureen --help` stays light

    command = args.keys_command
    if command == "create":
        return _call(args, "POST", "/key/generate", json=_fields(args))
    if command == "list":
        params = {"page": args.page, "size": args.size, "return_full_object": "true"}
        params.update({k: v for k, v in (("team_id", args.team_id), ("key_alias", args.key_alias)) if v})
        return _call(args, "GET", "/key/list", params=params)
    if command == "info":  # keys are hashed here: a key never travels in a URL (proxies log URLs)
        return _call(args, "GET", "/key/info", params={"key": token_of(args.key)})
    if command == "update":
        fields = _fields(args)
        if not fields:
            raise CLIError("nothing to update: pass at least one setting, e.g. --rpm-limit 60", 2)
        return _call(args, "POST", "/key/update", json={"key": token_of(args.key), **fields})
    if not args.keys and not args.key_alias:
        raise CLIError("name the keys (or tokens) to delete, or --key-alias", 2)
    return _call(args, "POST", "/key/delete", json={"keys": [token_of(k) for k in args.keys],
                                                    "key_aliases": args.key_alias})


def _show(console: Console, command: str, body: dict[str, Any]) -> None:
    if command == "create":
        console.print(f"[bold green]{body['key']}[/bold green]", highlight=False, soft_wrap=True)
        console.print("[yellow]Store this key now: the gateway keeps only its hash and cannot show it again.[/yellow]")
        console.print(f"token {body['token']}  alias {body.get('key_alias') or '-'}  team "
                      f"{body.get('team_id') or '-'}  expires {body.get('expires') or 'never'}", highlight=False)
    elif command == "list":
        console.print(_table(body["keys"]))
        console.print(f"page {body['current_page']} of {body['total_pages']}, {body['total_count']} key(s)")
    elif command == "delete":
        for token in body["deleted_keys"]:
            console.print(f"deleted {token}", highlight=False)
    else:
        info = body.get("info", body)
        console.print_json(json.dumps(info))


def _table(keys: list[dict[str, Any]]) -> Table:
    table = Table(show_lines=False)
    for column in ("token", "alias", "team", "models", "rpm", "tpm", "parallel", "spend / budget", "expires"):
        table.add_column(column)
    for k in keys:
        budget = f"{k.get('spend', 0):.4g} / {k['max_budget']:g}" if k.get("max_budget") is not None else \
            f"{k.get('spend', 0):.4g}"
        table.add_row(k["token"][:12] + "…", k.get("key_alias") or "-", k.get("team_id") or "-",
                      ",".join(k.get("models") or []) or "all", _opt(k.get("rpm_limit")), _opt(k.get("tpm_limit")),
                      _opt(k.get("max_parallel_requests")), budget, k.get("expires") or "never")
    return table


def _opt(value: Any) -> str:
    return "-" if value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    """``python -m tureen.gateway.keys_cli ...`` (the same as ``tureen gateway keys ...``)."""
    parser = argparse.ArgumentParser(prog="tureen gateway")
    add_parser(parser.add_subparsers(dest="gateway_command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
