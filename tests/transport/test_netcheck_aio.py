"""transport.netcheck_aio on real loopback sockets, against our own stun_aio servers."""

from __future__ import annotations

import socket
from ipaddress import ip_address

import pytest

from transport import netcheck_aio, stun_aio
from transport.netcheck import (
    Filtering,
    LocalInfo,
    MappingBehavior,
    NatType,
    NetcheckConfig,
    Purpose,
)

FAST = NetcheckConfig(rto=0.05, attempts=2, final_wait=0.2)


async def test_loopback_with_two_addresses_is_open() -> None:
    """127.0.0.1 and 127.0.0.2, two ports each: an RFC 5780 server; plus a relay's STUN port."""
    async with (
        await stun_aio.serve(("127.0.0.1", 0), other=("127.0.0.2", 0)) as server,
        await stun_aio.serve(("127.0.0.1", 0)) as relay,
    ):
        report = await netcheck_aio.run_netcheck(
            [server.primary], {"home": relay.addresses[0]}, bind=("127.0.0.1", 0)
        )
    v4 = report.ipv4
    assert report.udp and v4.reachable
    assert v4.nat_type is NatType.OPEN and v4.open
    assert v4.mapping is MappingBehavior.ENDPOINT_INDEPENDENT
    assert v4.filtering is Filtering.ENDPOINT_INDEPENDENT
    assert v4.reflexive is not None and v4.reflexive[0] == "127.0.0.1"
    assert report.notes == ()
    by_purpose = {o.purpose: o for o in report.observations}
    assert server.other is not None
    assert by_purpose[Purpose.FILTER_CHANGE_IP_PORT].source == server.other
    assert by_purpose[Purpose.FILTER_CHANGE_PORT].source == ("127.0.0.1", server.other[1])
    assert by_purpose[Purpose.MAP_OTHER_IP_PORT].mapped == v4.reflexive
    [home] = report.relays
    assert home.name == "home" and home.rtt is not None and home.rtt < 0.5
    assert report.duration < 2.0
    assert "UDP works. IPv4 127.0.0.1: no NAT (open)" in report.summary()


async def test_loopback_nothing_answers_is_blocked() -> None:
    # A port nobody listens on: ICMP port unreachable, then the transactions time out.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind(("127.0.0.1", 0))
        dead = hole.getsockname()
    report = await netcheck_aio.run_netcheck([dead], bind=("127.0.0.1", 0), config=FAST)
    assert not report.udp and report.ipv4.nat_type is NatType.BLOCKED
    assert report.duration < 1.0


async def test_loopback_run_accepts_given_local_facts() -> None:
    async with await stun_aio.serve(("127.0.0.1", 0)) as server:
        info = LocalInfo(port=1, ipv4="192.0.2.10")  # not our port: looks like a NAT
        report = await netcheck_aio.run_netcheck(
            [server.addresses[0]], bind=("127.0.0.1", 0), local=info, config=FAST
        )
    assert report.ipv4.reachable and not report.ipv4.open
    assert report.ipv4.nat_type is NatType.UNKNOWN  # one plain server can't tell more


def test_egress_address_is_an_address_of_this_host_or_none() -> None:
    for family in (4, 6):
        found = netcheck_aio.egress_address(family)
        if found is not None:
            assert ip_address(found).version == family


def test_interfaces_from_netlink() -> None:
    addresses = netcheck_aio.host_addresses()
    if not addresses:
        pytest.skip("netlink is not available here")
    assert "127.0.0.1" in addresses
    assert netcheck_aio.interface_for_address("127.0.0.1") == "lo"
    assert netcheck_aio.interface_for_address("192.0.2.254") is None


def test_local_info_of_a_loopback_socket() -> None:
    sock = netcheck_aio.open_socket(("127.0.0.1", 0))
    try:
        info = netcheck_aio.local_info(sock)
        assert info.port == sock.getsockname()[1]
        assert info.families == frozenset({4})
        assert "127.0.0.1" in info.addresses
        assert info.is_local(("127.0.0.1", info.port))
        assert not info.is_local(("127.0.0.1", info.port + 1))
    finally:
        sock.close()


def test_default_socket_is_dual_stack_when_possible() -> None:
    sock = netcheck_aio.open_socket()
    try:
        info = netcheck_aio.local_info(sock)
        if sock.family == socket.AF_INET6:
            assert info.families == frozenset({4, 6})
        else:
            assert info.families == frozenset({4})
    finally:
        sock.close()


async def test_resolve_names_and_literals() -> None:
    assert await netcheck_aio.resolve("127.0.0.1", 3478) == [("127.0.0.1", 3478)]
    assert ("127.0.0.1", 3478) in await netcheck_aio.resolve("localhost", 3478)
    assert await netcheck_aio.resolve("no-such-host.invalid", 3478) == []
