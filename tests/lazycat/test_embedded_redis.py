"""The private redis-server: starts on its socket only, stops cleanly, never steals a live socket.

These start their own servers in their own temporary directories (independent of the session
server in conftest.py) and need no database.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import time
from pathlib import Path

import pytest
import redis

from lazycat.embedded_redis import MAX_SOCKET_PATH, EmbeddedRedis, EmbeddedRedisError, ping
from tests.stack import alive

pytestmark = pytest.mark.timeout(60)


def _fake_server(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-redis-server"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o700)
    return str(script)


def test_start_answers_on_the_socket_only_and_stop_ends_it(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    server = EmbeddedRedis(sock, tmp_path)
    server.start()
    try:
        pid = server.pid
        assert pid is not None and alive(pid)
        client = redis.Redis(unix_socket_path=str(sock))
        assert client.ping()
        assert client.config_get("port") == {"port": "0"}  # no TCP listener at all
        assert stat.S_IMODE(sock.stat().st_mode) == 0o700
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("dir") == {"dir": str(tmp_path.resolve())}
        client.close()
    finally:
        server.stop()
    assert server.pid is None
    assert not alive(pid)
    assert not sock.exists()  # a clean shutdown removes the socket


def test_context_manager_starts_and_stops(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    with EmbeddedRedis(sock, tmp_path) as server:
        pid = server.pid
        assert pid is not None
        assert ping(sock)
    assert not alive(pid)
    assert not ping(sock)


def test_log_lines_are_captured_and_forwarded(tmp_path: Path) -> None:
    seen: list[str] = []
    with EmbeddedRedis(tmp_path / "redis.sock", tmp_path, on_line=seen.append) as server:
        assert any("ready to accept connections" in line for line in server.log_tail(50))
    assert any("ready to accept connections" in line for line in seen)


def test_stale_socket_from_a_crashed_run_is_removed(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    # A bound-then-closed socket leaves the file behind with nobody listening: a crashed run.
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(sock))
    leftover.close()
    assert sock.exists()
    with EmbeddedRedis(sock, tmp_path):
        assert ping(sock)


def test_socket_someone_listens_on_is_left_alone(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(sock))
        listener.listen()
        with pytest.raises(EmbeddedRedisError, match="already listening"):
            EmbeddedRedis(sock, tmp_path).start()
        assert sock.exists()


def test_second_server_on_the_same_socket_is_refused(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    with EmbeddedRedis(sock, tmp_path):
        with pytest.raises(EmbeddedRedisError, match="already listening"):
            EmbeddedRedis(sock, tmp_path).start()
        assert ping(sock)  # the first one is untouched


def test_a_file_that_is_not_a_socket_is_not_deleted(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    sock.write_text("precious")
    with pytest.raises(EmbeddedRedisError, match="not a socket"):
        EmbeddedRedis(sock, tmp_path).start()
    assert sock.read_text() == "precious"


def test_server_that_dies_at_start_reports_its_last_log_lines(tmp_path: Path) -> None:
    fake = _fake_server(tmp_path, 'echo "FATAL: bad config line 7"; exit 3')
    server = EmbeddedRedis(tmp_path / "redis.sock", tmp_path, executable=fake)
    with pytest.raises(EmbeddedRedisError) as caught:
        server.start()
    assert "status 3" in str(caught.value)
    assert "FATAL: bad config line 7" in str(caught.value)
    assert server.pid is None


def test_server_that_never_answers_is_stopped_after_the_timeout(tmp_path: Path) -> None:
    fake = _fake_server(tmp_path, 'echo "pretending"; exec sleep 30')
    server = EmbeddedRedis(tmp_path / "redis.sock", tmp_path, executable=fake)
    started = time.monotonic()
    with pytest.raises(EmbeddedRedisError, match=r"did not answer PING within 0\.5 s"):
        server.start(timeout=0.5)
    assert time.monotonic() - started < 10
    assert server.pid is None


def test_stop_kills_a_server_that_ignores_sigterm(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    server = EmbeddedRedis(sock, tmp_path)
    server.start()
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM; SIGKILL still works
    started = time.monotonic()
    server.stop(timeout=0.5)
    assert time.monotonic() - started < 5
    assert not alive(pid)
    assert not sock.exists()


def test_socket_path_too_long_for_a_unix_socket_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * (MAX_SOCKET_PATH - len(str(tmp_path))))
    with pytest.raises(EmbeddedRedisError, match="shorter data directory"):
        EmbeddedRedis(deep / "redis.sock", deep).start()
