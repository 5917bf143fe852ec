"""Faults on a live tunnel in the NAT lab, with real processes: the relay
(``python -m transport.relay_cli``), the box (``lazycat up`` via ``labbox.LabBox``) and devices
running ``lazycat-client up --mode tun``.

One lab serves every scenario (the tests run in file order and share it)::

    relay 192.0.2.10:3480
    box    behind NAT3 (site "box")
    dev A  behind NAT3 (site "a"): punches a direct-v4 path to the box
    dev B  behind NAT4 (site "b"): NAT4 x NAT3 cannot punch, so it stays on the relay

1. The direct path dies mid-transfer (the box's public address blocked at A's router, both
   ways): the path moves to the relay, the one TCP connection inside the tunnel carries on,
   and the SHA-256 of the bytes sent equals the receiver's. Printed: block -> relay (client
   status, console), the longest stall the sender saw (no TCP ACK progress with data
   outstanding, from SIOCOUTQ).
2. The block is lifted: back to direct-v4; printed the time.
3. A's router gets a new public address (``change_wan_address``, conntrack flushed) during a
   transfer: the same TCP connection finishes with equal checksums, ``connected`` never drops,
   a new connection works without pairing again; printed the path it ends on and when.
4. A NAT that forgets a UDP mapping after 30 s of silence (Linux conntrack's unreplied default,
   and common on home routers), on A's and the box's routers, then 85 s without user traffic.
   The session stays *active* (1 s heartbeats) for 45 s after the last data, then goes idle:
   from then only the 25 s keepalive refreshes the mapping, which must hold it past the 75 s
   mark, where a mapping last refreshed by the final heartbeat would expire. (The control
   socket sends nothing while idle: no WebSocket pings, `docs/negotiation.md`.) Samplers in the
   routers' namespaces read conntrack every 0.25 s: the direct flow's entries must never
   disappear, the path must not change, and an unrefreshed control entry must expire meanwhile
   (the 30 s timeout is in force).
5. The relay is killed (SIGKILL, by PID) and started again 1 s later: B's pings through the
   relayed tunnel come back (bound: the box's 3 s relay PING, which is when the box learns
   that the relay forgot it, plus 5 s for a loaded machine); printed the time from the
   restart to the first echo reply and, from the relay's /metrics, when each side registered again.

Needs root, ``ip``, ``nft`` and ``/dev/net/tun``: skipped without them, failing as root or
under CI (``lab_or_skip``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

import pytest

from tests.natlab.lab import PYTHON, RELAY_IPS, Host, Lab, Node, Site, lab_or_skip
from tests.natlab.labbox import LabBox, LabClient
from transport.addressing import box_address, box_prefix
from transport.bundle import PairingBundle

pytestmark = [pytest.mark.natlab, pytest.mark.timeout(110)]

RELAY_PORT = 3480  # the lab's STUN server already has A:3478
METRICS_PORT = 3490  # the relay's TCP listener on its loopback: /metrics
BOX_PORT = 7483  # labbox.TUNNEL_LISTEN
SINK_PORT = 8081
MIB = 1 << 20
RATE = 512 * 1024  # bytes/s: a bounded pace the relay (2 MB/s per peer) carries easily
SHORT_TIMEOUT = 30  # s: the mapping timeout of scenario 4 (see the module docstring)
IDLE = 85.0  # s without user traffic in scenario 4: 45 s active, then 40 s on keepalives alone

# The box side: each connection's bytes hashed (SHA-256) and the digest sent back; one JSON line
# per connection with the peer's address and port, so the test can tell connections apart.
SINK = """
import hashlib, json, socket, sys, threading, time
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(8)
print("ready", flush=True)
def serve(conn, peer):
    began, h, got = time.monotonic(), hashlib.sha256(), 0
    with conn:
        conn.settimeout(60)
        try:
            n = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "big")
            while got < n:
                chunk = conn.recv(min(65536, n - got))
                if not chunk:
                    break
                h.update(chunk)
                got += len(chunk)
            conn.sendall(h.digest())
            err = ""
        except OSError as exc:
            err = repr(exc)
    print(json.dumps({"port": peer[1], "n": got, "sha": h.hexdigest(), "error": err,
                      "secs": round(time.monotonic() - began, 2)}), flush=True)
