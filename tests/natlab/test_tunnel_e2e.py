"""The tunnel end to end in the NAT lab: a real relay, transportd with its TUN in the box's
namespace, ``lazycat-client pair`` and ``up --mode tun`` in the device's, and real TCP, ping and
``status`` through the overlay.

The box's database is a throwaway data directory prepared by scripts run *inside the box's
namespace* (so the pairing code's LAN address is the box's lab address), with Django pointed at
that directory; the channel layer is the test session's Redis, reached by its unix socket (a
filesystem object, so every namespace sees it). Each step has a deadline; every process is
started through the lab, which kills it by PID and deletes the namespaces.

Needs root, ``ip`` and ``nft`` (and ``/dev/net/tun``): skipped without them, failing under CI.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv6Address
from pathlib import Path

import pytest
from django.conf import settings

from tests.natlab.lab import PYTHON, RELAY_IPS, REPO, Host, Lab, check_available
from transport.addressing import box_address, box_prefix
from transport.bundle import PairingBundle

pytestmark = [pytest.mark.natlab, pytest.mark.timeout(110)]

RELAY_PORT = 3480  # the lab's STUN server already has A:3478
TUNNEL_PORT = 7483
ECHO_PORT = 8080
PAYLOAD = 256 * 1024

SETUP = """
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0, interactive=False)
from django.contrib.auth import get_user_model
from lazycat.core.actions import do_setup_box
from lazycat.devices.actions import do_create_pairing_code
box = do_setup_box("labbox", "owner", "a-long-lab-password-1234")
owner = get_user_model().objects.get(username="owner")
_, bundle = do_create_pairing_code(box, owner)
print(bundle.to_text())
"""

APPROVE = """
import sys, time
import django
django.setup()
from django.contrib.auth import get_user_model
from lazycat.devices.actions import do_approve_device
from lazycat.devices.models import Device, DeviceStatus
deadline = time.monotonic() + float(sys.argv[1])
while True:
    device = Device.objects.filter(status=DeviceStatus.PENDING).first()
    if device is not None:
        break
    if time.monotonic() > deadline:
        sys.exit("no pending device")
    time.sleep(0.1)
owner = get_user_model().objects.get(username="owner")
device = do_approve_device(device, owner)
print(device.overlay_address)
"""

ECHO = """
import hashlib, socket, sys
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(4)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
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
"""

CLIENT = """
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

# ping -6 without iputils: ICMPv6 Echo Request (type 128) on a raw socket; Linux fills in the
# checksum of raw ICMPv6 sockets (RFC 3542 section 3.1). Prints how many echoes came back.
PING6 = """
import os, socket, sys, time
dest, count = sys.argv[1], int(sys.argv[2])
ident = os.getpid() & 0xFFFF
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.settimeout(2)
got = 0
for seq in range(count):
    tag = ident.to_bytes(2, "big") + seq.to_bytes(2, "big")
    s.sendto(bytes([128, 0, 0, 0]) + tag + b"lzc", (dest, 0))
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            data, addr = s.recvfrom(2048)
        except TimeoutError:
            break
        if data[0] == 129 and data[4:8] == tag:
            got += 1
            break
print(got)
"""


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class Setup:
    lab: Lab
    data: Path
    logs: Path
    env: dict[str, str]

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def tail(self, *names: str) -> str:
        out = []
        for name in names:
            path = self.log(name)
            text = path.read_text(errors="replace") if path.exists() else "(none)"
            out.append(f"--- {name}\n{text[-4000:]}")
        return "\n".join(out)

    def start(self, host: Host, name: str, args: list[str]) -> subprocess.Popen[str]:
        """A Python process in ``host``'s namespace, output to ``logs/<name>.log``."""
        with self.log(name).open("w") as out:
            return host.python_popen(
                args, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=REPO
            )

    def run(self, host: Host, name: str, args: list[str], timeout: float) -> str:
        proc = self.start(host, name, args)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not finish in {timeout} s\n{self.tail(name)}")
        if code != 0:
            pytest.fail(f"{name} exited {code}\n{self.tail(name)}")
        return self.log(name).read_text()

    def wait_log(self, name: str, text: str, timeout: float, *others: str) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name).read_text(errors="replace"):
            if time.monotonic() > deadline:
                pytest.fail(f"{name}: no {text!r} within {timeout} s\n{self.tail(name, *others)}")
            time.sleep(0.05)


