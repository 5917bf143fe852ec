"""`lazycat up`: one foreground supervisor that runs the whole box.

Order of events: take the data directory's lock, start Redis (embedded unless REDIS_URL names
one), migrate and collect static files, start the child processes listed in `process_specs`,
wait until each one is ready, then watch them: a child that exits is restarted with backoff,
one that keeps crashing stops the box. Ctrl-C or SIGTERM stops the children in reverse order,
then Redis, then releases the lock.

Every child runs with `sys.executable -m ...` (so the same virtualenv) in its own process group
(so a Ctrl-C in the terminal reaches only us, and we stop them in order), and its output is
printed line by line behind its padded name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import http.client
import io
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from lazycat.embedded_redis import EmbeddedRedis, EmbeddedRedisError, die_with_parent_hook

STOP_TIMEOUT = 10.0  # seconds a child gets after SIGTERM before SIGKILL
CRASH_WINDOW = 60.0  # more than MAX_CRASHES exits within this many seconds stops the box
MAX_CRASHES = 5
MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0  # a child that ran this long before exiting starts its backoff afresh
PROGRESS_EVERY = 5.0
LOG_TAIL = 200


class SupervisorError(Exception):
    """Something that stops the box; the message is meant for the person at the terminal."""


# --- output --------------------------------------------------------------------------------------


class Output:
    """Prefixed, line-at-a-time output shared by the reader threads and the supervisor."""

    def __init__(self, width: int, stream: TextIO | None = None) -> None:
        self.width = width
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()

    def line(self, name: str, text: str) -> None:
        # A closed terminal must not take the supervisor down with it: it still has to stop the
        # children cleanly.
        with self._lock, contextlib.suppress(OSError, ValueError):
            self.stream.write(f"{name:<{self.width}} | {text}\n")
            self.stream.flush()

    def say(self, text: str) -> None:
        self.line("lazycat", text)


class LineWriter(io.TextIOBase):
    """A file-like object that hands each complete line to `emit` (for call_command output)."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        super().__init__()
        self._emit = emit
        self._buffer = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self._emit(line.rstrip("\r"))
        return len(text)

    def flush(self) -> None:
        # Django flushes half-written lines on purpose ("Applying x..." then " OK"); keep them
        # together and emit only whole lines.
        pass

    def finish(self) -> None:
        if self._buffer:
            self._emit(self._buffer)
            self._buffer = ""


# --- the processes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessSpec:
    """One long-running child of the box: how to start it and how to tell it is ready."""

    name: str
    argv: tuple[str, ...]
    ready: Callable[[Child], bool]
    ready_timeout: float = 60.0


def process_specs(settings: Any) -> list[ProcessSpec]:
    """The box's processes, in start order (they are stopped in reverse)."""
    python = sys.executable
    host, port = settings.LISTEN_HOST, settings.LISTEN_PORT
    control = settings.LAZYCAT_CONTROL_PORT
    return [
        ProcessSpec(
            name="web",
            # -v 0: no access log of Daphne's own; RequestLogMiddleware logs each request
            # as a structured line instead.
            # Proxy headers are trusted only when a reverse proxy is declared: otherwise anyone
            # could pick their own client address and walk around the login lockout.
            # The device control socket (LAZYCAT_CONTROL_PORT) is a second endpoint of the
            # same process; lazycat.asgi serves only /control/ there.
            argv=(python, "-m", "daphne", "-v", "0", "-b", host, "-p", str(port),
                  *(["-e", f"tcp6:port={control}:interface=\\:\\:"] if control else []),
                  *(["--proxy-headers"] if settings.BEHIND_PROXY else []),
                  # Pings only after 5 idle minutes: each one is tunnel traffic for a device,
                  # which would keep its path heartbeating every second (docs/negotiation.md).
                  "--ping-interval", "300", "--ping-timeout", "60",
                  "lazycat.asgi:application"),
            ready=lambda child: http_ready(settings),
        ),
        ProcessSpec(
            name="worker",
            argv=(python, "-m", "celery", "-A", "lazycat", "worker", "--loglevel", "INFO",
                  "--concurrency", "2", "-n", "worker@%h"),
            ready=lambda child: celery_worker_ready(),
        ),
        ProcessSpec(
            name="beat",
            argv=(python, "-m", "celery", "-A", "lazycat", "beat", "--loglevel", "INFO",
                  "--schedule", str(settings.CELERY_BEAT_SCHEDULE_FILENAME)),
            # Beat has nothing to ask; it is ready once it said it started (or stayed up 2 s).
            ready=lambda child: child.saw("beat: Starting") or child.uptime() >= 2.0,
            ready_timeout=30.0,
        ),
        # The tunnel endpoint: ready once its socket is bound and its relays are added.
        ProcessSpec(
            name="transportd",
            argv=(python, "-m", "lazycat.tunnel"),
            ready=lambda child: child.saw("transportd is up"),
            ready_timeout=30.0,
        ),
    ]  # fmt: skip


