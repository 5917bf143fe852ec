"""The NAT simulator proves its own routers: every preset's mapping and filtering behaviour is
measured the way RFC 4787 defines it, from one inside endpoint towards two public addresses,
plus timeouts, hairpinning, CGNAT, blocked UDP and the IPv6 firewall."""

from __future__ import annotations

import dataclasses

import pytest

from transport.natsim import (
    BLOCKED,
    CGNAT,
    FIREWALL,
    NAT1,
    NAT2,
    NAT3,
    NAT4,
    NONE,
    Address,
    Behavior,
    Filtering,
    Host,
    Mapping,
    Network,
    Router,
    Socket,
)

S1 = "198.51.100.1"  # two public addresses, as RFC 5780's server has
S2 = "198.51.100.2"
S6 = "2001:db8:ffff::1"
HOME = "203.0.113.10"
SERVER_ENDPOINTS = [(S1, 3478), (S1, 3479), (S2, 3478)]


def lab(behavior: Behavior, seed: int = 1) -> tuple[Network, Router, Host, dict[Address, Socket]]:
    net = Network(seed=seed)
    router = net.add_router("home", behavior, HOME)
    inside = net.add_host("inside", ["192.168.1.10", "2001:db8:1::10"], behind=router)
    s1 = net.add_host("s1", [S1, S6])
    s2 = net.add_host("s2", S2)
    servers = {
        (S1, 3478): s1.bind(3478),
        (S1, 3479): s1.bind(3479),
        (S2, 3478): s2.bind(3478),
    }
    return net, router, inside, servers


def measure_mapping(behavior: Behavior) -> Mapping:
    """RFC 4787 section 4.1: send from one X:x to Y1:y1, Y1:y2 and Y2:y1; compare X':x'."""
    net, _, inside, servers = lab(behavior)
    sock = inside.bind(5000)
    for dest in SERVER_ENDPOINTS:
        sock.sendto(b"map?", dest)
    net.run_for(1)
    same_ip_port, same_ip, other_ip = (servers[d].inbox.popleft().src for d in SERVER_ENDPOINTS)
    if same_ip_port == same_ip == other_ip:
        return Mapping.EIM
    if same_ip_port == same_ip:
        return Mapping.ADM
    assert len({same_ip_port, same_ip, other_ip}) == 3
    return Mapping.APDM


def measure_filtering(behavior: Behavior) -> Filtering:
    """RFC 4787 section 5: after X:x sent to Y1:y1 only, who among Y1:y1, Y1:y2 and Y2:y1
    gets through to X':x'?"""
    net, _, inside, servers = lab(behavior)
    sock = inside.bind(5000)
    sock.sendto(b"open", (S1, 3478))
    net.run_for(1)
    mapped = servers[(S1, 3478)].inbox.popleft().src
    for dest in SERVER_ENDPOINTS:
        servers[dest].sendto(b"in", mapped)
    net.run_for(1)
    got = {dg.src for dg in sock.inbox}
    if got == set(SERVER_ENDPOINTS):
        return Filtering.EIF
    if got == {(S1, 3478), (S1, 3479)}:
        return Filtering.ADF
    assert got == {(S1, 3478)}, got
    return Filtering.APDF


@pytest.mark.parametrize(
    ("behavior", "mapping", "filtering"),
    [
        (NAT1, Mapping.EIM, Filtering.EIF),
        (NAT2, Mapping.EIM, Filtering.ADF),
        (NAT3, Mapping.EIM, Filtering.APDF),
        (NAT4, Mapping.APDM, Filtering.APDF),
        (CGNAT, Mapping.EIM, Filtering.APDF),
        (dataclasses.replace(NAT3, name="ADM", mapping=Mapping.ADM), Mapping.ADM, Filtering.APDF),
        (dataclasses.replace(NAT4, name="APDM+EIF", filtering=Filtering.EIF), Mapping.APDM, None),
    ],
    ids=lambda v: getattr(v, "name", None),
)
def test_each_preset_maps_and_filters_as_rfc_4787_defines(
    behavior: Behavior, mapping: Mapping, filtering: Filtering | None
) -> None:
    assert measure_mapping(behavior) is mapping
    if filtering is not None:
        assert measure_filtering(behavior) is filtering
    else:  # APDM + EIF: the mapping for Y1:y1 accepts everyone
        assert measure_filtering(behavior) is Filtering.EIF


