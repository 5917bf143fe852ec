"""The deployment contract of ``deploy/lazycat-transportd.service``: transportd runs as an
unprivileged user with only the ambient capabilities ``CAP_NET_ADMIN CAP_NET_BIND_SERVICE``, and
with those alone service forwarding works.

A child Python process is started in the box namespace of ``test_exposure_linux``'s lab (whose
fixture and helpers this module imports) through ``setpriv`` (util-linux): uid/gid 65534, no
supplementary groups, and the two capabilities as the inheritable, ambient and bounding sets —
what systemd's ``User=``, ``AmbientCapabilities=`` and ``CapabilityBoundingSet=`` give. Ambient
capabilities survive ``execve`` (capabilities(7)), so the child's ``nft -f -`` has them too. The
child makes a ``KernelExposure`` with a ``state_file`` in a directory of its own and applies an
IPv4-only service (the forwarder: TPROXY, transparent sockets, policy routing) and a NAT66 one
(``/proc/sys`` forwarding and ``accept_ra``, conntrack through netlink), then takes commands on
stdin (``flows``, ``close``). The device namespace then uses both services.

The negative control drops ``CAP_NET_BIND_SERVICE``: a UDP flow's reply socket binds the
service's address and *its* port (7 here), which below ``net.ipv4.ip_unprivileged_port_start``
(1024; it covers IPv6 too) is refused with ``EACCES``, so the device gets no answer.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.natlab.lab import lab_or_skip
from tests.transport.test_exposure_linux import (
    D1,
    NS,
    S4,
    S6,
    _rules_of_ours,
    _sysctls,
    banner,
    echo_once,
    lab,  # noqa: F401 - the module-scoped namespace lab, requested by name below
    netns,
    sh,
    sysctl,
    tcp_from,
)

pytestmark = pytest.mark.natlab

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534
CAP_NET_BIND_SERVICE = 10  # linux/capability.h
CAP_NET_ADMIN = 12
BOTH = "net_admin,net_bind_service"
START_TIMEOUT = 20.0  # interpreter start, imports and the first apply on a loaded machine
REPLY_TIMEOUT = 10.0
NO_ANSWER = 1.5  # how long the negative control waits for a reply that must not come
# systemd's default PATH for services (nft lives in /usr/sbin)
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

SERVICES = [
    # IPv4-only target: the forwarder, TCP and UDP on port 7 (below 1024)
    {"name": "svc-v4", "address": str(S4), "target": "10.77.0.2", "tcp": [[7, 7]], "udp": [[7, 7]]},
    # IPv6 target: NAT66 in the kernel
    {"name": "svc-v6", "address": str(S6), "target": "fd77::2", "tcp": [[22, 22]], "udp": [[7, 7]]},
]

# What runs as uid 65534. argv[1]: {"state_file": ..., "services": [...], "devices": [...]}.
CHILD = """
import json, logging, os, sys
from ipaddress import ip_address
from pathlib import Path

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from transport.exposure import Exposure, ExposureError
from transport.exposure_linux import KernelExposure

conf = json.loads(sys.argv[1])
devices = frozenset(ip_address(d) for d in conf["devices"])
state = [
    Exposure(
        name=s["name"],
        address=ip_address(s["address"]),
        target=ip_address(s["target"]),
        tcp=tuple(tuple(r) for r in s["tcp"]),
        udp=tuple(tuple(r) for r in s["udp"]),
        devices=devices,
    )
    for s in conf["services"]
]
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
k = KernelExposure(state_file=Path(conf["state_file"]))
try:
    k.apply(state)
except ExposureError as exc:
    print("error", exc, flush=True)
    k.close()
    sys.exit(1)
print("ready", os.getuid(), os.getgid(), status["CapEff"].strip(), flush=True)
for line in sys.stdin:
    if line.strip() == "flows":
        got = {str(s): sorted(map(str, d)) for s, d in k.flows().items()}
        print(json.dumps(got), flush=True)
    elif line.strip() == "close":
        break