def loopback_for(host: str) -> str:
    """Where to reach a server bound to `host` from this machine."""
    if host == "0.0.0.0":  # noqa: S104 - comparing, not binding
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def console_url(host: str, port: int) -> str:
    shown = loopback_for(host)
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def _probe_host_header(settings: Any, host: str, port: int) -> str:
    """A Host header the console accepts, so a strict ALLOWED_HOSTS does not fail the probe."""
    from django.http.request import validate_host

    natural = f"[{host}]" if ":" in host else host
    if validate_host(natural, settings.ALLOWED_HOSTS):
        return f"{natural}:{port}"
    for allowed in settings.ALLOWED_HOSTS:
        if allowed != "*" and not allowed.startswith("."):
            return f"{allowed}:{port}"
    return f"{natural}:{port}"


def http_ready(settings: Any) -> bool:
    """The web process answers GET /healthz with 200."""
    host = loopback_for(settings.LISTEN_HOST)
    port = settings.LISTEN_PORT
    headers = {"Host": _probe_host_header(settings, host, port)}
    if getattr(settings, "HTTPS", False):
        # Behind TLS the console redirects plain HTTP; say the proxy already terminated TLS.
        headers["X-Forwarded-Proto"] = "https"
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", "/healthz", headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def celery_worker_ready() -> bool:
    """A worker answers a Celery ping through the broker (proves broker and worker both)."""
    from lazycat.celery import app

    try:
        replies = app.control.ping(timeout=1.0)
    except Exception:  # the broker may refuse us while it starts; any failure means "not yet"
        return False
    return any(name.startswith("worker@") for reply in replies or [] for name in reply)


def describe_status(status: int) -> str:
    if status < 0:
        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"status {status}"


class Child:
    """One running (or waiting-to-restart) child process and its output."""

    def __init__(self, spec: ProcessSpec, output: Output, env: dict[str, str]) -> None:
        self.spec = spec
        self.name = spec.name
        self.output = output
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.restart_at: float | None = None
        self.consecutive_crashes = 0
        self.crash_times: deque[float] = deque()
        self._reader: threading.Thread | None = None
        self._tail: deque[str] = deque(maxlen=LOG_TAIL)
        self._tail_lock = threading.Lock()

    def spawn(self) -> None:
        with self._tail_lock:
            self._tail.clear()
        self.proc = subprocess.Popen(
            self.spec.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            # Its own session and process group: a terminal Ctrl-C reaches only the supervisor,
            # which stops children in order (otherwise they would get SIGINT twice, and Redis
            # could vanish under the web process while it is still shutting down).
            start_new_session=True,
            preexec_fn=die_with_parent_hook(),  # if we are SIGKILLed, they get SIGTERM
        )
        self.started_at = time.monotonic()
        self.restart_at = None
        self._reader = threading.Thread(
            target=self._read, args=(self.proc,), name=f"{self.name}-output", daemon=True
        )
        self._reader.start()
        self.output.say(f"started {self.name} (pid {self.proc.pid})")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def uptime(self) -> float:
        return time.monotonic() - self.started_at if self.running() else 0.0

    def saw(self, text: str) -> bool:
        with self._tail_lock:
            return any(text in line for line in self._tail)

    def reap(self) -> None:
        """After the main process exited: kill what it left in its group, drain its output."""
        if self.proc is not None:
            self._kill_group()
        if self._reader is not None:
            self._reader.join(timeout=2)
            self._reader = None

    def stop(self, timeout: float, hurry: Callable[[], bool] = lambda: False) -> None:
        """SIGTERM, up to `timeout` seconds (less if `hurry()` turns true), then SIGKILL."""
        proc = self.proc
        self.restart_at = None
        if proc is None:
            return
        if proc.poll() is None:
            self.output.say(f"stopping {self.name} (pid {proc.pid})")
            # SIGTERM to the main process only: Celery and Daphne shut their own helpers down.
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline and not hurry():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(0.1)
            if proc.poll() is None:
                self.output.say(f"{self.name} did not stop in time; killing it")
                self._kill_group()
                proc.wait()
        self.reap()
        self.proc = None

    def _kill_group(self) -> None:
        # The group id is the child's own PID (start_new_session), so this reaches exactly the
        # processes it started (e.g. Celery's pool), nothing else on the machine.
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                with self._tail_lock:
                    self._tail.append(line)
                self.output.line(self.name, line)