def test_mapping_expires_after_the_timeout_and_inbound_does_not_refresh_it() -> None:
    net, router, inside, servers = lab(NAT1)
    sock = inside.bind(5000)
    sock.sendto(b"out", (S1, 3478))
    net.run_for(0.5)
    mapped = servers[(S1, 3478)].inbox.popleft().src
    assert mapped == (HOME, 5000)  # port preserved
    for t in (10.0, 20.0, 29.0):  # inbound traffic, which must not keep the mapping alive
        net.run_until(t)
        servers[(S2, 3478)].sendto(b"in", mapped)
    net.run_until(29.9)
    assert len(sock.inbox) == 3
    servers[(S2, 3478)].sendto(b"late", mapped)  # reaches the router at 29.92 s: still open
    net.run_until(29.99)
    assert len(sock.inbox) == 4
    servers[(S2, 3478)].sendto(b"later", mapped)  # reaches it at 30.01 s, 30 s after the out
    net.run_until(31)
    assert len(sock.inbox) == 4
    assert net.drops["mapping expired"] == 1
    assert router.bindings() == []


def test_outbound_traffic_refreshes_the_mapping() -> None:
    net, _, inside, servers = lab(NAT1)
    sock = inside.bind(5000)
    sock.sendto(b"out", (S1, 3478))
    net.run_until(20)
    sock.sendto(b"again", (S1, 3478))
    net.run_until(45)
    mapped = servers[(S1, 3478)].inbox.popleft().src
    servers[(S2, 3478)].sendto(b"in", mapped)  # 25 s after the refresh, 45 s after the first
    net.run_until(46)
    assert [dg.data for dg in sock.inbox] == [b"in"]
    net.run_until(51)  # 31 s after the refresh
    servers[(S2, 3478)].sendto(b"in", mapped)
    net.run_until(52)
    assert len(sock.inbox) == 1


def test_a_filter_permission_expires_even_while_its_mapping_lives() -> None:
    net, _, inside, servers = lab(NAT3)
    sock = inside.bind(5000)
    sock.sendto(b"a", (S1, 3478))
    net.run_until(20)
    sock.sendto(b"b", (S2, 3478))  # keeps the (EIM) mapping alive, opens only S2:3478
    net.run_until(35)
    mapped = servers[(S1, 3478)].inbox.popleft().src
    servers[(S1, 3478)].sendto(b"from s1", mapped)
    servers[(S2, 3478)].sendto(b"from s2", mapped)
    net.run_until(36)
    assert [dg.data for dg in sock.inbox] == [b"from s2"]
    assert net.drops["filtered"] == 1


def test_port_preservation_and_random_ports_are_reproducible() -> None:
    net, router, inside, servers = lab(NAT3)
    other = net.add_host("other", "192.168.1.11", behind=router)
    inside.bind(5000).sendto(b"x", (S1, 3478))
    other.bind(5000).sendto(b"y", (S1, 3478))
    net.run_for(1)
    first, second = (dg.src for dg in servers[(S1, 3478)].inbox)
    assert first == (HOME, 5000)
    assert second[0] == HOME and second[1] != 5000  # the port was taken: a random one

    def symmetric_ports(seed: int) -> list[int]:
        net, _, inside, servers = lab(NAT4, seed=seed)
        sock = inside.bind(5000)
        for dest in SERVER_ENDPOINTS:
            sock.sendto(b"x", dest)
        net.run_for(1)
        return [servers[d].inbox.popleft().src[1] for d in SERVER_ENDPOINTS]

    assert symmetric_ports(3) == symmetric_ports(3)
    assert symmetric_ports(3) != symmetric_ports(4)
    assert 5000 not in symmetric_ports(3)


