"""The TUN device in a network namespace this test makes (``lzt<pid>``, removed in ``finally``).

Inside the namespace a child Python process opens a TUN with ``transport.tun``, gives it a
device address and the overlay route, then checks both directions with real sockets:

- a UDP socket sends to a box address in the overlay: the kernel routes it into the TUN, and
  the packet read from the TUN is that datagram;
- a packet written into the TUN (an IPv6/UDP datagram from the box address, checksum and all)
  arrives at a UDP socket bound on the device address;
- after ``close()`` the interface is gone.

Needs root (network namespaces, /dev/net/tun) and ``ip``: skipped without them, but under
``CI`` it fails loudly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.natlab.lab import lab_or_skip

REPO = Path(__file__).resolve().parents[2]
NS = f"lzt{os.getpid()}"

CHILD = r"""
import json, select, socket, struct, sys, time
from ipaddress import IPv6Address
from pyroute2 import IPRoute
from transport.addressing import RESOLVER
from transport.tun import Tun

DEVICE, BOX = IPv6Address("fc03:1136:38ab:cdef:1::5"), IPv6Address("fc03:1136:38ab:cdef::1")
out = {}

def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF

def udp6(src, dst, sport, dport, payload):
    length = 8 + len(payload)
    pseudo = src.packed + dst.packed + struct.pack("!I3xB", length, 17)  # RFC 8200 sec. 8.1
    header = struct.pack("!HHHH", sport, dport, length, 0)
    csum = checksum(pseudo + header + payload) or 0xFFFF
    udp = struct.pack("!HHHH", sport, dport, length, csum) + payload
    ip = struct.pack("!IHBB", 6 << 28, length, 17, 64) + src.packed + dst.packed
    return ip + udp

tun = Tun.open("lzc0")
tun.configure([DEVICE, RESOLVER])
with IPRoute() as ipr:
    [link] = ipr.get_links(ifname="lzc0")
    out["mtu"] = link.get_attr("IFLA_MTU")
    out["routes"] = sorted(
        f"{r.get_attr('RTA_DST')}/{r['dst_len']}" for r in ipr.get_routes(family=10, oif=tun.index)
        if r.get_attr("RTA_DST") and r["dst_len"] == 40
    )

# 1. a socket's datagram to the overlay comes out of the TUN
sender = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
sender.bind((str(DEVICE), 0))
sender.sendto(b"into the tunnel", (str(BOX), 9999))
deadline = time.monotonic() + 3
out["read"] = None
while time.monotonic() < deadline and out["read"] is None:
    select.select([tun.fd], [], [], 0.2)
    while (packet := tun.read()) is not None:
        if packet[0] >> 4 == 6 and packet[6] == 17 and packet[24:40] == BOX.packed:
            out["read"] = {
                "src": str(IPv6Address(packet[8:24])),
                "dport": struct.unpack("!H", packet[42:44])[0],
                "payload": packet[48:].decode(),
            }
            break

# 2. a packet written into the TUN reaches a socket
receiver = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
receiver.bind((str(DEVICE), 4242))
receiver.settimeout(3)
out["written"] = tun.write(udp6(BOX, DEVICE, 5353, 4242, b"out of the tunnel"))
data, addr = receiver.recvfrom(2048)
out["received"] = {"payload": data.decode(), "from": addr[0], "sport": addr[1]}

tun.close()
with IPRoute() as ipr:
    out["after_close"] = ipr.link_lookup(ifname="lzc0")
print(json.dumps(out))
"""


@pytest.fixture
def netns() -> object:
    lab_or_skip(tun=True)  # root, `ip netns`, /dev/net/tun; fails as root or under CI
    subprocess.run(["ip", "netns", "add", NS], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", NS, "link", "set", "lo", "up"], check=True, timeout=10)
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=False, timeout=10)


def test_tun_carries_packets_both_ways_and_goes_away(netns: str) -> None:
    result = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", CHILD],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["mtu"] == 1280
    assert out["routes"] == ["fc03:1136:3800::/40"]
    assert out["read"] == {
        "src": "fc03:1136:38ab:cdef:1::5",
        "dport": 9999,
        "payload": "into the tunnel",
    }
    assert out["written"] is True
    assert out["received"] == {
        "payload": "out of the tunnel",
        "from": "fc03:1136:38ab:cdef::1",
        "sport": 5353,
    }
    assert out["after_close"] == []


def test_a_bad_interface_name_is_refused() -> None:
    from transport.tun import Tun, TunError

    with pytest.raises(TunError, match="not a valid interface name"):
        Tun.open("x" * 16)
