"""Port mapping against a real router daemon: Debian's ``miniupnpd`` (nftables build) in network
namespaces this test makes, speaking PCP, NAT-PMP and UPnP IGD.

Layout (names carry this process's PID; every address lives only inside the namespaces)::

    box ns             router ns (miniupnpd)                   wan ns (STUN responder)
    10.77.0.2 ──veth── 10.77.0.1 | 203.0.113.1 ──veth── 203.0.113.2

miniupnpd refuses to map when its external address is reserved (the documentation prefix is),
unless a STUN check says the external side is unfiltered; so the "wan" namespace runs a tiny STUN
responder for it (``ext_perform_stun``). The mapper runs in the box namespace as
``python -m transport.portmap_aio``; the test reads its JSON events, checks the router's nftables
DNAT rule appears and disappears, and sends a datagram from the wan side through the mapping.

Needs root, ``ip``, ``nft`` and ``miniupnpd``: skipped without them, but under ``CI`` it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TAG = f"{os.getpid()}"
BOX, ROUTER, WAN = f"lzpb{TAG}", f"lzpr{TAG}", f"lzpw{TAG}"
BOX_IP, ROUTER_LAN, ROUTER_WAN, WAN_IP = "10.77.0.2", "10.77.0.1", "203.0.113.1", "203.0.113.2"
ROUTER_LAN_IF, ROUTER_WAN_IF = f"lzr{TAG}", f"lzx{TAG}"

STUN_SERVER = r"""
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, (ip, port) = s.recvfrom(2048)
    if len(data) < 20 or data[4:8] != b"\x21\x12\xa4\x42":
        continue
    # RFC 8489 §14.2: XOR-MAPPED-ADDRESS of the sender.
    xip = struct.unpack("!I", socket.inet_aton(ip))[0] ^ 0x2112A442
    attr = struct.pack("!HHBBHI", 0x0020, 8, 0, 1, port ^ 0x2112, xip)
    s.sendto(struct.pack("!HHI", 0x0101, len(attr), 0x2112A442) + data[8:20] + attr, (ip, port))
"""

STUN_CHECK = r"""
import os, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
for _ in range(10):
    s.sendto(struct.pack("!HHI", 1, 0, 0x2112A442) + os.urandom(12), (sys.argv[1], 3478))
    try:
        s.recvfrom(2048)
        sys.exit(0)
    except OSError:
        pass
sys.exit(1)
"""

UDP_RECEIVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(8)
print("ready", flush=True)
data, addr = s.recvfrom(2048)
print(data.decode(), addr[0], flush=True)
"""