@pytest.mark.parametrize("hairpin", [True, False])
def test_hairpinning(hairpin: bool) -> None:
    net, router, inside, servers = lab(dataclasses.replace(NAT3, hairpin=hairpin))
    neighbour = net.add_host("neighbour", "192.168.1.11", behind=router)
    a, b = inside.bind(5000), neighbour.bind(6000)
    a.sendto(b"learn", (S1, 3478))
    b.sendto(b"learn", (S1, 3478))
    net.run_for(1)
    mapped_a, mapped_b = (dg.src for dg in servers[(S1, 3478)].inbox)
    b.sendto(b"open for a", mapped_a)  # punch, as two peers behind one NAT would: a's
    net.run_for(1)  # filter drops this one (a has sent nothing to b's external address yet)
    a.sendto(b"hello b", mapped_b)
    net.run_for(1)
    b.sendto(b"hello a", mapped_a)
    net.run_for(1)
    if hairpin:
        # RFC 4787 REQ-9a: the packet looks as if it came from a's external address.
        assert [(dg.data, dg.src) for dg in b.inbox] == [(b"hello b", mapped_a)]
        assert [(dg.data, dg.src) for dg in a.inbox] == [(b"hello a", mapped_b)]
        assert net.drops["filtered"] == 1
    else:
        assert not a.inbox and not b.inbox
        assert net.drops["hairpinning off"] == 3


def test_cgnat_translates_twice_and_answers_find_their_way_back() -> None:
    net = Network(seed=5)
    carrier = net.add_router("carrier", CGNAT, "198.51.100.50")
    home = net.add_router("home", NAT3, "100.64.0.2", behind=carrier)
    phone = net.add_host("phone", "192.168.0.5", behind=home)
    server = net.add_host("server", S1).bind(3478)
    sock = phone.bind(41641)
    sock.sendto(b"who am i", (S1, 3478))
    net.run_for(1)
    seen = server.inbox.popleft()
    assert seen.src[0] == "198.51.100.50"  # the carrier's address, not the home router's
    [home_binding] = home.bindings()
    assert home_binding.internal == ("192.168.0.5", 41641)
    assert home_binding.external == ("100.64.0.2", 41641)
    [carrier_binding] = carrier.bindings()
    assert carrier_binding.internal == ("100.64.0.2", 41641)
    assert carrier_binding.external == seen.src
    server.sendto(b"you are " + repr(seen.src).encode(), seen.src)
    net.run_for(1)
    answer = sock.inbox.popleft()
    assert answer.src == (S1, 3478) and answer.dst == ("192.168.0.5", 41641)
    # 1 ms + 10 ms + 10 ms + 10 ms each way, the answer sent at t=1 s
    assert net.log[-1].time == pytest.approx(1.031)
    net.add_host("stranger", S2).bind(1).sendto(b"unsolicited", seen.src)
    net.run_for(1)
    assert not sock.inbox and net.drops["filtered"] == 1


def test_blocked_udp_drops_everything_udp_but_lets_tcp_through() -> None:
    net, _, inside, servers = lab(BLOCKED)
    sock = inside.bind(5000)
    sock.sendto(b"udp", (S1, 3478))
    sock.sendto(b"udp6", (S6, 3478))
    sock.sendto(b"tcp", (S1, 3478), proto="tcp")
    net.run_for(1)
    [got] = servers[(S1, 3478)].inbox
    assert got.data == b"tcp" and got.proto == "tcp"
    assert net.drops["udp blocked"] == 2
    servers[(S1, 3478)].sendto(b"udp back", got.src)
    servers[(S1, 3478)].sendto(b"tcp back", got.src, proto="tcp")
    net.run_for(1)
    assert [dg.data for dg in sock.inbox] == [b"tcp back"]


