"""transport.netcheck's sans-IO core against scripted networks, on a fake clock.

The network here is a few lines of test code: a NAT with a chosen mapping and filtering
behaviour (RFC 4787 terms) in front of our client, and STUN servers on documentation addresses
that are either our real :class:`StunResponder` (RFC 5780 mode or plain) or scripted answers
(a server that ignores CHANGE-REQUEST, one that refuses PADDING). Every row of the NAT table in
docs/netcheck.md is checked here.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from transport import stun
from transport.netcheck import (
    Filtering,
    LocalInfo,
    MappingBehavior,
    NatType,
    Netcheck,
    NetcheckConfig,
    NetcheckReport,
    Purpose,
    classify,
)
from transport.stun import (
    Class,
    ErrorCode,
    Message,
    OtherAddress,
    Padding,
    StunResponder,
    UnknownAttributes,
    XorMappedAddress,
    decode,
    encode,
)
from transport.wire import Address

PRIVATE = ("10.0.0.2", 40000)  # our socket behind the NAT
PUBLIC_IP = "203.0.113.7"  # the NAT's public address
OPEN_HOST = ("192.0.2.10", 40000)  # our socket when there is no NAT
SERVER, SERVER_OTHER = ("198.51.100.1", 3478), ("198.51.100.2", 3479)
PLAIN = ("198.51.100.20", 3478)
PLAIN2 = ("198.51.100.30", 3478)
RELAY = ("192.0.2.50", 3478)
HOST6 = ("2001:db8:1::10", 40000)
SERVER6, SERVER6_OTHER = ("2001:db8::1", 3478), ("2001:db8::2", 3479)

Handler = Callable[[bytes, Address, Address, float], list[stun.Reply]]


@dataclass
class FakeNat:
    """mapping / filtering: "ei", "ad", "apd" (RFC 4787), or None: no NAT / no filter."""

    mapping: str | None
    filtering: str | None
    hairpin: bool = False
    public_ip: str = PUBLIC_IP
    ports: dict[tuple[object, ...], int] = field(default_factory=dict)
    contacted: dict[Address, set[Address]] = field(default_factory=dict)

    def outbound(self, local: Address, dest: Address) -> Address:
        if self.mapping is None:
            public = local
        else:
            key: tuple[object, ...] = {"ei": (), "ad": (dest[0],), "apd": (dest,)}[self.mapping]
            port = self.ports.setdefault(key, 50000 + 7 * len(self.ports))
            public = (self.public_ip, port)
        self.contacted.setdefault(public, set()).add(dest)
        return public

    def inbound(self, source: Address, public: Address) -> bool:
        contacted = self.contacted.get(public)
        if contacted is None:
            return self.mapping is None and self.filtering is None
        if self.filtering in (None, "ei"):
            return True
        if self.filtering == "ad":
            return source[0] in {d[0] for d in contacted}
        return source in contacted


@dataclass
class World:
    nat4: FakeNat
    nat6: FakeNat = field(default_factory=lambda: FakeNat(None, None))
    local4: Address = PRIVATE
    local6: Address = HOST6
    one_way: dict[str, float] = field(default_factory=dict)  # by server IP; default 10 ms
    drop_all: bool = False
    drop_first_to: set[Address] = field(default_factory=set)
    servers: dict[Address, Handler] = field(default_factory=dict)
    queue: list[tuple[float, int, str, bytes, Address, Address]] = field(default_factory=list)
    sent: list[tuple[float, Address, int]] = field(default_factory=list)
    seq: int = 0

    def responder(self, responder: StunResponder, *addresses: Address) -> None:
        for address in addresses or responder.local_addresses():
            self.servers[address] = responder.handle

    def _push(self, when: float, kind: str, data: bytes, src: Address, dst: Address) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (when, self.seq, kind, data, src, dst))

    def _delay(self, ip: str) -> float:
        return self.one_way.get(ip, 0.010)

    def client_send(self, data: bytes, dest: Address, now: float) -> None:
        self.sent.append((now, dest, len(data)))
        six = ":" in dest[0]
        nat, local = (self.nat6, self.local6) if six else (self.nat4, self.local4)
        if self.drop_all:
            return
        if dest in self.drop_first_to:
            self.drop_first_to.discard(dest)
            return
        public = nat.outbound(local, dest)
        if dest[0] == nat.public_ip and nat.mapping is not None:  # to ourselves: hairpin?
            if nat.hairpin:
                self._push(now + 0.001, "client", data, public, dest)
            return
        self._push(now + self._delay(dest[0]), "server", data, public, dest)

    def deliver(self, check: Netcheck, now: float) -> None:
        while self.queue and self.queue[0][0] <= now:
            when, _, kind, data, src, dst = heapq.heappop(self.queue)
            if kind == "server":
                handler = self.servers.get(dst)
                for reply, to, frm in handler(data, src, dst, when) if handler else []:
                    self._push(when + self._delay(frm[0]), "client", reply, frm, to)
            else:
                nat = self.nat6 if ":" in src[0] else self.nat4
                if nat.inbound(src, dst):
                    check.receive(data, src, when)

    def run(self, check: Netcheck, limit: float = 30.0) -> NetcheckReport:
        now = 0.0
        for _ in range(10_000):
            for data, dest in check.datagrams_to_send(now):
                self.client_send(data, dest, now)
            if check.done:
                return check.report(now)
            times = [t for t in (check.next_timer(), self.queue[0][0] if self.queue else None) if t]
            assert times, "not done, yet nothing will ever happen"
            now = max(now, min(times))
            assert now < limit, "netcheck did not finish in time"
            self.deliver(check, now)
        raise AssertionError("too many steps")


def rfc5780_world(nat: FakeNat, *, local4: Address = PRIVATE) -> World:
    world = World(nat, local4=local4, one_way={RELAY[0]: 0.006})
    world.responder(StunResponder(primary=SERVER, other=SERVER_OTHER))
    world.responder(StunResponder(), PLAIN)
    world.responder(StunResponder(), RELAY)
    return world


def local_info(local4: Address = PRIVATE, **kw: object) -> LocalInfo:
    return LocalInfo(port=local4[1], ipv4=local4[0], interface_v4="eth0", **kw)  # type: ignore[arg-type]


def check_for(
    world: World,
    servers: list[Address],
    relays: dict[str, Address] | None = None,
    info: LocalInfo | None = None,
    **config: object,
) -> NetcheckReport:
    check = Netcheck(
        servers,
        relays or {},
        local=info or local_info(world.local4),
        now=0.0,
        config=NetcheckConfig(**config),  # type: ignore[arg-type]
    )
    return world.run(check)


EI, AD, APD = "ei", "ad", "apd"
M = MappingBehavior
F = Filtering

# The table of docs/netcheck.md: NAT behaviour -> what netcheck must find.
NAT_TABLE = [
    # mapping, filtering, NAT type, mapping found, filtering found
    (EI, EI, NatType.NAT1, M.ENDPOINT_INDEPENDENT, F.ENDPOINT_INDEPENDENT),
    (EI, AD, NatType.NAT2, M.ENDPOINT_INDEPENDENT, F.ADDRESS_DEPENDENT),
    (EI, APD, NatType.NAT3, M.ENDPOINT_INDEPENDENT, F.ADDRESS_AND_PORT_DEPENDENT),
    (AD, EI, NatType.NAT4, M.ADDRESS_DEPENDENT, F.ENDPOINT_INDEPENDENT),
    (AD, AD, NatType.NAT4, M.ADDRESS_DEPENDENT, F.ADDRESS_DEPENDENT),
    (AD, APD, NatType.NAT4, M.ADDRESS_DEPENDENT, F.ADDRESS_AND_PORT_DEPENDENT),
    (APD, EI, NatType.NAT4, M.ADDRESS_AND_PORT_DEPENDENT, F.ENDPOINT_INDEPENDENT),
    (APD, AD, NatType.NAT4, M.ADDRESS_AND_PORT_DEPENDENT, F.ADDRESS_DEPENDENT),
    (APD, APD, NatType.NAT4, M.ADDRESS_AND_PORT_DEPENDENT, F.ADDRESS_AND_PORT_DEPENDENT),
]


@pytest.mark.parametrize("mapping, filtering, nat_type, found_mapping, found_filtering", NAT_TABLE)
def test_every_nat_behaviour_is_classified(
    mapping: str, filtering: str, nat_type: NatType, found_mapping: M, found_filtering: F
) -> None:
    report = check_for(rfc5780_world(FakeNat(mapping, filtering)), [SERVER, PLAIN], {"home": RELAY})
    v4 = report.ipv4
    assert (v4.nat_type, v4.mapping, v4.filtering) == (nat_type, found_mapping, found_filtering)
    assert report.udp and v4.reachable and not v4.open
    assert v4.reflexive is not None and v4.reflexive[0] == PUBLIC_IP
    assert report.nat_type is nat_type
    assert report.duration < 6.0  # even when the filter tests time out
    assert report.notes == ()


def test_no_nat_is_open() -> None:
    world = rfc5780_world(FakeNat(None, None), local4=OPEN_HOST)
    report = check_for(world, [SERVER, PLAIN], {"home": RELAY})
    v4 = report.ipv4
    assert v4.nat_type is NatType.OPEN and v4.open and v4.reflexive == OPEN_HOST
    assert v4.mapping is M.ENDPOINT_INDEPENDENT and v4.filtering is F.ENDPOINT_INDEPENDENT
    assert v4.hairpinning is None  # not asked: no NAT to hairpin through


def test_no_nat_behind_a_stateful_firewall_is_open_with_its_filtering() -> None:
    world = rfc5780_world(FakeNat(None, APD), local4=OPEN_HOST)
    report = check_for(world, [SERVER, PLAIN])
    assert report.ipv4.nat_type is NatType.OPEN
    assert report.ipv4.filtering is F.ADDRESS_AND_PORT_DEPENDENT
    assert "firewall" in report.ipv4.line()


def test_udp_blocked() -> None:
    world = rfc5780_world(FakeNat(EI, EI))
    world.drop_all = True
    report = check_for(world, [SERVER, PLAIN], {"home": RELAY})
    assert not report.udp
    assert report.ipv4.nat_type is NatType.BLOCKED and not report.ipv4.reachable
    assert report.relays[0].rtt is None and report.nearest_relay is None
    assert report.duration == pytest.approx(1.75)  # one transaction's timeout: 0, .25, .75 + 1
    assert report.summary().startswith("UDP is blocked")
    # nothing after the first phase was tried, and the relay was asked once
    assert {o.purpose for o in report.observations} == {Purpose.PRIMARY, Purpose.RELAY}


def test_one_plain_server_cannot_tell_the_type() -> None:
    world = rfc5780_world(FakeNat(EI, APD))
    report = check_for(world, [PLAIN])
    assert report.ipv4.nat_type is NatType.UNKNOWN
    assert report.ipv4.mapping is None and report.ipv4.filtering is None
    assert report.ipv4.reflexive == (PUBLIC_IP, 50000)
    assert any("OTHER-ADDRESS" in n for n in report.notes)


def test_two_plain_servers_measure_mapping_but_not_filtering() -> None:
    world = rfc5780_world(FakeNat(EI, APD))
    world.responder(StunResponder(), PLAIN2)
    report = check_for(world, [PLAIN, PLAIN2])
    assert report.ipv4.mapping is M.ENDPOINT_INDEPENDENT and report.ipv4.filtering is None
    assert report.ipv4.nat_type is NatType.UNKNOWN


def test_two_plain_servers_see_a_symmetric_nat() -> None:
    world = rfc5780_world(FakeNat(APD, APD))
    world.responder(StunResponder(), PLAIN2)
    report = check_for(world, [PLAIN, PLAIN2])
    assert report.ipv4.mapping is M.DESTINATION_DEPENDENT
    assert report.ipv4.nat_type is NatType.NAT4
    assert len({o.mapped for o in report.observations if o.mapped}) == 2


def test_a_server_that_ignores_change_request_leaves_filtering_unknown() -> None:
    def liar(data: bytes, source: Address, local: Address, now: float) -> list[stun.Reply]:
        msg = decode(data)
        attrs = (XorMappedAddress(source), OtherAddress(SERVER_OTHER))
        return [(encode(Message(Class.SUCCESS, msg.transaction_id, attrs)), source, local)]

    world = World(FakeNat(EI, EI))
    world.servers[SERVER] = liar
    world.responder(StunResponder(), PLAIN)
    report = check_for(world, [SERVER, PLAIN])
    assert report.ipv4.filtering is None and report.ipv4.nat_type is NatType.UNKNOWN
    assert any("does not really change address" in n for n in report.notes)
    assert report.ipv4.mapping is M.ENDPOINT_INDEPENDENT


def test_listing_a_servers_other_address_voids_the_change_ip_test() -> None:
    world = rfc5780_world(FakeNat(EI, AD))
    report = check_for(world, [SERVER, (SERVER_OTHER[0], SERVER[1])])
    assert report.ipv4.filtering is None  # would have looked endpoint-independent
    assert any("change-IP filter test skipped" in n for n in report.notes)
    # ... while port-restricted filtering is still recognised by the change-port test alone
    world = rfc5780_world(FakeNat(EI, APD))
    report = check_for(world, [SERVER, (SERVER_OTHER[0], SERVER[1])])
    assert report.ipv4.nat_type is NatType.NAT3


def test_filter_tests_contact_nothing_new_before_they_are_read() -> None:
    world = rfc5780_world(FakeNat(EI, AD))
    check_for(world, [SERVER, PLAIN])
    first_other = min(t for t, dest, _ in world.sent if dest[0] == SERVER_OTHER[0])
    filter_sends = [t for t, dest, _ in world.sent if dest == SERVER]
    # every request to the server's primary (including the filter tests' retransmissions)
    # happened before anything was sent to its other IP
    assert max(filter_sends) < first_other


def test_hairpinning() -> None:
    with_hairpin = rfc5780_world(FakeNat(EI, APD, hairpin=True))
    assert check_for(with_hairpin, [SERVER, PLAIN]).ipv4.hairpinning is True
    without = rfc5780_world(FakeNat(EI, APD, hairpin=False))
    report = check_for(without, [SERVER, PLAIN])
    assert report.ipv4.hairpinning is False and "No hairpinning" in report.summary()
    off = rfc5780_world(FakeNat(EI, APD, hairpin=True))
    assert check_for(off, [SERVER, PLAIN], hairpin=False).ipv4.hairpinning is None


def test_relay_latency_is_the_best_of_its_samples() -> None:
    world = rfc5780_world(FakeNat(EI, EI))
    report = check_for(world, [SERVER], {"home": RELAY, "far": PLAIN})
    latencies = {r.name: r.rtt for r in report.relays}
    assert latencies["home"] == pytest.approx(0.012)
    assert latencies["far"] == pytest.approx(0.020)
    assert report.nearest_relay is not None and report.nearest_relay.name == "home"
    samples = [o for o in report.observations if o.relay == "home"]
    assert len(samples) == 3
    # relays count as STUN servers: their mapping is part of the evidence
    assert report.ipv4.mapping is M.ENDPOINT_INDEPENDENT


def test_a_lost_request_is_retransmitted() -> None:
    world = rfc5780_world(FakeNat(EI, APD))
    world.drop_first_to = {SERVER}
    report = check_for(world, [SERVER, PLAIN])
    assert report.ipv4.nat_type is NatType.NAT3
    assert [dest for _, dest, _ in world.sent].count(SERVER) >= 4  # 2 primary + 2 filter tests


def test_a_server_that_refuses_padding_is_asked_without_it() -> None:
    def old_server(data: bytes, source: Address, local: Address, now: float) -> list[stun.Reply]:
        msg = decode(data)
        if msg.find(Padding) is not None:
            attrs: tuple[stun.Attribute, ...] = (
                ErrorCode(420, "Unknown Attribute"),
                UnknownAttributes((stun.PADDING,)),
            )
            return [(encode(Message(Class.ERROR, msg.transaction_id, attrs)), source, local)]
        reply = Message(Class.SUCCESS, msg.transaction_id, (XorMappedAddress(source),))
        return [(encode(reply), source, local)]

    world = World(FakeNat(EI, EI))
    world.servers[PLAIN] = old_server
    report = check_for(world, [PLAIN])
    assert report.ipv4.reflexive == (PUBLIC_IP, 50000)
    sizes = [size for _, dest, size in world.sent if dest == PLAIN]
    assert sizes[0] == stun.DEFAULT_REQUEST_SIZE and sizes[-1] == 28


def test_ipv6_is_checked_beside_ipv4() -> None:
    world = rfc5780_world(FakeNat(EI, APD))
    world.nat6 = FakeNat(None, APD)  # no NAT66, a stateful firewall
    world.responder(StunResponder(primary=SERVER6, other=SERVER6_OTHER))
    info = local_info(ipv6=HOST6[0], interface_v6="eth0")
    report = check_for(world, [SERVER, PLAIN, SERVER6], {"home": RELAY}, info=info)
    assert report.ipv4.nat_type is NatType.NAT3
    v6 = report.ipv6
    assert v6.tested and v6.reachable and v6.open and v6.reflexive == HOST6
    assert v6.nat_type is NatType.OPEN and v6.filtering is F.ADDRESS_AND_PORT_DEPENDENT
    assert v6.hairpinning is None
    assert "IPv6 2001:db8:1::10: no NAT (open)" in report.summary()


def test_a_family_the_socket_cannot_send_is_skipped() -> None:
    world = rfc5780_world(FakeNat(EI, EI))
    info = local_info(ipv6="2001:db8:1::10", families=frozenset({4}))
    report = check_for(world, [SERVER, PLAIN, SERVER6], info=info)
    assert not report.ipv6.tested and report.ipv6.nat_type is NatType.UNKNOWN
    assert all(":" not in dest[0] for _, dest, _ in world.sent)
    assert any("IPv6 servers skipped" in n for n in report.notes)


def test_summary_reads_like_the_issue_asks() -> None:
    world = rfc5780_world(FakeNat(EI, APD))
    report = check_for(world, [SERVER, PLAIN], {"home": RELAY}, hairpin=False)
    assert report.summary().splitlines() == [
        "UDP works. IPv4 203.0.113.7 behind a port-restricted cone NAT (NAT3): reachable by"
        " hole punching from cone NATs; symmetric NATs need the relay.",
        "IPv6: none (no route).",
        "Nearest relay: home 12 ms.",
        "Egress: eth0 10.0.0.2.",
    ]


def test_to_json_is_plain_json() -> None:
    world = rfc5780_world(FakeNat(AD, EI))
    report = check_for(world, [SERVER, PLAIN], {"home": RELAY})
    data = json.loads(json.dumps(report.to_json()))
    assert data["udp"] is True and data["nat_type"] == "NAT4"
    assert data["ipv4"]["mapping"] == "address-dependent"
    assert data["ipv4"]["filtering"] == "endpoint-independent"
    assert data["ipv4"]["reflexive"].startswith(PUBLIC_IP + ":")
    assert data["ipv4"]["interface"] == "eth0" and data["ipv4"]["local"] == PRIVATE[0]
    assert data["relays"] == [{"name": "home", "address": "192.0.2.50:3478", "rtt_ms": 12.0}]
    assert data["nearest_relay"] == "home"
    assert {o["purpose"] for o in data["observations"]} >= {"primary", "map-other-ip-port"}


def test_receive_ignores_what_is_not_ours() -> None:
    check = Netcheck([SERVER], local=local_info(), now=0.0)
    [(request, _)] = check.datagrams_to_send(0.0)
    foreign = encode(Message(Class.SUCCESS, bytes(12), (XorMappedAddress(PRIVATE),)))
    assert not check.receive(foreign, SERVER, 0.01)
    assert not check.receive(b"\x05garbage", SERVER, 0.01)
    reply = encode(
        Message(Class.SUCCESS, decode(request).transaction_id, (XorMappedAddress(PRIVATE),))
    )
    assert check.receive(reply, SERVER, 0.02)
    partial = check.report(0.02)  # before it is done: what is known so far
    assert partial.ipv4.reflexive == PRIVATE and partial.ipv4.open


@pytest.mark.parametrize(
    "reachable, open_, mapping, filtering, expected",
    [
        (False, False, None, None, NatType.BLOCKED),
        (True, True, M.ENDPOINT_INDEPENDENT, None, NatType.OPEN),
        (True, True, M.ENDPOINT_INDEPENDENT, F.ADDRESS_AND_PORT_DEPENDENT, NatType.OPEN),
        (True, False, None, F.ENDPOINT_INDEPENDENT, NatType.UNKNOWN),
        (True, False, M.ENDPOINT_INDEPENDENT, None, NatType.UNKNOWN),
        (True, False, M.ENDPOINT_INDEPENDENT, F.ENDPOINT_INDEPENDENT, NatType.NAT1),
        (True, False, M.ENDPOINT_INDEPENDENT, F.ADDRESS_DEPENDENT, NatType.NAT2),
        (True, False, M.ENDPOINT_INDEPENDENT, F.ADDRESS_AND_PORT_DEPENDENT, NatType.NAT3),
        (True, False, M.ADDRESS_DEPENDENT, None, NatType.NAT4),
        (True, False, M.ADDRESS_AND_PORT_DEPENDENT, F.ENDPOINT_INDEPENDENT, NatType.NAT4),
        (True, False, M.DESTINATION_DEPENDENT, None, NatType.NAT4),
    ],
)
def test_classify_table(
    reachable: bool, open_: bool, mapping: M | None, filtering: F | None, expected: NatType
) -> None:
    assert classify(reachable=reachable, open_=open_, mapping=mapping, filtering=filtering) is (
        expected
    )