while True:
    conn, peer = srv.accept()
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"""

# The device side: one TCP connection, N random bytes at a bounded pace (non-blocking sends),
# ACK progress read from SIOCOUTQ (bytes not yet acknowledged) every few ms. A stall is time
# without ACK progress while bytes are outstanding. Prints "acked N" lines, then one JSON line.
SENDER = """
import fcntl, hashlib, json, os, select, socket, struct, sys, termios, time
dest, port, total, rate, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    float(sys.argv[4]), float(sys.argv[5])
data = os.urandom(total)
buf = memoryview(total.to_bytes(8, "big") + data)
s = socket.create_connection((dest, port), timeout=10)
local = s.getsockname()[1]
s.setblocking(False)
def outq():
    return struct.unpack("i", fcntl.ioctl(s, termios.TIOCOUTQ, b"\\0" * 4))[0]
start = time.monotonic()
deadline = start + limit
sent = acked = 0
last_move, stall, stall_from, report = start, 0.0, 0.0, 0.0
err = ""
while acked < len(buf):
    now = time.monotonic()
    if now > deadline:
        err = f"not acknowledged within {limit} s"
        break
    allowed = min(len(buf), 8 + int(rate * (now - start)), sent + 262144)
    if sent < allowed:
        try:
            sent += s.send(buf[sent:allowed])
        except BlockingIOError:
            pass
        except OSError as exc:
            err = repr(exc)
            break
    pending = outq()
    now = time.monotonic()
    if sent - pending > acked or pending == 0:
        acked, last_move = sent - pending, now
    elif now - last_move > stall:
        stall, stall_from = now - last_move, time.time() - (now - last_move)
    if now - report >= 0.1:
        print(f"acked {acked}", flush=True)
        report = now
    select.select([], [], [], 0.003)
digest = b""
if not err:
    s.setblocking(True)
    s.settimeout(max(1.0, deadline - time.monotonic()))
    try:
        digest = s.recv(32, socket.MSG_WAITALL)
    except OSError as exc:
        err = repr(exc)
s.close()
print(json.dumps({"port": local, "n": total, "sha": hashlib.sha256(data).hexdigest(),
                  "echoed": digest.hex(), "error": err, "stall": round(stall, 3),
                  "stall_from": stall_from, "secs": round(time.monotonic() - start, 2)}),
      flush=True)
"""

# ICMPv6 echo (raw socket; Linux fills in the checksum, RFC 3542 section 3.1) every 100 ms for
# argv[2] seconds; one "reply SEQ WALL" line per answer.
PINGER = """
import os, select, socket, sys, time
dest, limit = sys.argv[1], float(sys.argv[2])
ident = os.getpid() & 0xFFFF
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setblocking(False)
start = time.monotonic()
seq, next_at = 0, start
while time.monotonic() - start < limit:
    now = time.monotonic()
    if now >= next_at:
        tag = ident.to_bytes(2, "big") + (seq & 0xFFFF).to_bytes(2, "big")
        try:
            s.sendto(bytes([128, 0, 0, 0]) + tag + b"lzc", (dest, 0))
        except OSError:
            pass
        seq, next_at = seq + 1, now + 0.1
    ready, _, _ = select.select([s], [], [], max(0.0, next_at - time.monotonic()))
    while ready:
        try:
            data = s.recv(2048)
        except BlockingIOError:
            break
        if data[0] == 129 and data[4:6] == ident.to_bytes(2, "big"):
            print(f"reply {int.from_bytes(data[6:8], 'big')} {time.time():.3f}", flush=True)
"""

# In the relay's namespace: its /metrics (served to loopback only) every 50 ms; a line
# "WALL boxes peers unknown_peer_drops" whenever those change.
METRICS = """
import re, sys, time, urllib.request
url, limit, last = sys.argv[1], float(sys.argv[2]), None
start = time.monotonic()
while time.monotonic() - start < limit:
    try:
        text = urllib.request.urlopen(url, timeout=1).read().decode()
    except OSError:
        time.sleep(0.05)
        continue
    def value(pattern):
        m = re.search(pattern + r" ([0-9.e+]+)", text)
        return int(float(m.group(1))) if m else 0
    now = (value("lazycat_relay_boxes"), value("lazycat_relay_peers"),
           value('lazycat_relay_drops_total\\{reason="unknown_peer"\\}'))
    if now != last:
        print(f"{time.time():.3f} {now[0]} {now[1]} {now[2]}", flush=True)
        last = now
    time.sleep(0.05)
