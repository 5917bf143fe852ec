"""``lazycat-relay``'s flags, environment and error messages (in process; the running command is
tested with real sockets in test_relay_aio.py)."""

from __future__ import annotations

import errno
import logging
import re
from pathlib import Path

import pytest

from transport.relay_aio import ServerConfig
from transport.relay_cli import (
    LogfmtFormatter,
    UsageError,
    _apply_env,
    build_config,
    build_parser,
    explain_bind_error,
    parse_address,
)


def config_for(*argv: str) -> ServerConfig:
    parser = build_parser()
    return build_config(parser.parse_args(_apply_env(parser, list(argv))))


@pytest.fixture(autouse=True)
def _no_relay_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("LAZYCAT_RELAY_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:3478", ("0.0.0.0", 3478)),  # noqa: S104
        ("[::]:443", ("::", 443)),
        ("[2001:db8::1]:8443", ("2001:db8::1", 8443)),
        (" 127.0.0.1:0 ", ("127.0.0.1", 0)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text, "--udp") == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3478", "expected IP:PORT"),
        ("::1:3478", "expected IP:PORT"),
        ("[::1]3478", "as [addr]:port"),
        ("relay.example.net:3478", "is not an IP address"),
        ("0.0.0.0:99999", "from 0 to 65535"),
        ("0.0.0.0:http", "from 0 to 65535"),
    ],
)
def test_bad_address_says_what_to_write(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_address(text, "--udp")


def test_defaults_listen_on_udp_3478_for_both_families() -> None:
    config = config_for()
    assert config.udp == [("0.0.0.0", 3478), ("::", 3478)]  # noqa: S104
    assert config.tcp == [] and config.tls == []
    assert config.relay.peer_packets_per_s == 2000


def test_flags_reach_the_config() -> None:
    config = config_for(
        "--udp",
        "127.0.0.1:1000,[::1]:1000",
        "--udp",
        "127.0.0.1:1001",
        "--tcp",
        "127.0.0.1:2000",
        "--max-peers",
        "50",
        "--peer-pps",
        "100",
        "--peer-pps-burst",
        "200",
        "--accept-rate",
        "7",
        "--region",
        "eu",
        "--no-stun",
    )
    assert config.udp == [("127.0.0.1", 1000), ("::1", 1000), ("127.0.0.1", 1001)]
    assert config.tcp == [("127.0.0.1", 2000)]
    assert config.relay.max_peers == 50
    assert (config.relay.peer_packets_per_s, config.relay.peer_packets_burst) == (100, 200)
    assert (config.relay.accept_per_s, config.relay.accept_burst) == (7, 14)
    assert config.region == "eu" and config.stun is False


def test_environment_sets_flags_and_the_command_line_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LAZYCAT_RELAY_UDP", "127.0.0.1:5000,[::1]:5000")
    monkeypatch.setenv("LAZYCAT_RELAY_REGION", "hk")
    monkeypatch.setenv("LAZYCAT_RELAY_NO_STUN", "true")
    config = config_for("--region", "eu")
    assert config.udp == [("127.0.0.1", 5000), ("::1", 5000)]
    assert config.region == "eu"
    assert config.stun is False


def test_metrics_key_from_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key = tmp_path / "metrics.key"
    key.write_text("s3cret\n")
    monkeypatch.setenv("LAZYCAT_RELAY_METRICS_KEY_FILE", str(key))
    assert config_for().metrics_key == "s3cret"
    monkeypatch.setenv("LAZYCAT_RELAY_METRICS_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="METRICS_KEY_FILE"):
        config_for()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls", "0.0.0.0:443"], "--tls needs --tls-cert and --tls-key"),
        (["--tls-cert", "x.pem", "--tls-key", "y.pem"], "only used with --tls"),
        (["--tcp", "0.0.0.0:443", "--max-frame", "20000"], "--max-frame must be at most"),
        (["--peer-pps", "0"], "peer_packets_per_s must be positive"),
        (["--max-connections", "0"], "--max-connections must be positive"),
    ],
)
def test_bad_combinations_are_explained(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        config_for(*argv)


def test_bind_errors_are_explained() -> None:
    assert "already in use" in explain_bind_error(OSError(errno.EADDRINUSE, "x"))
    assert "CAP_NET_BIND_SERVICE" in explain_bind_error(OSError(errno.EACCES, "x"))
    assert "no such address" in explain_bind_error(OSError(errno.EADDRNOTAVAIL, "x"))


def test_log_lines_are_logfmt_and_hide_keys() -> None:
    record = logging.LogRecord("lazycat.relay", logging.INFO, "", 0, "relay listening", None, None)
    record.udp = "0.0.0.0:3478"
    record.metrics_key = "s3cret"
    record.error = 'a "quoted" thing'
    line = LogfmtFormatter().format(record)
    assert 'level=info logger=lazycat.relay msg="relay listening" udp=0.0.0.0:3478' in line
    assert "metrics_key=[redacted]" in line and "s3cret" not in line
    assert 'error="a \\"quoted\\" thing"' in line
