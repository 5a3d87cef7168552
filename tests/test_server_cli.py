"""`tureen serve` flags: every one documented, vLLM's names, and configs built from them."""

from __future__ import annotations

import pytest

from tureen.cli import build_parser
from tureen.errors import ConfigError
from tureen.server.cli import server_config_from_args
from tureen.server.config import ServerConfig

ISSUE_FLAGS = ["--host", "--port", "--served-model-name", "--api-key", "--dtype", "--max-model-len",
               "--max-num-seqs", "--max-num-batched-tokens", "--block-size", "--gpu-memory-utilization",
               "--kv-cache-memory", "--enable-prefix-caching", "--no-enable-prefix-caching", "--seed",
               "--chat-template", "--max-queue-len", "--shutdown-timeout", "--request-timeout", "--log-level"]


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ISSUE_FLAGS:
        assert flag in text, flag
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    for action in serve._actions:
        assert action.help, action.option_strings  # nothing undocumented


def test_flags_build_typed_configs(monkeypatch):
    monkeypatch.setenv("TUREEN_API_KEY", "from-env")
    args = build_parser().parse_args(["serve", "/models/x", "--port", "9001", "--max-queue-len", "3",
                                      "--request-timeout", "2.5", "--uvicorn-log-level", "debug",
                                      "--max-request-body-bytes", "1MiB", "--no-enable-prefix-caching",
                                      "--disable-log-stats"])
    cfg = server_config_from_args(args)
    assert (cfg.port, cfg.max_queue_len, cfg.request_timeout, cfg.log_level) == (9001, 3, 2.5, "debug")
    assert cfg.max_request_body_bytes == 2**20 and cfg.api_key == "from-env" and cfg.disable_log_stats
    assert args.model == "/models/x" and args.enable_prefix_caching is False
    explicit = build_parser().parse_args(["serve", "--api-key", "k"])
    assert server_config_from_args(explicit).api_key == "k"


@pytest.mark.parametrize("bad", [{"max_queue_len": 0}, {"request_timeout": 0}, {"port": 70000},
                                 {"max_request_body_bytes": "lots"}, {"shutdown_timeout": -1}])
def test_bad_server_options_are_config_errors(bad):
    with pytest.raises(ConfigError):
        ServerConfig(**bad)


def test_bad_flag_value_exits_2_with_message(capsys):
    from tureen.cli import main

    assert main(["serve", "--max-queue-len", "0"]) == 2
    assert "max_queue_len" in capsys.readouterr().err