"""

# In a router's namespace: every 0.25 s for argv[1] seconds, "WALL LEFT..." with the seconds
# left of the first UDP conntrack entry holding each needle (argv[2:]), "-" for none.
SAMPLER = """
import sys, time
limit, needles = float(sys.argv[1]), sys.argv[2:]
start = time.monotonic()
while time.monotonic() - start < limit:
    with open("/proc/net/nf_conntrack") as f:
        table = [line for line in f if " udp " in line]
    left = []
    for needle in needles:
        hit = next((line.split()[4] for line in table if needle in line), "-")
        left.append(hit)
    print(f"{time.time():.3f} " + " ".join(left), flush=True)
    time.sleep(0.25)
"""

CONSOLE = """
import json
from lazycat.devices.models import Device
out = {}
for d in Device.objects.all():
    out[str(d.overlay_address)] = {
        "path": d.path, "endpoint": d.endpoint, "status": d.status,
        "events": [[e.at.timestamp(), e.path, e.endpoint, e.cause]
                   for e in d.path_events.order_by("at", "pk")],
    }
print(json.dumps(out))
"""


@dataclass
class Device:
    name: str
    site: Site
    host: Host
    client: LabClient
    address: IPv6Address | None = None

    def state(self) -> dict[str, Any]:
        return self.client.state()


@dataclass
class Rig:
    lab: Lab
    root: Path
    box: LabBox
    box_site: Site
    overlay: IPv6Address
    relay: subprocess.Popen[str]
    devices: dict[str, Device] = field(default_factory=dict)
    relay_starts: int = 1
    streams: int = 0

    def console(self) -> dict[str, dict[str, Any]]:
        """Every device's row and path timeline (event times as unix seconds)."""
        out: dict[str, dict[str, Any]] = json.loads(
            self.box.django(CONSOLE).strip().splitlines()[-1]
        )
        return out

    def logs(self, *devices: Device) -> str:
        parts = [d.client.tail("up", n=3000) for d in devices]
        transportd = [ln for ln in self.box.tail(10**7).splitlines() if "transportd |" in ln]
        return "\n".join(parts) + "\n--- transportd\n" + "\n".join(transportd[-40:])


def _wait_file(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text(errors="replace") if path.exists() else ""):
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name}: no {text!r} within {timeout} s\n{path.read_text()[-3000:]}")
        time.sleep(0.05)


