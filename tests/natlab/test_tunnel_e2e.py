"""The tunnel end to end in the NAT lab: the real box (``lazycat up``, via ``labbox.LabBox``) in
the box's namespace with its own data directory and embedded Redis, a real relay, and
``lazycat-client pair`` and ``up --mode tun`` in the device's namespace; then real TCP, ping and
``status`` through the overlay, and the console's database (what transportd reported through
``do_report_path``) compared with what the device says.

Two layouts: the device on the box's LAN, and the device behind a NAT3 router of its own. Each
step has a deadline; every process is started through the lab, which kills it by PID and
deletes the namespaces; the box is stopped with SIGTERM and must stop cleanly.

Needs root, ``ip`` and ``nft`` (and ``/dev/net/tun``): skipped without them, failing as root
or under CI (``lab_or_skip``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.natlab.lab import PYTHON, RELAY_IPS, Host, Lab, lab_or_skip
from tests.natlab.labbox import ECHO, ECHO_CLIENT, LabBox, LabClient
from transport.addressing import box_address, box_prefix
from transport.bundle import PairingBundle

pytestmark = [pytest.mark.natlab, pytest.mark.timeout(110)]

RELAY_PORT = 3480  # the lab's STUN server already has A:3478
ECHO_PORT = 8080
PAYLOAD = 256 * 1024

# The path each layout's tunnel must settle on. Same LAN: the code's LAN address gives a direct
# LAN path (the relay carries the first packets). Two NAT3 sites: the negotiation (control
# socket + Celery) exchanges reflexive candidates and starts both sides at once: punched.
EXPECTED_PATH = {
    "same-lan": "lan",
    "nat3-nat3": "direct-v4",
}


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


@dataclass
class World:
    lab: Lab
    root: Path
    boxes: list[LabBox] = field(default_factory=list)

    def box(self, host: Host, relays: str) -> LabBox:
        """The real box in ``host``; the fixture stops it (and checks it stopped cleanly)."""
        made = LabBox(self.lab, host, self.root, relays)
        self.boxes.append(made)
        return made


@pytest.fixture
def world() -> Iterator[World]:
    lab_or_skip(tun=True)
    root = Path(tempfile.mkdtemp(prefix="lzc-tun-"))
    unclean: list[str] = []
    try:
        with Lab() as lab:
            made = World(lab, root)
            try:
                yield made
            finally:
                for box in made.boxes:
                    unclean += box.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert not unclean, f"lazycat up did not stop cleanly on SIGTERM; killed: {unclean}"


def _wait_file(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text(errors="replace") if path.exists() else ""):
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name}: no {text!r} within {timeout} s\n{path.read_text()[-3000:]}")
        time.sleep(0.05)


@pytest.mark.parametrize("layout", ["same-lan", "nat3-nat3"])
def test_device_reaches_a_tcp_listener_on_the_box_through_the_tunnel(
    world: World, layout: str
) -> None:
    lab, root = world.lab, world.root
    started = time.monotonic()
    relay_log = root / "relay.log"
    with relay_log.open("w") as out:
        lab.relay.python_popen(
            ["-m", "transport.relay_cli", "--udp", f"{RELAY_IPS[0]}:{RELAY_PORT}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    # IPv4-only networks: these layouts are about IPv4 NAT (with global IPv6 on both sides the
    # tunnel rightly goes direct-v6, which test_pair_matrix's IPv6 row covers)
    box_site = lab.add_site("box", "NAT3", ipv6=False)
    box_host = box_site.add_host("box")
    phone_site = box_site if layout == "same-lan" else lab.add_site("phone", "NAT3", ipv6=False)
    phone_host = phone_site.add_host("phone")
    for host in (box_host, phone_host):
        host.ipv6_stack_on()
    _wait_file(relay_log, "listening", 10)

    box = world.box(box_host, relays=f"home={RELAY_IPS[0]}:{RELAY_PORT}")
    box.start()
    up_seconds = box.start_seconds
    box.setup_box()
    code = box.pairing_code()
    bundle = PairingBundle.parse(code)
    overlay = box_address(box_prefix(bundle.box_key))
    assert "tun=lzc0" in box.tail(10**7), box.tail()
    addrs = box_host.run(["ip", "-6", "addr", "show", "dev", "lzc0"]).stdout
    assert str(overlay) in addrs, addrs

    phone = LabClient(phone_host, root / "phone")
    phone.start_pair(code, timeout=40)
    device_address = box.approve_pending(timeout=30)
    phone.wait_paired(timeout=40)

    phone.up(mode="tun", timeout=20)
    addrs = phone_host.run(["ip", "-6", "addr", "show", "dev", "lzc0"]).stdout
    assert str(device_address) in addrs, addrs

    echo_log = root / "echo.log"
    with echo_log.open("w") as out:
        echo = box_host.python_popen(
            ["-c", ECHO, str(overlay), str(ECHO_PORT)], stdout=out, stderr=subprocess.STDOUT
        )
    _wait_file(echo_log, "ready", 10)
    assert echo.poll() is None

    # The first attempts may race the IK handshake: retry the whole exchange for a while.
    deadline = time.monotonic() + 30
    result = ""
    while time.monotonic() < deadline:
        proc = phone_host.run(
            [PYTHON, "-c", ECHO_CLIENT, str(overlay), str(ECHO_PORT), str(PAYLOAD)],
            check=False,
            timeout=30,
        )
        result = (proc.stdout + proc.stderr).strip()
        if result == "ok":
            break
        time.sleep(0.5)
    assert result == "ok", f"{result}\n{phone.tail('up')}\n--- box\n{box.tail()}"

    if shutil.which("ping"):
        ping = phone_host.run(["ping", "-6", "-c", "3", "-W", "2", str(overlay)], check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
    else:
        echoes = phone_host.run([PYTHON, "-c", PING6, str(overlay), "3"], timeout=15).stdout
        assert echoes.strip() == "3", echoes

    want = EXPECTED_PATH[layout]
    deadline = time.monotonic() + 15
    status: dict[str, object] = {}
    while time.monotonic() < deadline:
        status = phone.status()
        received = int(str(status.get("rx_bytes") or 0))
        if status.get("path") == want and received > PAYLOAD:
            break  # (state.json is rewritten every second: wait for the transfer to show)
        time.sleep(0.5)
    shown = json.dumps(status)
    assert status.get("path") == want, shown
    assert status.get("connected") is True and status.get("address") == str(device_address), shown
    assert int(str(status.get("rx_bytes") or 0)) > PAYLOAD, shown

    # The console's view: transportd reports each path change into the database at once.
    deadline = time.monotonic() + 15
    row = box.device(device_address)
    while row["path"] != status["path"] and time.monotonic() < deadline:
        time.sleep(0.5)
        row = box.device(device_address)
    assert row["status"] == "approved", row
    assert row["overlay_address"] == str(device_address), row
    transportd = "\n".join(ln for ln in box.tail(10**7).splitlines() if "transportd |" in ln)
    assert row["path"] == status["path"], f"console {row}\ndevice {shown}\n{transportd[-6000:]}"

    # Counters: transportd reports each device's traffic every 5 s (when it moved). The echo
    # sent PAYLOAD bytes each way, so both counters are past it (plus TCP/IP headers).
    deadline = time.monotonic() + 15
    while min(row["rx_bytes"], row["tx_bytes"]) <= PAYLOAD and time.monotonic() < deadline:
        time.sleep(0.5)
        row = box.device(device_address)
    assert row["rx_bytes"] > PAYLOAD and row["tx_bytes"] > PAYLOAD, row
    assert row["last_handshake"] is not None, row

    log = box.tail(10**7)
    assert "channel layer lost" not in log, box.tail()
    assert "pairing answered" in log and "state=approved" in log, box.tail()
    print(
        f"{layout}: path={status.get('path')} console={row['path']} events={row['events']} "
        f"box up in {up_seconds:.1f} s, test {time.monotonic() - started:.1f} s"
    )