k.close()
print("closed", flush=True)
"""


def _others_can_run(path: str) -> bool:
    """True when a user who is neither owner nor in the group may execute ``path`` (every
    directory on the way searchable by others)."""
    parts = Path(path).parents
    return all(p.stat().st_mode & stat.S_IXOTH for p in parts) and bool(
        Path(path).stat().st_mode & stat.S_IXOTH
    )


def _interpreter() -> str:
    """This Python, if uid 65534 may run it; else the system's of the same minor version (a
    pyenv build under /root is not reachable by others). The venv's packages come by
    PYTHONPATH either way; the C ABI is the same within a minor version."""
    major, minor = sys.version_info[:2]
    for candidate in (os.path.realpath(sys.executable), f"/usr/bin/python{major}.{minor}"):
        if os.path.exists(candidate) and _others_can_run(candidate):
            return candidate
    pytest.fail(f"no Python {major}.{minor} that uid {NOBODY} can execute (this one is root's)")


def _env() -> dict[str, str]:
    paths = dict.fromkeys([str(ROOT), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    return {
        "PATH": PATH,
        "PYTHONPATH": os.pathsep.join(paths),
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # the repository is root's; don't try to write to it
        "LANG": "C.UTF-8",
    }


class Child:
    """The unprivileged KernelExposure process; lines from its stdout with a deadline."""

    def __init__(self, caps: str, state_dir: Path, devices: list[str]) -> None:
        self.state_file = state_dir / "forwarding-sysctls.json"
        conf = {"state_file": str(self.state_file), "services": SERVICES, "devices": devices}
        self.stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in kill()
        # ip netns exec and setpriv both exec (no fork): the PID is the Python child's.
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                NS["box"],
                "setpriv",
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                f"--inh-caps=-all,+{caps.replace(',', ',+')}",
                f"--ambient-caps=-all,+{caps.replace(',', ',+')}",
                f"--bounding-set=-all,+{caps.replace(',', ',+')}",
                _interpreter(),
                "-c",
                CHILD,
                json.dumps(conf),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            cwd=state_dir,
            env=_env(),
            bufsize=0,
        )
        self.buf = b""

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"child silent for {timeout} s; stderr:\n{self.errors()}")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"child exited ({self.proc.wait(5)}):\n{self.errors()}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def ready(self) -> tuple[int, int, int]:
        """(uid, gid, effective capabilities) the child runs with, once it has applied."""
        words = self.line(START_TIMEOUT).split()
        assert words[:1] == ["ready"], f"{' '.join(words)}\n{self.errors()}"
        return int(words[1]), int(words[2]), int(words[3], 16)

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")

    def close(self) -> None:
        """Ask the child to close its KernelExposure; it must exit 0."""
        self.send("close")
        assert self.line(REPLY_TIMEOUT) == "closed", self.errors()
        assert self.proc.wait(REPLY_TIMEOUT) == 0, self.errors()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # by PID (Popen keeps it)
        self.proc.wait(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self.stderr.close()


@pytest.fixture(scope="module")
def unprivileged_lab(request: pytest.FixtureRequest) -> None:
    lab_or_skip(tools=[("setpriv", "util-linux")])
    request.getfixturevalue("lab")


@pytest.fixture
def child(unprivileged_lab: None) -> Iterator[Any]:
    """A factory: ``child(caps)`` starts the unprivileged process; killed by PID afterwards,
    and its state directory (owned by uid 65534, like StateDirectory=) removed."""
    state_dir = Path(tempfile.mkdtemp(prefix="lzc-unpriv-"))
    os.chown(state_dir, NOBODY, NOBODY)
    started: list[Child] = []

    def start(caps: str) -> Child:
        c = Child(caps, state_dir, [str(D1)])
        started.append(c)
        return c

    try:
        yield start
    finally:
        for c in started:
            c.kill()
        shutil.rmtree(state_dir, ignore_errors=True)


def _udp_from_d1() -> socket.socket:
    """An unconnected UDP socket of device D1, so recvfrom() shows who answered."""
    with netns("dev"):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.bind((str(D1), 0))
    return sock


def test_forwarding_works_with_only_the_units_two_ambient_capabilities(child: Any) -> None:
    before = _sysctls()
    proc: Child = child(BOTH)
    uid, gid, caps = proc.ready()
    # Really unprivileged, with exactly the unit's capabilities (a root child proves nothing).
    assert (uid, gid) == (NOBODY, NOBODY)
    assert caps == (1 << CAP_NET_ADMIN) | (1 << CAP_NET_BIND_SERVICE)
    # nft (a child of the child: the ambient set crossed execve) loaded the table, pyroute2 the
    # policy route, /proc/sys took the NAT66 sysctls, and the state file is the child's, 0600.
    assert "lazycat" in sh("nft", "list", "tables")
    assert len(_rules_of_ours()) == 1
    assert sysctl("all/forwarding") == "1" and sysctl("lan0/accept_ra") == "2"
    st = proc.state_file.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o600)

    # The IPv4-only service, through the forwarder: TCP port 7 ...
    with tcp_from(D1, S4, 7) as four, tcp_from(D1, S6, 22) as six:
        assert four.getpeername()[:2] == (str(S4), 7)
        assert banner(four) == "port 7 from 10.77.0.1\n"
        assert echo_once(four, b"seven" * 1000) == b"seven" * 1000
        # ... and the NAT66 one: the IPv6 target answers (masqueraded to the box's address).
        assert banner(six) == "port 22 from fd77::1\n"
        assert echo_once(six, b"six") == b"six"
        # Conntrack through netlink (NAT66 flows) and the forwarder's own accounting.
        proc.send("flows")
        flows = json.loads(proc.line(REPLY_TIMEOUT))
        assert flows == {str(S4): [str(D1)], str(S6): [str(D1)]}, proc.errors()

    # UDP port 7: the reply comes from the service's address and port 7, twice (the second
    # datagram goes to the flow's own transparent socket, TPROXY's established lookup).
    with _udp_from_d1() as sock:
        sock.settimeout(REPLY_TIMEOUT)
        for payload in (b"ping", b"again"):
            sock.sendto(payload, (str(S4), 7))
            data, peer = sock.recvfrom(1000)
            assert data == b"port 7 from 10.77.0.1: " + payload
            assert peer[:2] == (str(S4), 7)
        sock.sendto(b"ping6", (str(S6), 7))  # and UDP over NAT66
        data, peer = sock.recvfrom(1000)
        assert (data, peer[:2]) == (b"port 7 from fd77::1: ping6", (str(S6), 7))

    proc.close()
    assert "lazycat" not in sh("nft", "list", "tables")
    assert _rules_of_ours() == []
    assert sh("ip", "-6", "route", "show", "table", "all").count("table 1136") == 0
    assert _sysctls() == before
    assert not proc.state_file.exists()
    assert "Traceback" not in proc.errors()


def test_without_cap_net_bind_service_udp_cannot_answer_from_port_7(child: Any) -> None:
    proc: Child = child("net_admin")
    uid, _gid, caps = proc.ready()  # apply() itself needs only CAP_NET_ADMIN
    assert uid == NOBODY and caps == 1 << CAP_NET_ADMIN
    # TCP is unaffected: the accepted socket inherits the port, nothing binds it.
    with tcp_from(D1, S4, 7) as sock:
        assert banner(sock) == "port 7 from 10.77.0.1\n"
    with _udp_from_d1() as sock:
        sock.settimeout(NO_ANSWER)
        sock.sendto(b"ping", (str(S4), 7))
        with pytest.raises(TimeoutError):
            sock.recvfrom(1000)
    proc.close()
    # Why: the flow's reply socket could not bind ([S4], 7).
    # the owner is told why, once, at WARNING (not left with a device that times out)
    errors = proc.errors()
    assert f"cannot answer udp from {S4}:7: it needs CAP_NET_BIND_SERVICE" in errors, errors
    assert "WARNING" in errors and errors.count("needs CAP_NET_BIND_SERVICE") == 1, errors
    assert "lazycat" not in sh("nft", "list", "tables")
