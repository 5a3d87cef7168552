"""Serving options: the HTTP side's own typed config, beside the engine's ``EngineConfig``.

Each field's ``help`` metadata is the CLI help text (``tureen serve --help``). Where ``vllm serve``
has the same concept, the field (and so the flag) has the same name.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field, fields
from typing import Any

from tureen.config import parse_size
from tureen.errors import ConfigError

LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata=_help(
        "Address to listen on. The default, 127.0.0.1, accepts connections from this machine only; "
        "pass 0.0.0.0 (or ::) to listen on every interface, e.g. in a container or a cluster, and "
        "then set --api-key: a non-loopback address without a key is logged as a warning."))
    port: int = field(default=8000, metadata=_help("Port to listen on."))
    api_key: str | None = field(default=None, metadata=_help(
        "Require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize; /health, /metrics and "
        "/version stay open. Default: the TUREEN_API_KEY environment variable, else no key."))
    max_queue_len: int = field(default=256, metadata=_help(
        "Most requests allowed to wait for the engine; beyond it new requests are shed with 503 + Retry-After."))
    kv_cache_shed_threshold: float = field(default=0.95, metadata=_help(
        "Shed new requests (503 + Retry-After) when KV-cache usage is at least this fraction while requests "
        "are already waiting: the cache has no headroom. A value above 1 disables this check."))
    shutdown_timeout: float = field(default=20.0, metadata=_help(
        "On SIGTERM/SIGINT, seconds to let in-flight requests finish before aborting them "
        "(new requests get 503 meanwhile)."))
    request_timeout: float | None = field(default=None, metadata=_help(
        "Abort a request that runs longer than this many seconds (queue time included) with a 504 "
        "timeout error. Default: no limit."))
    log_level: str = field(default="info", metadata=_help(
        "Log level of tureen and uvicorn.", choices=LOG_LEVELS, aliases=["--uvicorn-log-level"]))
    max_request_body_bytes: int | str = field(default="16MiB", metadata=_help(
        "Largest accepted request body (e.g. 1048576, '16MiB'); larger bodies get 413."))
    http_read_timeout: float = field(default=20.0, metadata=_help(
        "Seconds a client has to send a request's headers (from its first byte, or from opening the "
        "connection), and the longest pause allowed between two reads of its body; past it the server answers "
        "408 and closes the connection. Guards against slow-loris clients holding connections open."))
    max_connections: int | None = field(default=None, metadata=_help(
        "Most open client connections; one more is answered 503 + Retry-After and closed at once, so stalled "
        "clients cannot use up the file descriptors. Default: the open-file limit (ulimit -n) less 128."))
    watchdog_timeout: float = field(default=30.0, metadata=_help(
        "/health answers 503 when the engine has not completed an iteration for this many seconds; the "
        "watchdog then kills the engine process, fails its in-flight requests and restarts it."))
    max_engine_restarts: int = field(default=3, metadata=_help(
        "Most engine restarts (after a crash or a stall) within --engine-restart-window seconds; past it the "
        "server stops restarting and stays unhealthy, so an orchestrator replaces it."))
    engine_restart_window: float = field(default=300.0, metadata=_help(
        "Window in seconds for --max-engine-restarts."))
    deep_health_timeout: float = field(default=10.0, metadata=_help(
        "Time limit in seconds of the real generation run by GET /health?deep=1 (the readiness check)."))
    disable_log_stats: bool = field(default=False, metadata=_help(
        "Do not log periodic engine stats (running, waiting, KV usage, throughput)."))
    log_stats_interval: float = field(default=10.0, metadata=_help("Seconds between engine stats log lines."))
    enable_log_requests: bool = field(default=False, metadata=_help(
        "Also log each request's prompt text and sampling parameters on arrival (off: prompts are never logged)."))
    max_log_len: int | None = field(default=None, metadata=_help(
        "With --enable-log-requests, log at most this many prompt characters or token ids. Default: all."))
    disable_uvicorn_access_log: bool = field(default=False, metadata=_help("Turn off uvicorn's access log."))
    tool_call_parser: str | None = field(default=None, metadata=_help(
        "How to find tool calls in the model's text for tool_choice 'auto': hermes (Qwen2.5, Qwen3, Hermes) or "
        "llama3_json (Llama 3.1/3.2). Needs --enable-auto-tool-choice. Default: none.",
        choices=["hermes", "llama3_json"]))
    enable_auto_tool_choice: bool = field(default=False, metadata=_help(
        "Serve tool_choice 'auto' (the OpenAI default when tools are sent) with --tool-call-parser; without it "
        "such requests get 400. 'required' and named tool choices work either way (grammar-constrained)."))

    def __post_init__(self) -> None:
        self.max_request_body_bytes = parse_size(self.max_request_body_bytes)
        checks = [
            ("port", 0 <= self.port <= 65535, "must be in [0, 65535]"),
            ("max_queue_len", self.max_queue_len >= 1, "must be >= 1"),
            ("kv_cache_shed_threshold", self.kv_cache_shed_threshold > 0, "must be > 0"),
            ("shutdown_timeout", self.shutdown_timeout >= 0, "must be >= 0"),
            ("request_timeout", self.request_timeout is None or self.request_timeout > 0, "must be > 0"),
            ("log_level", self.log_level in LOG_LEVELS, f"must be one of {LOG_LEVELS}"),
            ("max_request_body_bytes", self.max_request_body_bytes > 0, "must be > 0"),
            ("watchdog_timeout", self.watchdog_timeout > 0, "must be > 0"),
            ("http_read_timeout", self.http_read_timeout > 0, "must be > 0"),
            ("max_connections", self.max_connections is None or self.max_connections >= 1, "must be >= 1"),
            ("max_engine_restarts", self.max_engine_restarts >= 0, "must be >= 0"),
            ("engine_restart_window", self.engine_restart_window > 0, "must be > 0"),
            ("deep_health_timeout", self.deep_health_timeout > 0, "must be > 0"),
            ("log_stats_interval", self.log_stats_interval > 0, "must be > 0"),
            ("max_log_len", self.max_log_len is None or self.max_log_len >= 0, "must be >= 0"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{name} {rule}, got {getattr(self, name)!r}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser (hermes or llama3_json)")
        if self.tool_call_parser not in (None, "hermes", "llama3_json"):
            raise ConfigError(f"tool_call_parser must be hermes or llama3_json, got {self.tool_call_parser!r}")


def is_loopback_host(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, 'localhost')."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything, so it is not known to be loopback
        return False


def warn_if_exposed(config: ServerConfig, logger: logging.Logger) -> bool:
    """Warn when the server would accept connections from other machines without an API key."""
    if config.api_key or is_loopback_host(config.host):
        return False
    logger.warning("listening on %s without --api-key: any machine that can reach this port can use the "
                   "model; set --api-key (or TUREEN_API_KEY), or listen on 127.0.0.1", config.host)
    return True


def server_fields() -> list[Any]:
    return list(fields(ServerConfig))