def test_ipv6_is_not_translated_and_a_stateful_firewall_filters_inbound() -> None:
    net, _, inside, servers = lab(NAT3)
    s1 = servers[(S1, 3478)].host
    v6a, v6b = s1.bind(4000), s1.bind(4001)
    sock = inside.bind(5000)
    v6a.sendto(b"unsolicited", ("2001:db8:1::10", 5000))
    net.run_for(1)
    assert not sock.inbox and net.drops["filtered"] == 1
    sock.sendto(b"out", (S6, 4000))
    net.run_for(1)
    assert v6a.inbox.popleft().src == ("2001:db8:1::10", 5000)  # no translation
    v6a.sendto(b"answer", ("2001:db8:1::10", 5000))
    v6b.sendto(b"other port", ("2001:db8:1::10", 5000))  # APDF: not the port we sent to
    net.run_for(1)
    assert [dg.data for dg in sock.inbox] == [b"answer"]
    assert net.drops["filtered"] == 2
    net.run_for(31)  # the pinhole times out like a mapping
    v6a.sendto(b"too late", ("2001:db8:1::10", 5000))
    net.run_for(1)
    assert len(sock.inbox) == 1


def test_ipv6_through_a_carrier_nat_reaches_the_home_firewall_only() -> None:
    net = Network()
    carrier = net.add_router("carrier", CGNAT, "198.51.100.50")
    home = net.add_router("home", NAT3, "100.64.0.2", behind=carrier)
    phone = net.add_host("phone", ["192.168.0.5", "2001:db8:2::5"], behind=home)
    server = net.add_host("server", S6).bind(3478)
    sock = phone.bind(41641)
    sock.sendto(b"v6 out", (S6, 3478))
    net.run_for(1)
    assert server.inbox.popleft().src == ("2001:db8:2::5", 41641)
    server.sendto(b"v6 back", ("2001:db8:2::5", 41641))
    net.run_for(1)
    assert [dg.data for dg in sock.inbox] == [b"v6 back"]


def test_a_static_port_mapping_opens_a_symmetric_nat() -> None:
    net, router, inside, servers = lab(NAT4)
    mapped = router.add_port_mapping(("192.168.1.10", 41641), 41641)
    assert mapped == (HOME, 41641)
    sock = inside.bind(41641)
    servers[(S2, 3478)].sendto(b"anyone", mapped)
    net.run_for(1)
    assert [dg.data for dg in sock.inbox] == [b"anyone"]
    for dest in SERVER_ENDPOINTS:  # and outbound leaves from the mapped port, whatever the dest
        sock.sendto(b"out", dest)
    net.run_for(1)
    assert {servers[d].inbox.pop().src for d in SERVER_ENDPOINTS} == {mapped}
    router.remove_port_mapping(("192.168.1.10", 41641))
    servers[(S2, 3478)].sendto(b"now closed", mapped)
    net.run_for(1)
    assert len(sock.inbox) == 1


def test_hosts_on_one_lan_talk_directly_and_fast() -> None:
    net, router, inside, _ = lab(NAT4)
    neighbour = net.add_host("neighbour", "192.168.1.11", behind=router)
    a, b = inside.bind(5000), neighbour.bind(5000)
    a.sendto(b"hi", ("192.168.1.11", 5000))
    net.run_for(1)
    got = b.inbox.popleft()
    assert got.src == ("192.168.1.10", 5000)
    assert net.log[-1].time == pytest.approx(0.002)
    assert router.bindings() == []


