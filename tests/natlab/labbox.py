"""The real box in the NAT lab: ``lazycat up`` in a lab host's namespace, and real devices.

Not product code and not a test module: the NAT-lab tests import it::

    box = LabBox(lab, box_host, workdir, relays=f"home={RELAY_IPS[0]}:3480")
    box.start()                      # `lazycat up`: its own Redis, migrate, web, worker, beat,
    box.setup_box()                  #   transportd; the owner account, as the setup page does
    phone = LabClient(phone_host, workdir / "phone")
    phone.start_pair(box.pairing_code())
    address = box.approve_pending()  # the owner approves it
    phone.wait_paired()
    phone.up()                       # `lazycat-client up --mode tun`
    phone.status()["path"], box.device(address)["path"]
    box.stop()                       # SIGTERM, bounded; SIGKILL by PID if it hangs

``lazycat up`` is started the way a person would start it: nothing is prepared beforehand (it
takes the data directory's lock, starts the packaged redis-server on a unix socket in that
directory, runs ``migrate`` and ``collectstatic`` itself, then its children). The owner account
is then created by ``do_setup_box``, the action behind the console's setup page. Everything
the box runs, and every Django snippet the test runs against it (``LabBox.django``), lives in
the box host's namespace with one environment: the throwaway data directory, the lab's relay,
the tunnel on the product's default [::]:7483 with its TUN, a random secret key. Nothing here
touches the test session's own Redis or database.

Every process is started through the lab (``Node.popen``), which kills it by PID when it
closes; ``LabBox.stop`` also kills, by PID, any child of ``lazycat up`` still alive in the box's
namespace after it. Every wait has a deadline and fails with the relevant log's tail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import textwrap
import time
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

from tests.natlab.lab import REPO, Host, Lab, LabError

UP_TEXT = (
    "lazycat is up: "  # the supervisor's ready line (lazycat/supervisor.py, Supervisor._start)
)
STARTED = re.compile(r"started (\S+) \(pid (\d+)\)")  # the supervisor's "started web (pid 12)"
TUNNEL_LISTEN = "[::]:7483"  # the product's default: dual stack
OWNER, PASSWORD = "owner", "a-long-lab-password-1234"

# Variables the test process has that must not leak into the box (tests.settings sets some).
_DROP = {"DATABASE_URL", "REDIS_URL", "PYTHONPATH", "DJANGO_SETTINGS_MODULE"}

# A TCP service for the tests to reach through the tunnel: ``ECHO ADDRESS PORT`` takes a length
# and that many bytes, and answers their SHA-256 then the bytes reversed (both directions carry
# the payload); one thread a connection. ``ECHO_CLIENT ADDRESS PORT SIZE`` prints "ok" or why not.
ECHO = """
import hashlib, socket, sys, threading
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(32)
print("ready", flush=True)
def serve(conn):
    with conn:
        conn.settimeout(20)
        n = int.from_bytes(conn.recv(4, socket.MSG_WAITALL), "big")
        got = bytearray()
        while len(got) < n:
            chunk = conn.recv(65536)
            if not chunk:
                break
            got += chunk
        conn.sendall(hashlib.sha256(got).digest() + bytes(reversed(got)))
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

ECHO_CLIENT = """
import hashlib, os, socket, sys
data = os.urandom(int(sys.argv[3]))
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20) as s:
    s.sendall(len(data).to_bytes(4, "big") + data)
    digest = s.recv(32, socket.MSG_WAITALL)
    back = bytearray()
    while len(back) < len(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        back += chunk
ok = digest == hashlib.sha256(data).digest() and bytes(back) == data[::-1]
print("ok" if ok else f"mismatch sent={len(data)} back={len(back)}")
"""

_PRELUDE = "import sys\nimport django\ndjango.setup()\n"


class BoxError(LabError):
    """The box or a device did not do what was asked; the message has the logs' tails."""


def _base_env() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k not in _DROP and not k.startswith("LAZYCAT_")}
    return keep | {"PYTHONUNBUFFERED": "1"}


def _tail(path: Path, n: int) -> str:
    if not path.exists():
        return f"({path.name}: no log)"
    return path.read_text(errors="replace")[-n:]