UDP_SENDER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(b"through the mapping", (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.1)
"""

NFT_RULESET = """
table inet filter {
  chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting {
    type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd;
  }
  chain postrouting {
    type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd;
  }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
}
"""


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "nft", "miniupnpd"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (Debian: iproute2, nftables, miniupnpd-nftables)"
    return None


def _run(*args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def _ns(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *args]


@dataclass
class Lab:
    tmp: Path
    miniupnpd_log: Path

    def nat_rules(self) -> str:
        return _run(
            *_ns(ROUTER, "nft", "list", "chain", "inet", "filter", "prerouting_miniupnpd")
        ).stdout


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the miniupnpd namespace test cannot run in CI: {missing}")
        pytest.skip(missing)
    tmp = tmp_path_factory.mktemp("miniupnpd")
    procs: list[subprocess.Popen[bytes]] = []
    made: list[str] = []
    try:
        for ns in (BOX, ROUTER, WAN):
            _run("ip", "netns", "add", ns)
            made.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "link", "add", ROUTER_LAN_IF, "type", "veth", "peer", "name", f"lzb{TAG}")
        _run("ip", "link", "set", ROUTER_LAN_IF, "netns", ROUTER)
        _run("ip", "link", "set", f"lzb{TAG}", "netns", BOX)
        _run("ip", "link", "add", ROUTER_WAN_IF, "type", "veth", "peer", "name", f"lzw{TAG}")
        _run("ip", "link", "set", ROUTER_WAN_IF, "netns", ROUTER)
        _run("ip", "link", "set", f"lzw{TAG}", "netns", WAN)
        for ns, dev, cidr in (
            (ROUTER, ROUTER_LAN_IF, f"{ROUTER_LAN}/24"),
            (ROUTER, ROUTER_WAN_IF, f"{ROUTER_WAN}/24"),
            (BOX, f"lzb{TAG}", f"{BOX_IP}/24"),
            (WAN, f"lzw{TAG}", f"{WAN_IP}/24"),
        ):
            _run("ip", "-n", ns, "addr", "add", cidr, "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
        _run("ip", "-n", BOX, "route", "add", "default", "via", ROUTER_LAN)
        _run(*_ns(ROUTER, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"))
        subprocess.run(
            _ns(ROUTER, "nft", "-f", "-"), input=NFT_RULESET, text=True, check=True, timeout=10
        )

        (tmp / "stun.py").write_text(STUN_SERVER)
        procs.append(
            subprocess.Popen(_ns(WAN, sys.executable, str(tmp / "stun.py"), WAN_IP, "3478"))
        )
        # Wait for the STUN responder (and warm ARP) before miniupnpd's one-shot STUN check.
        (tmp / "stun_check.py").write_text(STUN_CHECK)
        _run(*_ns(ROUTER, sys.executable, str(tmp / "stun_check.py"), WAN_IP))

        conf = tmp / "miniupnpd.conf"
        conf.write_text(
            f"ext_ifname={ROUTER_WAN_IF}\n"
            f"listening_ip={ROUTER_LAN_IF}\n"
            "http_port=0\n"
            "enable_natpmp=yes\n"
            "enable_upnp=yes\n"
            "secure_mode=no\n"
            "system_uptime=yes\n"
            "ext_perform_stun=yes\n"
            f"ext_stun_host={WAN_IP}\n"
            "ext_stun_port=3478\n"
            f"lease_file={tmp / 'leases'}\n"
            "uuid=3b0b6d1c-5a52-4c0e-9f4a-0000000000aa\n"
            "allow 1024-65535 10.77.0.0/24 1024-65535\n"
            "deny 0-65535 0.0.0.0/0 0-65535\n"
        )
        log = tmp / "miniupnpd.log"
        with log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    _ns(ROUTER, "miniupnpd", "-d", "-f", str(conf), "-P", str(tmp / "pid")),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + 15
        while b"Listening for NAT-PMP/PCP traffic" not in log.read_bytes():
            if time.monotonic() > deadline or procs[-1].poll() is not None:
                pytest.fail(f"miniupnpd did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        if b"Port forwarding is now enabled" not in log.read_bytes():
            pytest.fail(f"miniupnpd refuses to forward:\n{log.read_text()[-3000:]}")
        yield Lab(tmp, log)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for ns in made:
            _run("ip", "netns", "del", ns, check=False)
        for dev in (ROUTER_LAN_IF, ROUTER_WAN_IF):  # only if it never left this namespace
            _run("ip", "link", "del", dev, check=False)


class Mapper:
    """``python -m transport.portmap_aio`` in the box namespace; stops when its stdin closes."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            _ns(BOX, sys.executable, "-m", "transport.portmap_aio", "--stdin", *args),
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.buffer = b""
        self.seen: list[dict[str, object]] = []

    def event(self, timeout: float = 10.0) -> dict[str, object]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"no event within {timeout} s; had {self.seen}")
            chunk = os.read(fd, 4096)
            if not chunk:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"mapper exited; had {self.seen}\n{err[-2000:]}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        event: dict[str, object] = json.loads(line)
        self.seen.append(event)
        return event

    def stop(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout=10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def _through_the_mapping(lab: Lab, port: int) -> str:
    (lab.tmp / "rx.py").write_text(UDP_RECEIVER)
    (lab.tmp / "tx.py").write_text(UDP_SENDER)
    receiver = subprocess.Popen(
        _ns(BOX, sys.executable, str(lab.tmp / "rx.py"), BOX_IP, str(port)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        _run(*_ns(WAN, sys.executable, str(lab.tmp / "tx.py"), ROUTER_WAN, str(port)))
        return receiver.stdout.readline().strip()
    finally:
        if receiver.poll() is None:
            receiver.kill()
        receiver.wait(timeout=5)
        if receiver.stdout is not None:
            receiver.stdout.close()


@pytest.mark.parametrize(
    ("method", "port", "extra"),
    [
        # miniupnpd grants PCP at least 120 s, so the renewal is asked for early.
        ("pcp", 41701, ("--lifetime", "120", "--refresh-after", "1")),
        ("nat-pmp", 41702, ("--lifetime", "4")),  # renews by itself after 2 s
        ("upnp", 41703, ("--lifetime", "4", "--multicast-interface", BOX_IP)),
    ],
)
def test_miniupnpd_maps_renews_and_deletes(
    lab: Lab, method: str, port: int, extra: tuple[str, ...]
) -> None:
    mapper = Mapper("--port", str(port), "--methods", method, *extra)
    try:
        started = mapper.event()
        assert started == {"event": "started", "gateway": ROUTER_LAN, "local_ip": BOX_IP}
        acquired = mapper.event()
        assert acquired["event"] == "acquired", acquired
        assert (acquired["protocol"], acquired["external_ip"], acquired["external_port"]) == (
            method,
            ROUTER_WAN,
            port,
        )
        assert f"dport {port} dnat ip to {BOX_IP}:{port}" in lab.nat_rules()
        assert _through_the_mapping(lab, port) == f"through the mapping {WAN_IP}"
        renewed = mapper.event(timeout=10)
        assert renewed["event"] == "renewed" and renewed["protocol"] == method, renewed
        assert mapper.stop() == 0
        lost = mapper.event()
        assert lost == {"event": "lost", "protocol": method, "reason": "deleted on shutdown"}
        assert f"dport {port}" not in lab.nat_rules()
    except AssertionError:
        print(lab.miniupnpd_log.read_text()[-4000:])
        raise
    finally:
        mapper.kill()


def test_router_without_a_mapping_daemon_fails_fast_with_a_summary(lab: Lab) -> None:
    # Ask the router on ports where nothing listens: its ICMP answers PCP and NAT-PMP at once.
    mapper = Mapper(
        "--port",
        "41704",
        "--gateway",
        ROUTER_LAN,
        "--pcp-port",
        "5399",
        "--ssdp-port",
        "1999",
        "--methods",
        "pcp,nat-pmp,upnp",
    )
    try:
        mapper.event()
        began = time.monotonic()
        failed = mapper.event(timeout=10)
        assert failed["event"] == "failed"
        assert failed["summary"] == (
            "no port mapping: the router answered neither PCP nor NAT-PMP, and no UPnP gateway "
            "replied"
        )
        assert time.monotonic() - began < 5.0  # ICMP, not timeouts, for PCP and NAT-PMP
        assert mapper.stop() == 0
    finally:
        mapper.kill()
