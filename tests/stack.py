"""Run the real box — `lazycat up`: Daphne, Celery worker and beat, embedded Redis — for the
end-to-end tests and the benchmarks, in a throwaway data directory on a free loopback port."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent
UP_LINE = re.compile(r"lazycat is up: (http://\S+)")


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for an init that does not reap counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] != "Z"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """`with Stack() as stack:` starts the box and stops it (and every child) on exit."""

    def __init__(self, start_timeout: float = 120.0, extra_env: dict[str, str] | None = None):
        self.data_dir = Path(tempfile.mkdtemp(prefix="lazycat-e2e-"))
        self.port = free_port()
        self.url = ""
        self.start_timeout = start_timeout
        self.log: deque[str] = deque(maxlen=20_000)
        self.env = (
            {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL"}}
            | {
                "DJANGO_SETTINGS_MODULE": "lazycat.settings",
                "LAZYCAT_DATA_DIR": str(self.data_dir),
                "LAZYCAT_LISTEN": f"127.0.0.1:{self.port}",
                # transportd registers at the relays: keep its traffic on loopback (nothing
                # listens there; the console only shows the relay's name)
                "LAZYCAT_RELAYS": f"home=127.0.0.1:{free_port()}",
                "LAZYCAT_TUNNEL_LISTEN": f"127.0.0.1:{free_port()}",
                "LAZYCAT_TUNNEL_TUN": "false",
                "LAZYCAT_SECRET_KEY": secrets.token_urlsafe(40),
                "PYTHONUNBUFFERED": "1",
            }
            | (extra_env or {})
        )
        self.proc: subprocess.Popen[str] | None = None
        self._up = threading.Event()

    def __enter__(self) -> Stack:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lazycat.cli", "up"],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not self._up.wait(self.start_timeout) or not self.url:
            tail = "\n".join(list(self.log)[-400:])
            self.stop()
            raise RuntimeError(f"lazycat up did not come up in {self.start_timeout} s:\n{tail}")
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line.rstrip())
            match = UP_LINE.search(line)
            if match:
                self.url = match.group(1).rstrip("/")
                self._up.set()
        self._up.set()  # the process ended: stop waiting

    def stop(self) -> None:
        """SIGINT (Ctrl-C) like a person would; if it hangs, kill its process group."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        import shutil

        shutil.rmtree(self.data_dir, ignore_errors=True)

    def run_python(self, script: Path, *args: str, timeout: float = 60) -> str:
        """Run a helper script against this box's data (a second process, as a device or the
        tunnel daemon would be). Returns its stdout; raises with its output if it fails."""
        result = subprocess.run(
            [sys.executable, str(script), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{script.name} {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
            )
        return result.stdout

    def django(self) -> None:
        """Configure Django in this process against the stack's data directory."""
        os.environ.update({k: self.env[k] for k in ("LAZYCAT_DATA_DIR", "LAZYCAT_SECRET_KEY")})
        os.environ["DJANGO_SETTINGS_MODULE"] = "lazycat.settings"
        import django

        django.setup()


def wait_for(predicate, timeout: float, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"not true within {timeout} s")