# --- the data directory lock ----------------------------------------------------------------------


class InstanceLock:
    """An exclusive flock on DATA_DIR/lazycat.lock, with the holder's PID written inside.

    flock is released by the kernel when the holder dies, so a crashed run never blocks the
    next one; the file itself stays (deleting lock files invites two holders).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        # os.open makes the descriptor non-inheritable (PEP 446), so children never hold it.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                return False
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> int | None:
        """The PID written by whoever holds the lock (it may be mid-write: retry briefly)."""
        deadline = time.monotonic() + 1.0
        while True:
            with contextlib.suppress(OSError, ValueError):
                return int(self.path.read_text().strip())
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


# --- the supervisor ------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """The URL without its password, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def box_is_set_up() -> bool | None:
    """Whether the setup page has run (a row in core_box); None when that cannot be told."""
    from django.db import connection

    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM core_box LIMIT 1")
            return cursor.fetchone() is not None
    except Exception:  # the table may not exist in some future layout: then just don't say
        return None
    finally:
        connection.close()


class Supervisor:
    def __init__(
        self,
        settings: Any,
        env: Mapping[str, str],
        specs: list[ProcessSpec] | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.settings = settings
        # The children get our environment as it is (the CLI hands it in; only settings and the
        # CLI read the environment), unbuffered so their lines reach us as they are written.
        self.env = {**env, "PYTHONUNBUFFERED": "1"}
        self.specs = specs if specs is not None else process_specs(settings)
        width = max(len(name) for name in ["lazycat", "redis", *(s.name for s in self.specs)])
        self.output = Output(width, stream)
        self.data_dir = Path(settings.DATA_DIR)
        self.lock = InstanceLock(self.data_dir / "lazycat.lock")
        self.redis: EmbeddedRedis | None = None
        self.children: list[Child] = []
        self._wake = threading.Event()
        self._stop_signal: int | None = None
        self._signals = 0
        self._stopping = False
        self._force = False

    def say(self, text: str) -> None:
        self.output.say(text)

    # The whole life of the box. Returns the process exit status.
    def run(self) -> int:
        if not self.lock.acquire():
            pid = self.lock.holder()
            shown = str(pid) if pid else "unknown"
            print(
                f"lazycat is already running here (pid {shown}); stop it with Ctrl-C in its "
                f"terminal or: kill {shown}",
                file=sys.stderr,
            )
            return 1
        previous = self._install_signal_handlers()
        status = 0
        try:
            self._start()
            if self._stop_signal is None:
                self._watch()
        except SupervisorError as exc:
            self.say(f"error: {exc}")
            status = 1
        except KeyboardInterrupt:  # a second Ctrl-C during start-up
            pass
        except Exception:
            for line in traceback.format_exc().splitlines():
                self.say(line)
            status = 1
        finally:
            self._stopping = True
            self._shutdown()
            self.lock.release()
            self._restore_signal_handlers(previous)
        if status == 0:
            self.say("stopped")
        return status

    def _start(self) -> None:
        self._start_redis()
        self._check_stop()
        self._prepare_database_and_static()
        self._check_stop()
        for spec in self.specs:
            child = Child(spec, self.output, self.env)
            self.children.append(child)
            child.spawn()
        for child in self.children:
            if not self._wait_ready(child):
                return
        self.say(
            f"lazycat is up: {console_url(self.settings.LISTEN_HOST, self.settings.LISTEN_PORT)}"
        )
        if box_is_set_up() is False:
            self.say("open it to create the owner account")

    def _start_redis(self) -> None:
        settings = self.settings
        if not settings.REDIS_EMBEDDED:
            import redis

            shown = redact_url(settings.REDIS_URL)
            self.say(f"checking redis at {shown}…")
            client = redis.Redis.from_url(
                settings.REDIS_URL, socket_timeout=3, socket_connect_timeout=3
            )
            try:
                client.ping()
            except (redis.RedisError, OSError) as exc:
                raise SupervisorError(
                    f"REDIS_URL={shown} does not answer PING ({exc}); start that Redis, fix "
                    "REDIS_URL, or unset it to use the embedded one"
                ) from None
            finally:
                client.close()
            self.say("redis is ready")
            return
        self.say("waiting for redis…")
        self.redis = EmbeddedRedis(
            Path(settings.REDIS_SOCKET),
            self.data_dir,
            on_line=lambda line: self.output.line("redis", line),
        )
        try:
            self.redis.start(timeout=10)
        except EmbeddedRedisError as exc:
            self.redis = None
            raise SupervisorError(f"redis did not start: {exc}") from None
        self.say(f"started redis (pid {self.redis.pid})")
        self.say("redis is ready")

    def _prepare_database_and_static(self) -> None:
        from django.core.management import call_command
        from django.db import connections

        writer = LineWriter(self.say)
        for command in ("migrate", "collectstatic"):
            self.say(f"running {command}…")
            try:
                call_command(command, interactive=False, verbosity=1, stdout=writer)
            except Exception as exc:
                writer.finish()
                for line in traceback.format_exc().splitlines():
                    self.say(line)
                raise SupervisorError(f"{command} failed: {exc}") from None
            writer.finish()
        # Children open their own connections; we only query again for the set-up hint.
        connections.close_all()

    def _wait_ready(self, child: Child) -> bool:
        self.say(f"waiting for {child.name}…")
        began = time.monotonic()
        deadline = began + child.spec.ready_timeout
        next_note = began + PROGRESS_EVERY
        while True:
            self._tick()
            if self._stop_signal is not None:
                return False
            if child.running() and child.spec.ready(child):
                self.say(f"{child.name} is ready ({time.monotonic() - began:.1f} s)")
                return True
            now = time.monotonic()
            if now >= deadline:
                raise SupervisorError(
                    f"{child.name} did not become ready within {child.spec.ready_timeout:g} s; "
                    f"look at its '{child.name}' lines above"
                )
            if now >= next_note:
                self.say(f"still waiting for {child.name} ({now - began:.0f} s)…")
                next_note = now + PROGRESS_EVERY
            self._wake.wait(0.25)

    def _watch(self) -> None:
        while self._stop_signal is None:
            self._tick()
            self._wake.wait(0.5)

    def _tick(self) -> None:
        """Notice exited children and restart them on their backoff schedule."""
        now = time.monotonic()
        for child in self.children:
            if child.proc is None:
                if child.restart_at is not None and now >= child.restart_at:
                    child.spawn()
                continue
            status = child.proc.poll()
            if status is None:
                continue
            ran_for = now - child.started_at
            child.reap()
            child.proc = None
            child.crash_times.append(now)
            while child.crash_times and child.crash_times[0] < now - CRASH_WINDOW:
                child.crash_times.popleft()
            if len(child.crash_times) > MAX_CRASHES:
                raise SupervisorError(
                    f"{child.name} exited {len(child.crash_times)} times within "
                    f"{CRASH_WINDOW:g} s (last with {describe_status(status)}); stopping "
                    f"everything. Look at its '{child.name}' lines above for the cause"
                )
            if ran_for >= STABLE_AFTER:
                child.consecutive_crashes = 0
            child.consecutive_crashes += 1
            delay = min(MAX_BACKOFF, 2.0 ** (child.consecutive_crashes - 1))
            child.restart_at = now + delay
            self.say(
                f"{child.name} exited with {describe_status(status)}; restarting in {delay:g} s"
            )

    def _check_stop(self) -> None:
        if self._stop_signal is not None:
            raise KeyboardInterrupt

    def _shutdown(self) -> None:
        if self._stop_signal is not None:
            name = signal.Signals(self._stop_signal).name
            self.say(f"{name} received; stopping")
        for child in reversed(self.children):
            child.stop(STOP_TIMEOUT, hurry=lambda: self._force)
        if self.redis is not None:
            self.say(f"stopping redis (pid {self.redis.pid})")
            self.redis.stop(timeout=5)
            self.redis = None

    # --- signals ---

    def _install_signal_handlers(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    def _restore_signal_handlers(self, previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._stop_signal is None:
            self._stop_signal = signum
        self._wake.set()
        if self._signals > 1:
            if self._stopping:
                # Asked again while stopping: do not wait the full grace period for each child.
                self._force = True
            else:
                # Asked again while starting (e.g. migrate is slow): abandon start-up now; the
                # `finally` in run() still stops whatever was started.
                raise KeyboardInterrupt
