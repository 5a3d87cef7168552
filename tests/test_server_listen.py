"""The default listen address is loopback, and exposing the server without an API key is warned about."""

from __future__ import annotations

import logging

import pytest

from tureen.cli import build_parser
from tureen.server.cli import server_config_from_args
from tureen.server.config import ServerConfig, is_loopback_host, warn_if_exposed

logger = logging.getLogger("tureen.server")


def test_default_host_is_loopback():
    assert ServerConfig().host == "127.0.0.1"
    assert server_config_from_args(build_parser().parse_args(["serve"])).host == "127.0.0.1"


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.53", True), ("::1", True),
                                            ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                            ("::", False), ("10.1.2.3", False), ("my-host.internal", False)])
def test_loopback_detection(host, loopback):
    assert is_loopback_host(host) is loopback


def test_warns_on_a_public_address_without_a_key(caplog):
    with caplog.at_level(logging.WARNING, logger="tureen.server"):
        assert warn_if_exposed(ServerConfig(host="0.0.0.0"), logger)
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "0.0.0.0" in record.getMessage()
    assert "--api-key" in record.getMessage()


@pytest.mark.parametrize("config", [ServerConfig(), ServerConfig(host="::1"),
                                    ServerConfig(host="0.0.0.0", api_key="sk-secret-value")])
def test_no_warning_on_loopback_or_with_a_key(caplog, config):
    with caplog.at_level(logging.WARNING, logger="tureen.server"):
        assert not warn_if_exposed(config, logger)
    assert not caplog.records
    assert "sk-secret-value" not in caplog.text