def test_plain_router_and_firewall_without_translation() -> None:
    net = Network()
    open_router = net.add_router("open", NONE, "203.0.113.1")
    walled = net.add_router("walled", FIREWALL, "203.0.113.2")
    server_a = net.add_host("a", "203.0.113.100", behind=open_router).bind(7)
    server_b = net.add_host("b", "203.0.113.200", behind=walled).bind(7)
    client = net.add_host("client", S1).bind(9)
    client.sendto(b"to a", ("203.0.113.100", 7))
    client.sendto(b"to b", ("203.0.113.200", 7))
    net.run_for(1)
    assert [dg.data for dg in server_a.inbox] == [b"to a"]
    assert not server_b.inbox and net.drops["filtered"] == 1
    server_b.sendto(b"out", (S1, 9))
    net.run_for(1)
    assert client.inbox.popleft().src == ("203.0.113.200", 7)
    client.sendto(b"to b again", ("203.0.113.200", 7))
    net.run_for(1)
    assert [dg.data for dg in server_b.inbox] == [b"to b again"]


def test_latency_and_seeded_loss_are_deterministic() -> None:
    def run(seed: int) -> list[float]:
        net = Network(seed=seed)
        router = net.add_router("home", NAT1, HOME)
        sender = net.add_host("sender", "192.168.1.10", behind=router, loss=0.25).bind(5000)
        receiver = net.add_host("receiver", S1).bind(3478)
        for i in range(1000):
            net.call_at(i * 0.001, lambda: sender.sendto(b"x", (S1, 3478)))
        net.run_for(5)
        assert net.drops["lost"] == 1000 - len(receiver.inbox)
        return [r.time for r in net.log if r.event == "deliver"]

    first = run(11)
    assert first == run(11)
    assert first != run(12)
    assert 690 < len(first) < 810  # 25 % loss on one link
    assert first[0] == pytest.approx(0.021, abs=0.001)  # 1 + 10 + 10 ms one way


def test_block_and_unblock_a_pair_of_public_addresses() -> None:
    net, _, inside, servers = lab(NAT1)
    sock = inside.bind(5000)
    net.block(HOME, S1)
    sock.sendto(b"x", (S1, 3478))
    sock.sendto(b"y", (S2, 3478))
    net.run_for(1)
    assert not servers[(S1, 3478)].inbox and len(servers[(S2, 3478)].inbox) == 1
    assert net.drops["blocked"] == 1
    net.unblock(HOME, S1)
    sock.sendto(b"x", (S1, 3478))
    net.run_for(1)
    assert len(servers[(S1, 3478)].inbox) == 1


def test_the_clock_orders_events_and_run_until_stops_where_told() -> None:
    net = Network()
    seen: list[tuple[float, str]] = []
    net.call_at(2.0, lambda: seen.append((net.now, "b")))
    net.call_at(1.0, lambda: seen.append((net.now, "a")))
    net.call_at(2.0, lambda: seen.append((net.now, "c")))  # same time: insertion order
    net.call_at(3.0, lambda: seen.append((net.now, "never"))).cancel()
    net.run_until(2.5)
    assert seen == [(1.0, "a"), (2.0, "b"), (2.0, "c")]
    assert net.now == 2.5
    assert net.next_event() is None
    assert not net.step()

    def spin() -> None:
        net.call_later(0, spin)

    net.call_later(0, spin)
    with pytest.raises(RuntimeError, match="busy loop"):
        net.run_until(10, max_events=1000)


def test_building_mistakes_are_refused() -> None:
    net = Network()
    router = net.add_router("r", NAT3, HOME)
    net.add_host("h", "192.168.1.10", behind=router)
    with pytest.raises(ValueError, match="already"):
        net.add_host("h", "192.168.1.11", behind=router)
    with pytest.raises(ValueError, match="already used"):
        net.add_host("h2", "192.168.1.10", behind=router)
    with pytest.raises(ValueError, match="does not translate"):
        net.add_router("plain", NONE, "203.0.113.99").add_port_mapping(("203.0.113.5", 1))
    sock = net.hosts["h"].bind(1)
    with pytest.raises(ValueError, match="in use"):
        net.hosts["h"].bind(1)
    sock.sendto(b"x", (S6, 1))  # no IPv6 on this host: dropped, not an exception
    assert net.drops["no source address of this family"] == 1