def _start_relay(lab: Lab, log: Path) -> subprocess.Popen[str]:
    with log.open("w") as out:
        proc = lab.relay.python_popen(
            [
                "-m",
                "transport.relay_cli",
                "--udp",
                f"{RELAY_IPS[0]}:{RELAY_PORT}",
                "--tcp",
                f"127.0.0.1:{METRICS_PORT}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    _wait_file(log, "listening", 10)
    return proc


def _wait_state(
    rig: Rig, dev: Device, ok: Callable[[dict[str, Any]], bool], timeout: float, what: str
) -> tuple[float, dict[str, Any]]:
    """Poll ``dev``'s state.json until ``ok``; (seconds waited, the state)."""
    began = time.monotonic()
    state: dict[str, Any] = {}
    while time.monotonic() - began < timeout:
        state = dev.state()
        if state and ok(state):
            return time.monotonic() - began, state
        time.sleep(0.05)
    pytest.fail(f"{dev.name}: {what} not within {timeout} s: {json.dumps(state)}\n{rig.logs(dev)}")


def _pair(rig: Rig, dev: Device) -> None:
    dev.client.start_pair(rig.box.pairing_code(), timeout=40)
    dev.address = rig.box.approve_pending(timeout=30)
    dev.client.wait_paired(timeout=40)
    dev.client.up(mode="tun", timeout=20)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    lab_or_skip(tun=True)
    root = Path(tempfile.mkdtemp(prefix="lzc-faults-"))
    unclean: list[str] = []
    began = time.monotonic()
    try:
        with Lab() as lab:
            relay = _start_relay(lab, root / "relay-1.log")
            box_site = lab.add_site("box", "NAT3")
            box_host = box_site.add_host("box")
            box = LabBox(lab, box_host, root, relays=f"home={RELAY_IPS[0]}:{RELAY_PORT}")
            try:
                box.start()
                box.setup_box()
                overlay = box_address(box_prefix(PairingBundle.parse(box.pairing_code()).box_key))
                made = Rig(lab, root, box, box_site, overlay, relay)
                for name in ("a", "b"):
                    # IPv4-only networks: the faults are about IPv4 NAT paths (with global
                    # IPv6 both devices would rightly go direct-v6)
                    site = lab.add_site(name, "NAT3" if name == "a" else "NAT4", ipv6=False)
                    host = site.add_host(f"dev{name}")
                    host.ipv6_stack_on()
                    made.devices[name] = Device(name, site, host, LabClient(host, root / name))
                    _pair(made, made.devices[name])
                with (root / "sink.log").open("w") as out:
                    box_host.python_popen(
                        ["-c", SINK, str(overlay), str(SINK_PORT)],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                _wait_file(root / "sink.log", "ready", 10)
                a, b = made.devices["a"], made.devices["b"]
                _wait_state(made, a, lambda s: s.get("path") == "direct-v4", 45, "direct-v4")
                _wait_state(made, b, lambda s: s.get("connected") is True, 20, "connected")
                print(
                    f"\nfaults: lab, box, devices A (direct-v4) and B (relay) paired and up in "
                    f"{time.monotonic() - began:.1f} s"
                )
                yield made
            finally:
                unclean += box.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        print(f"faults: module total {time.monotonic() - began:.1f} s")
    assert not unclean, f"lazycat up did not stop cleanly on SIGTERM; killed: {unclean}"


# --- transfers ----------------------------------------------------------------------------------


@dataclass
class Stream:
    proc: subprocess.Popen[str]
    log: Path

    def acked(self) -> int:
        lines = [ln for ln in self.log.read_text().splitlines() if ln.startswith("acked ")]
        return int(lines[-1].split()[1]) if lines else 0

    def wait_acked(self, at_least: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.acked() < at_least:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                pytest.fail(
                    f"stream: {self.acked()} bytes acked, wanted {at_least}\n"
                    f"{self.log.read_text()[-2000:]}"
                )
            time.sleep(0.02)

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            pytest.fail(f"stream did not end within {timeout} s\n{self.log.read_text()[-2000:]}")
        last = self.log.read_text().strip().splitlines()[-1]
        try:
            result: dict[str, Any] = json.loads(last)
        except ValueError:
            pytest.fail(f"stream failed:\n{self.log.read_text()[-3000:]}")
        return result


def _stream(rig: Rig, dev: Device, total: int, limit: float = 60) -> Stream:
    """``total`` random bytes from ``dev`` to the box's sink at RATE, on one TCP connection."""
    rig.streams += 1
    log = rig.root / f"stream-{rig.streams}.log"
    with log.open("w") as out:
        proc = dev.host.python_popen(
            ["-c", SENDER, str(rig.overlay), str(SINK_PORT), str(total), str(RATE), str(limit)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Stream(proc, log)


def _check_transfer(rig: Rig, sent: dict[str, Any], dev: Device) -> dict[str, Any]:
    """The sender's result against the box side's record of the same connection."""
    assert not sent["error"], f"{sent}\n{rig.logs(dev)}"
    deadline = time.monotonic() + 10
    mine: list[dict[str, Any]] = []
    while not mine and time.monotonic() < deadline:
        lines = (rig.root / "sink.log").read_text().splitlines()
        records = [json.loads(ln) for ln in lines if ln.startswith("{")]
        mine = [r for r in records if r["port"] == sent["port"]]
        time.sleep(0.05)
    assert len(mine) == 1, f"the box saw {len(mine)} connections from port {sent['port']}"
    got = mine[0]
    assert not got["error"] and got["n"] == sent["n"], got
    assert got["sha"] == sent["sha"] == sent["echoed"], (got, sent)
    return got


def _events_after(rig: Rig, dev: Device, since: float) -> list[list[Any]]:
    row = rig.console()[str(dev.address)]
    return [e for e in row["events"] if e[0] >= since]


# --- the scenarios ------------------------------------------------------------------------------


def test_direct_path_dies_mid_transfer_then_returns(rig: Rig) -> None:
    a = rig.devices["a"]
    blocker, box_ip = a.site.router, rig.box_site.public_ip
    assert box_ip is not None
    assert a.state().get("path") == "direct-v4", a.state()
    stream = _stream(rig, a, 4 * MIB)
    stream.wait_acked(3 * MIB // 2, 20)
    rig.lab.block(blocker, box_ip)  # A's router drops everything to and from the box's WAN
    blocked = time.time()
    to_relay, state = _wait_state(rig, a, lambda s: s.get("path") == "relay", 15, "relay")
    assert state.get("connected") is True, state
    status = a.client.status()
    assert status["path"] == "relay" and status["connected"] is True, status
    sent = stream.result(60)
    _check_transfer(rig, sent, a)
    events = _events_after(rig, a, blocked)
    relay_events = [e for e in events if e[1] == "relay"]
    assert relay_events, f"the console saw no move to the relay: {events}\n{rig.logs(a)}"
    console_relay = relay_events[0][0] - blocked
    # docs/paths.md: dual sending within the 2.5 s trust timeout (+ the console's report)
    assert console_relay < 4, f"relay only {console_relay:.2f} s after the block: {events}"
    assert sent["stall"] < 10, sent

    rig.lab.unblock(blocker, box_ip)
    unblocked = time.time()
    to_direct, state = _wait_state(rig, a, lambda s: s.get("path") == "direct-v4", 40, "direct")
    events = _events_after(rig, a, unblocked)
    deadline = time.monotonic() + 10
    while not any(e[1] == "direct-v4" for e in events) and time.monotonic() < deadline:
        time.sleep(0.5)
        events = _events_after(rig, a, unblocked)
    back = [e for e in events if e[1] == "direct-v4"]
    assert back, f"the console did not see direct-v4 again: {events}"
    print(
        f"\nfaults 1: direct path blocked mid-transfer: status relay after {to_relay:.1f} s "
        f"(state.json, 1 s resolution), console relay after {console_relay:.2f} s "
        f"({relay_events[0][3]!r}); same TCP connection finished 4 MiB in {sent['secs']} s, "
        f"SHA-256 equal; longest sender stall {sent['stall']:.2f} s "
        f"(began {sent['stall_from'] - blocked:+.2f} s from the block)"
        f"\nfaults 2: unblocked: status direct-v4 after {to_direct:.1f} s, console after "
        f"{back[0][0] - unblocked:.2f} s ({back[0][3]!r})"
    )


def _conntrack_entry(table: str, *needles: str) -> int | None:
    """Seconds left of the first UDP conntrack entry whose line holds every needle."""
    for line in table.splitlines():
        if " udp " in f" {line} " and all(n in line for n in needles):
            return int(line.split()[4])
    return None


def _tun_packets(host: Host) -> tuple[int, int]:
    """(received, sent) packets of ``lzc0`` in ``host``'s namespace (/proc/net/dev)."""
    for line in host.run(["cat", "/proc/net/dev"]).stdout.splitlines():
        name, _, numbers = line.partition(":")
        if name.strip() == "lzc0":
            fields = numbers.split()
            return int(fields[1]), int(fields[9])
    raise AssertionError("no lzc0")


def _sample_conntrack(
    router: Node, log: Path, seconds: float, *needles: str
) -> subprocess.Popen[str]:
    """A sampler in ``router``'s namespace: every 0.25 s, one line "WALL LEFT..." with the
    seconds left of the first UDP entry holding each needle ("-": none)."""
    with log.open("w") as out:
        return router.python_popen(
            ["-c", SAMPLER, str(seconds), *needles], stdout=out, stderr=subprocess.STDOUT
        )


def _samples(log: Path) -> list[list[str]]:
    return [ln.split() for ln in log.read_text().splitlines() if ln[:1].isdigit()]


def test_short_nat_mapping_timeout_is_held_while_idle(rig: Rig) -> None:
    a = rig.devices["a"]
    state = a.state()
    assert state.get("path") == "direct-v4", state
    box_ep, a_port = state["endpoint"], int(str(state["local"]).rsplit(":", 1)[1])
    box_ip, box_port = box_ep.rsplit(":", 1)
    a_router, box_router = a.site.router, rig.box_site.router
    # The direct flow's entry on each router (its original direction: from inside), and the
    # control flow's: one answered datagram from a socket nothing refreshes afterwards.
    a_flow = f"src={a.host.ip} dst={box_ip} sport={a_port} dport={box_port} "
    box_flow = f"src={rig.box.host.ip} dst={a.site.public_ip} sport={BOX_PORT} "
    control_flow = "sport=45999 dport=4000 "
    assert _conntrack_entry(a_router.conntrack(), a_flow) is not None, a_router.conntrack()
    assert _conntrack_entry(box_router.conntrack(), box_flow) is not None
    for router in (a_router, box_router):
        router.set_udp_timeout(SHORT_TIMEOUT)
    try:
        a.host.run(
            [
                PYTHON,
                "-c",
                "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
                "s.bind(('0.0.0.0', 45999)); s.sendto(b'x', ('192.0.2.10', 4000))",
            ]
        )
        began = time.time()
        tun_before = _tun_packets(a.host)
        a_log, box_log = rig.root / "ct-a.log", rig.root / "ct-box.log"
        samplers = [
            _sample_conntrack(a_router, a_log, IDLE, a_flow, control_flow),
            _sample_conntrack(box_router, box_log, IDLE, box_flow),
        ]
        paths: set[str] = set()
        connected = True
        while time.time() - began < IDLE:
            st = a.state()
            paths.add(str(st.get("path")))
            connected &= st.get("connected") is True
            time.sleep(0.2)
        for sampler in samplers:
            sampler.wait(10)
        tun_after = _tun_packets(a.host)
        events = _events_after(rig, a, began)
    finally:
        for router in (a_router, box_router):
            router.set_udp_timeout(30)
    a_rows, box_rows = _samples(a_log), _samples(box_log)
    assert len(a_rows) > IDLE * 2 and len(box_rows) > IDLE * 2, (len(a_rows), len(box_rows))
    control = [row[2] for row in a_rows]
    expired = control[0] != "-" and control[-1] == "-"
    assert expired, f"the {SHORT_TIMEOUT} s timeout expired no idle mapping"
    missing = [
        f"{who} {float(row[0]) - began:.2f} s"
        for who, rows in (("A", a_rows), ("box", box_rows))
        for row in rows
        if row[1] == "-"
    ]
    assert not missing, f"the direct flow's mapping expired: {missing}\n{rig.logs(a)}"
    gap_a = max(SHORT_TIMEOUT - int(row[1]) for row in a_rows)
    gap_box = max(SHORT_TIMEOUT - int(row[1]) for row in box_rows)
    assert max(gap_a, gap_box) < SHORT_TIMEOUT, (gap_a, gap_box)
    assert paths == {"direct-v4"} and connected, (paths, connected)
    assert not events, (
        f"path changes while idle: {[(round(e[0] - began, 2), *e[1:]) for e in events]} "
        f"(s from the idle period's start)\n{rig.logs(a)}"
    )
    sent = _stream(rig, a, MIB // 2).result(30)
    _check_transfer(rig, sent, a)
    assert a.state().get("path") == "direct-v4"
    assert not _events_after(rig, a, began), "the transfer after the idle period changed path"
    print(
        f"\nfaults 4: UDP mapping timeout {SHORT_TIMEOUT} s on A's and the box's routers, "
        f"{IDLE:.0f} s without user traffic: direct-v4 throughout, no path event; the direct "
        f"flow's conntrack entries never went (sampled every 0.25 s), longest refresh gap A "
        f"{gap_a} s, box {gap_box} s (1 s resolution); the unrefreshed control entry expired; "
        f"transfer afterwards direct in {sent['secs']} s; A's TUN meanwhile "
        f"{tun_after[1] - tun_before[1]} packets out, {tun_after[0] - tun_before[0]} in"
    )


def test_device_roams_to_a_new_public_address(rig: Rig) -> None:
    a = rig.devices["a"]
    assert a.state().get("path") == "direct-v4", a.state()
    old = a.site.public_ip
    stream = _stream(rig, a, 3 * MIB)
    stream.wait_acked(MIB, 20)
    new = a.site.change_wan_address()
    roamed = time.time()
    seen: list[tuple[float, str, bool]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = a.state()
        if st:
            now = time.time() - roamed
            if not seen or seen[-1][1] != st.get("path"):
                seen.append((now, str(st.get("path")), st.get("connected") is True))
            assert st.get("connected") is True, f"disconnected after roaming: {st}"
            if stream.proc.poll() is not None and st.get("path") == "direct-v4" and now > 3:
                break
        time.sleep(0.1)
    sent = stream.result(60)
    _check_transfer(rig, sent, a)
    after = _stream(rig, a, 256 * 1024)
    _check_transfer(rig, after.result(30), a)
    status = a.client.status()
    events = _events_after(rig, a, roamed)
    row = rig.console()[str(a.address)]
    print(
        f"\nfaults 3: A's router {old} -> {new} mid-transfer: status paths "
        f"{[(round(t, 1), p) for t, p, _ in seen]}; same TCP connection finished, SHA-256 equal, "
        f"longest stall {sent['stall']:.2f} s (from {sent['stall_from'] - roamed:+.2f} s); "
        f"a new connection worked; ends {status['path']} "
        f"({status.get('endpoint')}); console {row['path']} {row['endpoint']}, events "
        f"{[(round(e[0] - roamed, 2), e[1], e[3]) for e in events]}"
    )
    assert status["connected"] is True, status
    assert status["path"] == "direct-v4", f"did not punch again after roaming\n{rig.logs(a)}"
    assert row["endpoint"].startswith(f"{new}:"), row


def test_relay_restart_recovers_a_relayed_device(rig: Rig) -> None:
    b = rig.devices["b"]
    _wait_state(rig, b, lambda s: s.get("path") == "relay", 10, "relay")
    log = rig.root / "ping.log"
    with log.open("w") as out:
        pinger = b.host.python_popen(
            ["-c", PINGER, str(rig.overlay), "50"], stdout=out, stderr=subprocess.STDOUT
        )

    def replies() -> list[float]:
        return [
            float(ln.split()[2]) for ln in log.read_text().splitlines() if ln.startswith("reply")
        ]

    deadline = time.monotonic() + 10
    while len(replies()) < 5:
        assert time.monotonic() < deadline, f"no pings through the relay\n{log.read_text()}"
        time.sleep(0.05)
    old = rig.relay
    os.killpg(old.pid, signal.SIGKILL)  # the relay's own process group: the lab started it
    old.wait(5)
    killed = time.time()
    time.sleep(1.0)
    rig.relay_starts += 1
    rig.relay = _start_relay(rig.lab, rig.root / f"relay-{rig.relay_starts}.log")
    restarted = time.time()
    metrics_log = rig.root / "metrics.log"
    with metrics_log.open("w") as out:
        metrics = rig.lab.relay.python_popen(
            ["-c", METRICS, f"http://127.0.0.1:{METRICS_PORT}/metrics", "45"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 8
    while not [t for t in replies() if t > restarted]:
        if time.monotonic() > deadline:
            pytest.fail(
                f"no echo through the restarted relay within 8 s\n{rig.logs(b)}\n--- relay\n"
                f"{(rig.root / f'relay-{rig.relay_starts}.log').read_text()[-3000:]}"
            )
        time.sleep(0.05)
    first = min(t for t in replies() if t > restarted)
    time.sleep(0.2)
    for proc in (pinger, metrics):
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
    # (wall, boxes, peers, unknown-peer drops): when the box and the devices registered again
    seen = [ln.split() for ln in metrics_log.read_text().splitlines() if ln[:1].isdigit()]
    box_back = next((float(w) - restarted for w, boxes, _, _ in seen if int(boxes) > 0), None)
    timeline: list[tuple[float, int, int, int]] = []
    for w, boxes, peers, drops in seen:  # only where the registrations change
        if not timeline or timeline[-1][1:3] != (int(boxes), int(peers)):
            timeline.append((round(float(w) - restarted, 2), int(boxes), int(peers), int(drops)))
    state = b.state()
    assert state.get("connected") is True and state.get("path") == "relay", state
    sent = _stream(rig, b, 256 * 1024).result(30)
    _check_transfer(rig, sent, b)
    a_state = rig.devices["a"].state()
    print(
        f"\nfaults 5: relay killed and restarted 1 s later: NAT4 device B's echoes back "
        f"{first - restarted:.2f} s after the restart ({first - killed:.2f} s after the kill); "
        f"a new TCP connection through the relay worked; A stayed {a_state.get('path')}; "
        f"the box registered again {box_back if box_back is None else round(box_back, 2)} s "
        f"after the restart; relay registrations (s, boxes, peers, B's datagrams dropped as "
        f"unknown peer so far): {timeline}"
    )
