"""`lazycat up` for real: Redis, Daphne, Celery worker and beat in a temporary data directory.

Runs the console script's module as a subprocess the way a person would, and checks what they
would see: the URL line, a healthy /healthz, a refused second instance, a crashed child that
comes back, and a Ctrl-C that leaves no process behind. Needs no test database.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.stack import alive, free_port

ROOT = Path(__file__).resolve().parents[2]
STARTED = re.compile(r"lazycat\s+\| started (\S+) \(pid (\d+)\)")

pytestmark = pytest.mark.timeout(240)


def _belongs_to(pid: int, data_dir: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"LAZYCAT_DATA_DIR={data_dir}".encode() in environ


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The caller's environment minus anything that would point the box elsewhere."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LAZYCAT_", "CELERY_")) and k not in {"REDIS_URL", "DATABASE_URL"}
    }
    env.update(
        DJANGO_SETTINGS_MODULE="lazycat.settings",  # pytest-django set tests.settings here
        LAZYCAT_DATA_DIR=str(data_dir),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def _lazycat(*args: str) -> list[str]:
    return [sys.executable, "-m", "lazycat.cli", *args]


class Up:
    """A running `lazycat up` whose output a thread collects, and that is always cleaned up."""

    def __init__(self, env: dict[str, str]) -> None:
        self.data_dir = env["LAZYCAT_DATA_DIR"]
        self.proc = subprocess.Popen(
            _lazycat("up"),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # so SIGINT below reaches only the supervisor, like Ctrl-C
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<EOF>")
            self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float, after: int = 0) -> re.Match[str]:
        """The first line (from index `after`) matching `pattern`; fails with the output."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[after:]:
                    match = regex.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.lines and self.lines[-1] == "<EOF>"):
                    break
                self._changed.wait(remaining)
        tail = "\n".join(self.lines[-80:])
        pytest.fail(f"no line matching {pattern!r} within {timeout} s; output ends:\n{tail}")

    def child_pids(self) -> dict[str, list[int]]:
        """Every PID the supervisor reported starting (`lazycat | started web (pid N)`)."""
        pids: dict[str, list[int]] = {}
        for match in STARTED.finditer(self.output()):
            pids.setdefault(match.group(1), []).append(int(match.group(2)))
        return pids

    def kill_everything(self) -> None:
        """Last resort for a failing test: no process of this run may outlive it.

        A PID from the output is only signalled while its environment still names this run's
        data directory, so a PID the kernel has since reused for something else is left alone.
        """
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        for pids in self.child_pids().values():
            for pid in pids:
                if _belongs_to(pid, self.data_dir):
                    for kill in (os.killpg, os.kill):  # each child leads its own process group
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def _get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_up_serves_refuses_a_second_copy_restarts_a_crash_and_stops_clean(tmp_path: Path) -> None:
    port = free_port()
    env = _env(
        tmp_path,
        LAZYCAT_LISTEN=f"127.0.0.1:{port}",
        LAZYCAT_TUNNEL_LISTEN=f"127.0.0.1:{free_port()}",
        LAZYCAT_TUNNEL_TUN="false",
    )
    up = Up(env)
    try:
        up.wait_for(rf"lazycat is up: http://127\.0\.0\.1:{port}/$", timeout=60)
        pids = up.child_pids()
        assert set(pids) == {"redis", "web", "worker", "beat", "transportd"}, up.output()
        assert all(alive(pid) for group in pids.values() for pid in group)
        up.wait_for(r"open it to create the owner account", timeout=10)
        assert _get(port, "/healthz") == 200

        # A second copy on the same data directory touches nothing and names the first.
        second = subprocess.run(
            _lazycat("up"),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1, second.stdout + second.stderr
        assert (
            f"lazycat is already running here (pid {up.proc.pid}); stop it with Ctrl-C in its "
            f"terminal or: kill {up.proc.pid}"
        ) in second.stderr
        assert "redis" not in second.stdout
        assert _get(port, "/healthz") == 200

        # A child that dies is restarted after the first backoff step.
        worker = pids["worker"][0]
        mark = len(up.lines)
        os.kill(worker, signal.SIGKILL)
        up.wait_for(r"worker exited with signal SIGKILL; restarting in 1 s", 15, after=mark)
        up.wait_for(r"started worker \(pid \d+\)", 15, after=mark)
        assert len(up.child_pids()["worker"]) == 2

        # Ctrl-C: everything stops, in order, Redis last, and the lock is released.
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(timeout=20) == 0, up.output()
        every_pid = [pid for group in up.child_pids().values() for pid in group]
        assert not [pid for pid in every_pid if alive(pid)], up.output()
        out = up.output()
        assert (
            out.index("stopping transportd")
            < out.index("stopping beat")
            < out.index("stopping worker")
            < out.index("stopping web")
            < out.index("stopping redis")
        )
        assert not (tmp_path / "redis.sock").exists()
        assert (tmp_path / "lazycat.lock").read_text() == ""
    finally:
        up.kill_everything()


def test_bad_setting_exits_2_and_names_the_variable(tmp_path: Path) -> None:
    result = subprocess.run(
        _lazycat("up"),
        cwd=ROOT,
        env=_env(tmp_path, LAZYCAT_LISTEN="nonsense"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("lazycat: LAZYCAT_LISTEN='nonsense'")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "redis.sock").exists()
    assert not (tmp_path / "lazycat.lock").exists()


def test_check_prints_the_configuration_in_force(tmp_path: Path) -> None:
    result = subprocess.run(
        _lazycat("check"),
        cwd=ROOT,
        env=_env(tmp_path, LAZYCAT_LISTEN="0.0.0.0:8555"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"data dir:  {tmp_path.resolve()}" in result.stdout
    assert f"sqlite {tmp_path.resolve() / 'lazycat.sqlite3'}" in result.stdout
    assert f"embedded, unix socket {tmp_path.resolve() / 'redis.sock'}" in result.stdout
    assert "0.0.0.0:8555 (http://127.0.0.1:8555/)" in result.stdout
