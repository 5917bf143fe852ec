"""The throughput kit measures what it claims: iperf3 over the lab's plain path, and over
wireguard-go between a host behind a NAT3 router and a public host (``tests/natlab/throughput.py``).

A site host (10.1.1.10 behind NAT3) sends one TCP stream to a public host (192.0.2.30): first
straight through the router (the plain lab path), then through wireguard-go, the client side
behind the NAT dialing the public host's UDP port. Both figures must clear a modest floor, and
the tunnel's own byte counters (``wg show <if> transfer``) on both sides must cover the TCP
payload iperf3 moved, so the second figure really is the tunnel's. The figures are printed
(``pytest -s``) and recorded as test properties.

Needs root, ``ip``, ``nft``, ``/dev/net/tun``, ``iperf3``, ``wireguard-go`` and ``wg``
(``wireguard-tools``): skipped without them, failing as root or under CI (`lab_or_skip`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.natlab.lab import Host, Lab, lab_or_skip
from tests.natlab.throughput import WireguardGo, tcp_stream

pytestmark = [pytest.mark.natlab, pytest.mark.timeout(90)]

SECONDS = 2.0
FLOOR_MBIT = 20.0  # far below what any of this does on a 2-core VM; catches a broken path


@dataclass
class Pair:
    lab: Lab
    inside: Host  # behind the NAT3 router
    public: Host  # on the internet bridge


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    lab_or_skip(
        tun=True,
        tools=[("iperf3", "iperf3"), ("wireguard-go", "wireguard-go"), ("wg", "wireguard-tools")],
    )
    with Lab(start_stun=False) as lab:
        inside = lab.add_site("home", "NAT3").add_host("inside")
        public = lab.add_public_host("public")
        yield Pair(lab, inside, public)


def test_plain_path_carries_a_tcp_stream_through_the_nat(
    pair: Pair, record_property: Callable[[str, object], None]
) -> None:
    assert pair.public.ip is not None
    started = time.monotonic()
    stream = tcp_stream(pair.inside, pair.public, pair.public.ip, seconds=SECONDS)
    print(f"plain path: {stream.mbit_s:.0f} Mbit/s ({time.monotonic() - started:.1f} s)")
    record_property("plain_mbit_s", round(stream.mbit_s, 1))
    assert stream.mbit_s > FLOOR_MBIT, stream
    assert stream.bytes_received > 0 and stream.seconds >= SECONDS * 0.9, stream
    # it crossed the router: masquerade left a conntrack entry for the iperf3 port
    assert "dport=5201" in pair.inside.site.router.conntrack()  # type: ignore[union-attr]


def test_wireguard_go_carries_a_tcp_stream_through_its_interface(
    pair: Pair, record_property: Callable[[str, object], None]
) -> None:
    assert pair.public.ip is not None
    started = time.monotonic()
    with WireguardGo(pair.public, pair.inside, endpoint=pair.public.ip) as wg:
        up = time.monotonic() - started
        assert wg.latest_handshake(pair.inside) > 0
        rx0, tx0 = wg.transfer(pair.inside)
        srx0, _ = wg.transfer(pair.public)
        stream = tcp_stream(pair.inside, pair.public, wg.server_ip, seconds=SECONDS)
        rx1, tx1 = wg.transfer(pair.inside)
        srx1, _ = wg.transfer(pair.public)
        ifs = (wg.server_if, wg.client_if)
    print(
        f"wireguard-go: {stream.mbit_s:.0f} Mbit/s (up in {up:.1f} s, "
        f"{time.monotonic() - started:.1f} s in all)"
    )
    record_property("wireguard_go_mbit_s", round(stream.mbit_s, 1))
    assert stream.mbit_s > FLOOR_MBIT, stream
    # The tunnel's counters hold whole encrypted datagrams: at least the payload iperf3 moved.
    assert tx1 - tx0 >= stream.bytes_sent, (tx1 - tx0, stream)
    assert srx1 - srx0 >= stream.bytes_received, (srx1 - srx0, stream)
    assert rx1 > rx0  # the ACKs came back through it too
    # Torn down: the interfaces are gone.
    for host, ifname in ((pair.public, ifs[0]), (pair.inside, ifs[1])):
        assert host.run(["ip", "link", "show", ifname], check=False).returncode != 0