def _kill_group(proc: subprocess.Popen[str]) -> None:
    # The lab starts every process in a session of its own: its group id is its PID.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _run(
    host: Host, args: list[str], env: dict[str, str], timeout: float, what: str
) -> tuple[int, str, str]:
    """Run the venv's Python in ``host``'s namespace with ``env``, bounded; (code, out, err)."""
    proc = host.python_popen(
        args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise BoxError(f"{what}: no result within {timeout} s\n{out}{err}") from None
    return proc.returncode, out, err


def _wait_log(
    log: Path, text: str, timeout: float, proc: subprocess.Popen[str] | None, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while text not in (log.read_text(errors="replace") if log.exists() else ""):
        if proc is not None and proc.poll() is not None:
            raise BoxError(f"{what} exited {proc.returncode} before {text!r}\n{_tail(log, 4000)}")
        if time.monotonic() > deadline:
            raise BoxError(f"{what}: no {text!r} within {timeout} s\n{_tail(log, 4000)}")
        time.sleep(0.05)


def _ns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


class LabBox:
    """``lazycat up`` in ``host``'s namespace, with its own data directory under ``workdir``."""

    def __init__(
        self,
        lab: Lab,
        host: Host,
        workdir: Path,
        relays: str,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.lab = lab
        self.host = host
        self.data = workdir / "box-data"
        self.data.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log = workdir / "box.log"
        self.env = (
            _base_env()
            | {
                "DJANGO_SETTINGS_MODULE": "lazycat.settings",
                "LAZYCAT_DATA_DIR": str(self.data),
                "LAZYCAT_SECRET_KEY": secrets.token_urlsafe(40),
                "LAZYCAT_RELAYS": relays,
                "LAZYCAT_TUNNEL_LISTEN": TUNNEL_LISTEN,
                "LAZYCAT_TUNNEL_TUN": "true",
            }
            | (extra_env or {})
        )
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.start_seconds = 0.0

    # --- the box's life ------------------------------------------------------------------------

    def start(self, timeout: float = 90) -> None:
        """Run ``lazycat up`` and wait for its ready line (every child ready: web answers
        /healthz, the worker a Celery ping, beat started, transportd up)."""
        if self.proc is not None:
            raise BoxError("this box is already started")
        began = time.monotonic()
        with self.log.open("w") as out:
            self.proc = self.host.python_popen(
                ["-m", "lazycat.cli", "up"],
                env=self.env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        _wait_log(self.log, UP_TEXT, timeout, self.proc, "lazycat up")
        line = next(ln for ln in self.log.read_text().splitlines() if UP_TEXT in ln)
        self.url = line.split(UP_TEXT, 1)[1].strip()
        self.start_seconds = time.monotonic() - began

    def children(self) -> dict[str, int]:
        """The latest PID of each process ``lazycat up`` said it started (redis, web, …)."""
        return {m.group(1): int(m.group(2)) for m in STARTED.finditer(self.tail(10**7))}

    def stop(self, timeout: float = 25) -> list[str]:
        """SIGTERM ``lazycat up`` (by PID) and wait up to ``timeout`` s for it to stop its
        children; then SIGKILL it and any child still alive in the box's namespace, by PID.
        Returns what had to be killed ([] after a clean stop)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return []
        killed: list[str] = []
        children = self.children()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                killed.append(f"lazycat up (pid {proc.pid})")
                _kill_group(proc)
        box_ns = os.stat(f"/run/netns/{self.host.ns}").st_ino
        for name, pid in children.items():
            if _ns_inode(pid) == box_ns:  # still alive, and in our namespace (not a reused PID)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.append(f"{name} (pid {pid})")
        return killed

    def tail(self, n: int = 4000) -> str:
        return _tail(self.log, n)

    # --- Django against the box's data ---------------------------------------------------------

    def django(self, script: str, *args: str, timeout: float = 60) -> str:
        """Run ``script`` (``django.setup()`` done, ``sys`` imported, ``sys.argv[1:] == args``) in
        the box's namespace with the box's environment; its stdout. Raises with its output and
        the box's log tail if it fails."""
        code, out, err = _run(
            self.host,
            ["-c", _PRELUDE + textwrap.dedent(script), *args],
            self.env,
            timeout,
            "django snippet",
        )
        if code != 0:
            raise BoxError(
                f"django snippet exited {code}\n--- script\n{textwrap.dedent(script)}\n"
                f"--- output\n{out}{err}\n--- box\n{self.tail(2000)}"
            )
        return out

    def setup_box(self, name: str = "labbox") -> None:
        """What the console's setup page does: name the box, create the owner account."""
        self.django(
            "from lazycat.core.actions import do_setup_box\n"
            "do_setup_box(sys.argv[1], sys.argv[2], sys.argv[3])\n",
            name,
            OWNER,
            PASSWORD,
        )

    def pairing_code(self) -> str:
        """A new pairing code's text (``lazycat://pair?...``), as the console shows it. Made in
        the box's namespace, so its LAN address is the box's lab address."""
        out = self.django(
            """
            from django.contrib.auth import get_user_model
            from lazycat.core.models import Box
            from lazycat.devices.actions import do_create_pairing_code
            owner = get_user_model().objects.get(username=sys.argv[1])
            _, bundle = do_create_pairing_code(Box.get(), owner)
            print(bundle.to_text())
            """,
            OWNER,
        )
        return out.strip().splitlines()[-1]

    def approve_pending(self, timeout: float = 30) -> IPv6Address:
        """Wait (bounded) for a pending device, approve the oldest; its overlay address."""
        out = self.django(
            """
            import time
            from django.contrib.auth import get_user_model
            from lazycat.devices.actions import do_approve_device
            from lazycat.devices.models import Device
            deadline = time.monotonic() + float(sys.argv[1])
            while (device := Device.objects.pending().first()) is None:
                if time.monotonic() > deadline:
                    sys.exit(f"no pending device within {sys.argv[1]} s")
                time.sleep(0.1)
            owner = get_user_model().objects.get(username=sys.argv[2])
            print(do_approve_device(device, owner).overlay_address)
            """,
            str(timeout),
            OWNER,
            timeout=timeout + 30,
        )
        return IPv6Address(out.strip().splitlines()[-1])

    def expose(
        self,
        name: str,
        kind: str,
        target: str,
        ports: str,
        allowed: list[IPv6Address] | None = None,
    ) -> tuple[float, IPv6Address]:
        """Create or change service ``name`` as the console's edit page does (``ServiceForm``
        and ``do_save_service``): everyone may reach it, or only the devices with the overlay
        addresses ``allowed``. Returns the wall-clock time just before the save (its commit and
        the announcement to transportd happen inside that call, so a time measured from it is
        an upper bound) and the service's overlay address."""
        spec = {
            "name": name,
            "kind": kind,
            "target": target,
            "ports": ports,
            "allowed": None if allowed is None else [str(a) for a in allowed],
        }
        out = self.django(
            """
            import json, time
            from django.contrib.auth import get_user_model
            from lazycat.devices.models import Device
            from lazycat.services.actions import do_save_service
            from lazycat.services.forms import ServiceForm
            from lazycat.services.models import Service
            spec = json.loads(sys.argv[1])
            data = {k: spec[k] for k in ("name", "kind", "target", "ports")}
            data["exclude_ports"] = ""
            if spec["allowed"] is None:
                data["access_all"] = "on"
            else:
                chosen = Device.objects.filter(overlay_address__in=spec["allowed"])
                data["allowed_devices"] = [str(d.pk) for d in chosen]
            form = ServiceForm(data, instance=Service.objects.filter(name=spec["name"]).first())
            if not form.is_valid():
                sys.exit(f"form errors: {form.errors.as_json()}")
            owner = get_user_model().objects.get(username=sys.argv[2])
            saving = time.time()
            service = do_save_service(form, owner)
            print(saving, service.overlay_address)
            """,
            json.dumps(spec),
            OWNER,
        )
        committed, address = out.strip().splitlines()[-1].split()
        return float(committed), IPv6Address(address)

    def device(self, key_or_none: bytes | IPv6Address | str | None = None) -> dict[str, Any]:
        """One device's row as the console sees it: ``status``, ``path`` (a PathKind value),
        ``path_cause``, ``endpoint``, ``relay``, ``rtt_ms``, ``rx_bytes``, ``tx_bytes``,
        ``overlay_address``, ``last_handshake``, and ``events`` (its path timeline, oldest
        first: dicts of path, endpoint, relay, cause). Chosen by public key (bytes), by overlay
        address, or None for the only device there is."""
        if key_or_none is None:
            which = "only:"
        elif isinstance(key_or_none, bytes):
            which = f"key:{key_or_none.hex()}"
        else:
            which = f"addr:{IPv6Address(str(key_or_none))}"
        out = self.django(
            """
            import json
            from lazycat.devices.models import Device
            how, _, value = sys.argv[1].partition(":")
            if how == "key":
                rows = Device.objects.filter(public_key=bytes.fromhex(value))
            elif how == "addr":
                rows = Device.objects.filter(overlay_address=value)
            else:
                rows = Device.objects.all()
            if rows.count() != 1:
                sys.exit(f"{rows.count()} devices match {sys.argv[1]!r}")
            d = rows.get()
            fields = ("name", "status", "path", "path_cause", "endpoint", "relay", "rtt_ms",
                      "rx_bytes", "tx_bytes", "overlay_address")
            row = {f: getattr(d, f) for f in fields}
            row["public_key"] = d.key.hex()
            row["last_handshake"] = d.last_handshake.isoformat() if d.last_handshake else None
            row["events"] = [
                {"path": e.path, "endpoint": e.endpoint, "relay": e.relay, "cause": e.cause}
                for e in d.path_events.order_by("at", "pk")
            ]
            print(json.dumps(row))
            """,
            which,
            timeout=30,
        )
        row: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return row


class LabClient:
    """``lazycat-client`` (``-m transport.client_cli``) in ``host``'s namespace, its config in
    ``config_dir``, each command's output in ``config_dir/../<dir name>-<command>.log``."""

    def __init__(self, host: Host, config_dir: Path) -> None:
        self.host = host
        self.config = config_dir
        self.env = _base_env()
        self.pair_proc: subprocess.Popen[str] | None = None
        self.up_proc: subprocess.Popen[str] | None = None

    def log(self, command: str) -> Path:
        return self.config.parent / f"{self.config.name}-{command}.log"

    def tail(self, *commands: str, n: int = 4000) -> str:
        return "\n".join(f"--- {c}\n{_tail(self.log(c), n)}" for c in commands or ("pair", "up"))

    def _start(self, command: str, *args: str) -> subprocess.Popen[str]:
        argv = ["-m", "transport.client_cli", "--config-dir", str(self.config), command, *args]
        with self.log(command).open("w") as out:
            return self.host.python_popen(
                argv, env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT
            )

    def start_pair(self, code: str, timeout: float = 40) -> None:
        """``pair CODE`` in the background: it waits for the owner's approval."""
        self.pair_proc = self._start("pair", code, "--timeout", str(timeout))

    def wait_paired(self, timeout: float = 40) -> None:
        if self.pair_proc is None:
            raise BoxError("start_pair first")
        try:
            code = self.pair_proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(self.pair_proc)
            raise BoxError(f"pair did not end within {timeout} s\n{self.tail('pair')}") from None
        if code != 0:
            raise BoxError(f"pair exited {code}\n{self.tail('pair')}")

    def up(self, mode: str = "tun", timeout: float = 20) -> None:
        """``up --mode MODE`` in the foreground (the lab kills it); waits for it to dial."""
        self.up_proc = self._start("up", "--mode", mode)
        _wait_log(self.log("up"), "connecting to", timeout, self.up_proc, "lazycat-client up")

    def stop_up(self, timeout: float = 10) -> None:
        """SIGTERM ``up`` (by PID) and wait for it to end, as Ctrl-C would; SIGKILL if it
        does not within ``timeout``."""
        proc, self.up_proc = self.up_proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)

    def state(self) -> dict[str, Any]:
        """``up``'s state.json as it is now (what ``status`` reports; rewritten every second),
        {} before the first or while it is being replaced."""
        try:
            data = json.loads((self.config / "state.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def status(self, timeout: float = 15) -> dict[str, Any]:
        """``status --json`` (exit 3 = not running is still a JSON answer)."""
        argv = ["-m", "transport.client_cli", "--config-dir", str(self.config)]
        code, out, err = _run(
            self.host, [*argv, "status", "--json"], self.env, timeout, "lazycat-client status"
        )
        try:
            status: dict[str, Any] = json.loads(out)
        except ValueError:
            raise BoxError(f"status exited {code} without JSON\n{out}{err}") from None
        return status