@pytest.fixture
def setup() -> Iterator[Setup]:
    reason = check_available()
    if reason is None and not os.path.exists("/dev/net/tun"):
        reason = "no /dev/net/tun"
    if reason:
        _skip_or_fail(reason)
    root = Path(tempfile.mkdtemp(prefix="lzc-tun-"))
    data, logs = root / "data", root / "logs"
    data.mkdir(mode=0o700)
    logs.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "PYTHONPATH"}} | {
        "DJANGO_SETTINGS_MODULE": "lazycat.settings",
        "LAZYCAT_DATA_DIR": str(data),
        "LAZYCAT_SECRET_KEY": secrets.token_urlsafe(40),
        "REDIS_URL": settings.REDIS_URL,  # the session's Redis: a unix socket, seen everywhere
        "LAZYCAT_RELAYS": f"home={RELAY_IPS[0]}:{RELAY_PORT}",
        "LAZYCAT_TUNNEL_LISTEN": f"0.0.0.0:{TUNNEL_PORT}",
        "LAZYCAT_TUNNEL_TUN": "true",
        "PYTHONUNBUFFERED": "1",
    }
    try:
        with Lab() as lab:
            yield Setup(lab, data, logs, env)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _client(setup: Setup, name: str, *args: str) -> list[str]:
    return ["-m", "transport.client_cli", "--config-dir", str(setup.data.parent / name), *args]


@pytest.mark.parametrize("layout", ["same-lan", "nat3-nat3"])
def test_device_reaches_a_tcp_listener_on_the_box_through_the_tunnel(
    setup: Setup, layout: str
) -> None:
    lab = setup.lab
    started = time.monotonic()
    setup.start(
        lab.relay, "relay", ["-m", "transport.relay_cli", "--udp", f"{RELAY_IPS[0]}:{RELAY_PORT}"]
    )
    box_site = lab.add_site("box", "NAT3")
    box = box_site.add_host("box")
    phone = (box_site if layout == "same-lan" else lab.add_site("phone", "NAT3")).add_host("phone")
    setup.wait_log("relay", "listening", 10)

    code = setup.run(box, "setup", ["-c", SETUP], 60).strip().splitlines()[-1]
    bundle = PairingBundle.parse(code)
    overlay = box_address(box_prefix(bundle.box_key))
    setup.start(box, "transportd", ["-m", "lazycat.tunnel"])
    setup.wait_log("transportd", "transportd is up", 30)
    assert "tun=lzc0" in setup.log("transportd").read_text(), setup.tail("transportd")
    addrs = box.run(["ip", "-6", "addr", "show", "dev", "lzc0"]).stdout
    assert str(overlay) in addrs, addrs

    pair = setup.start(phone, "pair", _client(setup, "phone", "pair", code, "--timeout", "40"))
    approved = setup.run(box, "approve", ["-c", APPROVE, "30"], 40).strip().splitlines()[-1]
    device_address = IPv6Address(approved)
    try:
        assert pair.wait(40) == 0, setup.tail("pair", "transportd")
    except subprocess.TimeoutExpired:
        pytest.fail(f"pair did not end\n{setup.tail('pair', 'transportd')}")

    setup.start(phone, "up", _client(setup, "phone", "up", "--mode", "tun"))
    setup.wait_log("up", "connecting to", 20, "transportd")
    addrs = phone.run(["ip", "-6", "addr", "show", "dev", "lzc0"]).stdout
    assert str(device_address) in addrs, addrs

    echo = setup.start(box, "echo", ["-c", ECHO, str(overlay), str(ECHO_PORT)])
    setup.wait_log("echo", "ready", 10)
    assert echo.poll() is None

    # The first attempts may race the IK handshake: retry the whole exchange for a while.
    deadline = time.monotonic() + 30
    result = ""
    while time.monotonic() < deadline:
        proc = phone.run(
            [PYTHON, "-c", CLIENT, str(overlay), str(ECHO_PORT), str(PAYLOAD)],
            check=False,
            timeout=30,
        )
        result = (proc.stdout + proc.stderr).strip()
        if result == "ok":
            break
        time.sleep(0.5)
    assert result == "ok", f"{result}\n{setup.tail('up', 'transportd', 'echo')}"

    if shutil.which("ping"):
        ping = phone.run(["ping", "-6", "-c", "3", "-W", "2", str(overlay)], check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
    else:
        echoes = phone.run([PYTHON, "-c", PING6, str(overlay), "3"], timeout=15).stdout
        assert echoes.strip() == "3", echoes

    # Same LAN: the code's LAN address gives a direct LAN path (the relay carries the first
    # packets). Across two NAT3 sites the relay carries everything: nothing exchanges reflexive
    # candidates between box and device yet (the negotiation is a later part).
    want = "lan" if layout == "same-lan" else "relay"
    deadline = time.monotonic() + 15
    status: dict[str, object] = {}
    while time.monotonic() < deadline:
        out = setup.run(phone, "status", _client(setup, "phone", "status", "--json"), 15)
        status = json.loads(out)
        received = int(str(status.get("rx_bytes") or 0))
        if status.get("path") == want and received > PAYLOAD:
            break  # (state.json is rewritten every second: wait for the transfer to show)
        time.sleep(0.5)
    shown = json.dumps(status)
    assert status.get("path") == want, shown
    assert status.get("connected") is True and status.get("address") == str(device_address), shown
    assert int(str(status.get("rx_bytes") or 0)) > PAYLOAD, shown

    log = setup.log("transportd").read_text()
    assert "channel layer lost" not in log, setup.tail("transportd")
    assert "pairing answered" in log and "state=approved" in log
    print(f"{layout}: path={status.get('path')} in {time.monotonic() - started:.1f} s")
