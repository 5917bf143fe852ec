"""The relay core and the relay client, in memory with a fake clock (no sockets)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Hashable

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transport import wire
from transport.relay import (
    HELLO_LEN,
    REGISTER_LEN,
    RelayClient,
    RelayConfig,
    RelayCore,
    RelayErrorReceived,
    RelayEvent,
    RelayLost,
    RelayPong,
    RelayReceived,
    RelayRegistered,
    register_proof,
)
from transport.tickets import PAIRING_TICKET_MAX_LIFETIME, TicketKey
from transport.wire import ANY_CLIENT, RelayErrorCode, RelayType

START = 1000.0
WALL = 1_767_225_600.0  # the wall clock at START
BOX_ADDR = ("203.0.113.7", 41641)
PHONE_ADDR = ("198.51.100.20", 5000)
LAPTOP_ADDR = ("198.51.100.30", 6000)


def static_pair() -> tuple[bytes, bytes]:
    private = X25519PrivateKey.generate()
    raw = private.private_bytes_raw()
    return raw, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class Peer:
    def __init__(self, net: Net, handle: tuple[str, int], *, box: bool) -> None:
        self.net = net
        self.handle = handle
        self.private, self.public = static_pair()
        self.ticket_key = TicketKey.generate() if box else None
        self.client = RelayClient(
            self.private,
            now=net.now,
            ticket_public=self.ticket_key.public_bytes() if self.ticket_key else bytes(32),
        )
        self.id = self.client.peer_id
        self.events: list[RelayEvent] = []
        self.frames: list[bytes] = []  # everything the relay sent to this peer

    def issue(self, client: Peer | bytes, lifetime: float = 3600) -> wire.Ticket:
        assert self.ticket_key is not None
        client_id = client if isinstance(client, bytes) else client.id
        wall = int(self.net.now + self.net.wall_offset)
        return self.ticket_key.issue(self.id, client_id, wall + int(lifetime), now_wall=wall)

    def received(self) -> list[RelayReceived]:
        return [e for e in self.events if isinstance(e, RelayReceived)]

    def errors(self) -> list[RelayErrorReceived]:
        return [e for e in self.events if isinstance(e, RelayErrorReceived)]


class Net:
    """One relay core and the peers talking to it, wired in memory."""

    def __init__(self, config: RelayConfig | None = None) -> None:
        self.now = START
        self.wall_offset = WALL - START
        self.core = RelayCore(config, now=self.now, wall_offset=self.wall_offset)
        self.peers: dict[Hashable, Peer] = {}

    def add(self, handle: tuple[str, int], *, box: bool = False, register: bool = True) -> Peer:
        peer = Peer(self, handle, box=box)
        self.peers[handle] = peer
        if register:
            peer.client.connect(self.now)
            self.pump()
            assert peer.client.registered
        return peer

    def feed(self, frame: bytes, handle: Hashable) -> list[tuple[Hashable, bytes]]:
        """One frame into the relay; what it answers is delivered (and returned)."""
        out = list(self.core.receive(frame, handle, self.now, _observed(handle)))
        for dst, data in out:
            peer = self.peers.get(dst)
            if peer is not None:
                peer.frames.append(data)
                peer.events += peer.client.receive(data, self.now)
        return out

    def pump(self) -> None:
        for _ in range(20):
            moved = False
            for handle, peer in list(self.peers.items()):
                for frame in peer.client.take_outgoing():
                    moved = True
                    self.feed(frame, handle)
            if not moved:
                return
        raise AssertionError("frames kept flowing")

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for peer in self.peers.values():
            peer.events += peer.client.on_timer(self.now)
        self.core.on_timer(self.now)
        self.pump()

    def send(self, src: Peer, dst: Peer | bytes, payload: bytes) -> list[tuple[Hashable, bytes]]:
        dst_id = dst if isinstance(dst, bytes) else dst.id
        return self.feed(bytes([RelayType.SEND]) + dst_id + payload, src.handle)


def _observed(handle: Hashable) -> wire.Address | None:
    if isinstance(handle, tuple) and len(handle) == 2 and isinstance(handle[0], str):
        return (handle[0], handle[1])
    return None


def hello_for(net: Net, handle: Hashable, static_public: bytes) -> wire.Hello:
    request = bytes([RelayType.REGISTER]) + static_public + bytes(64)
    ((dst, frame),) = net.core.receive(request, handle, net.now, _observed(handle))
    assert dst == handle
    hello = wire.decode_relay(frame)
    assert isinstance(hello, wire.Hello)
    return hello


def register_frame(private: bytes, public: bytes, hello: wire.Hello, ticket: bytes = b"") -> bytes:
    ticket = ticket or bytes(32)
    proof = register_proof(private, hello.relay_key, hello.challenge, ticket)
    return wire.encode_relay(wire.Register(public, ticket, hello.challenge, proof))


def decode_error(frame: bytes) -> wire.RelayErrorFrame:
    decoded = wire.decode_relay(frame)
    assert isinstance(decoded, wire.RelayErrorFrame)
    return decoded


# --- registration -------------------------------------------------------------------------------


def test_registration_happy_path_reports_id_and_observed_address() -> None:
    net = Net()
    phone = net.add(PHONE_ADDR)
    registered = [e for e in phone.events if isinstance(e, RelayRegistered)]
    assert registered == [RelayRegistered(wire.peer_id(phone.public), PHONE_ADDR)]
    assert phone.client.observed == PHONE_ADDR
    assert len(phone.frames[0]) == HELLO_LEN
    assert net.core.peer_count == 1
    assert net.core.box_count == 0
    assert net.core.is_registered(PHONE_ADDR)


def test_peer_with_ticket_key_registers_as_box() -> None:
    net = Net()
    net.add(BOX_ADDR, box=True)
    net.add(PHONE_ADDR)
    assert (net.core.peer_count, net.core.box_count) == (2, 1)


def test_bad_proof_is_refused_and_keeps_no_state() -> None:
    net = Net()
    private, public = static_pair()
    hello = hello_for(net, PHONE_ADDR, public)
    other_private, _ = static_pair()
    frame = register_frame(other_private, public, hello)  # proof from the wrong static key
    ((_, answer),) = net.core.receive(frame, PHONE_ADDR, net.now, PHONE_ADDR)
    assert decode_error(answer).code == RelayErrorCode.BAD_PROOF
    assert net.core.peer_count == 0
    assert net.core.stats.drops["bad_proof"] == 1
    good = register_frame(private, public, hello)
    ((_, answer),) = net.core.receive(good, PHONE_ADDR, net.now, PHONE_ADDR)
    assert answer[0] == RelayType.REGISTERED


def test_ticket_key_is_bound_by_the_proof() -> None:
    """Someone on the path cannot swap a box's ticket key for their own."""
    net = Net()
    private, public = static_pair()
    hello = hello_for(net, BOX_ADDR, public)
    honest = register_frame(private, public, hello, TicketKey.generate().public_bytes())
    swapped = honest[:33] + TicketKey.generate().public_bytes() + honest[65:]
    ((_, answer),) = net.core.receive(swapped, BOX_ADDR, net.now, BOX_ADDR)
    assert decode_error(answer).code == RelayErrorCode.BAD_PROOF


def test_challenge_is_stateless_and_bound_to_the_source() -> None:
    net = Net()
    private, public = static_pair()
    for port in range(1000, 1100):  # a flood of spoofed sources asking for HELLO
        hello_for(net, ("192.0.2.1", port), public)
    assert net.core.peer_count == 0 and not net.core.is_registered(("192.0.2.1", 1000))
    hello = hello_for(net, PHONE_ADDR, public)
    frame = register_frame(private, public, hello)
    spoofed = ("192.0.2.66", 5000)
    ((dst, answer),) = net.core.receive(frame, spoofed, net.now, spoofed)
    assert (dst, answer[0]) == (spoofed, RelayType.HELLO)  # a fresh challenge, not a peer
    assert len(answer) < len(frame)
    assert net.core.peer_count == 0
    assert net.core.stats.drops["stale_challenge"] == 1
    # The same challenge from the source it was issued to is fine.
    ((_, answer),) = net.core.receive(frame, PHONE_ADDR, net.now, PHONE_ADDR)
    assert answer[0] == RelayType.REGISTERED


def test_challenge_from_the_previous_epoch_works_and_older_expires() -> None:
    config = RelayConfig(rotation=60)
    net = Net(config)
    private, public = static_pair()
    hello = hello_for(net, PHONE_ADDR, public)
    frame = register_frame(private, public, hello)
    net.now += 60  # next epoch: still accepted, with that epoch's relay key
    ((_, answer),) = net.core.receive(frame, PHONE_ADDR, net.now, PHONE_ADDR)
    assert answer[0] == RelayType.REGISTERED

    net2 = Net(config)
    hello = hello_for(net2, PHONE_ADDR, public)
    frame = register_frame(private, public, hello)
    net2.now += 120  # two rotations later: expired
    ((_, answer),) = net2.core.receive(frame, PHONE_ADDR, net2.now, PHONE_ADDR)
    assert answer[0] == RelayType.HELLO
    fresh = wire.decode_relay(answer)
    assert isinstance(fresh, wire.Hello)
    assert fresh.relay_key != hello.relay_key  # the ephemeral key rotated too
    assert net2.core.peer_count == 0


def test_low_order_static_key_is_a_bad_proof_not_a_crash() -> None:
    net = Net()
    zero = bytes(32)  # X25519 with the zero point yields an all-zero secret
    hello = hello_for(net, PHONE_ADDR, zero)
    frame = wire.encode_relay(wire.Register(zero, bytes(32), hello.challenge, bytes(16)))
    ((_, answer),) = net.core.receive(frame, PHONE_ADDR, net.now, PHONE_ADDR)
    assert decode_error(answer).code == RelayErrorCode.BAD_PROOF


def test_unregistered_small_frames_get_a_small_error_not_a_hello() -> None:
    net = Net()
    ping = wire.encode_relay(wire.Ping(b"12345678"))
    ((_, answer),) = net.core.receive(ping, PHONE_ADDR, net.now, PHONE_ADDR)
    assert len(answer) <= len(ping)
    assert decode_error(answer).code == RelayErrorCode.NOT_REGISTERED
    assert net.core.receive(b"\x27", PHONE_ADDR, net.now, PHONE_ADDR) == ()
    big = bytes([RelayType.SEND]) + bytes(16) + bytes(100)
    ((_, answer),) = net.core.receive(big, PHONE_ADDR, net.now, PHONE_ADDR)
    assert answer[0] == RelayType.HELLO


def test_relay_never_answers_what_looks_like_a_relay_answer() -> None:
    net = Net()
    for frame in (
        bytes([RelayType.HELLO]) + bytes(48),
        bytes([RelayType.ERROR, 2]) + b"register first" * 4,
        bytes([RelayType.RECV]) + bytes(100),
        bytes([RelayType.PONG]) + bytes(8),
    ):
        assert net.core.receive(frame, PHONE_ADDR, net.now, PHONE_ADDR) == ()


def test_tunnel_and_junk_datagrams_are_dropped_silently() -> None:
    net = Net()
    for frame in (b"\x05" + bytes(60), b"\xff" * 80, b""):
        assert net.core.receive(frame, PHONE_ADDR, net.now, PHONE_ADDR) == ()


# --- tickets and forwarding ---------------------------------------------------------------------


def test_client_needs_a_ticket_to_reach_a_box() -> None:
    net = Net()
    box = net.add(BOX_ADDR, box=True)
    phone = net.add(PHONE_ADDR)
    out = net.send(phone, box, b"hello box")
    assert [dst for dst, _ in out] == [PHONE_ADDR]
    assert phone.errors()[-1].code == RelayErrorCode.NO_TICKET
    assert box.received() == []


def test_valid_ticket_lets_the_client_reach_the_box_and_the_box_reply() -> None:
    net = Net()
    box = net.add(BOX_ADDR, box=True)
    phone = net.add(PHONE_ADDR)
    phone.client.add_ticket(box.issue(phone))
    net.pump()
    assert phone.errors() == []
    net.send(phone, box, b"handshake init")
    assert box.received() == [RelayReceived(phone.id, b"handshake init")]
    net.send(box, phone, b"handshake resp")
    assert phone.received() == [RelayReceived(box.id, b"handshake resp")]
    assert net.core.stats.forwarded == 2


def test_forwarded_frame_is_exactly_as_large_as_the_send() -> None:
    net = Net()
    box = net.add(BOX_ADDR, box=True)
    phone = net.add(PHONE_ADDR)
    phone.client.add_ticket(box.issue(phone))
    net.pump()
    send = bytes([RelayType.SEND]) + box.id + os.urandom(1400)
    ((dst, frame),) = net.feed(send, PHONE_ADDR)
    assert dst == BOX_ADDR
    assert frame == bytes([RelayType.RECV]) + phone.id + send[17:]


def test_box_cannot_send_to_a_client_that_showed_no_ticket() -> None:
    net = Net()
    box = net.add(BOX_ADDR, box=True)
    phone = net.add(PHONE_ADDR)
    laptop = net.add(LAPTOP_ADDR)
    phone.client.add_ticket(box.issue(phone))
    net.pump()
    net.send(box, laptop, b"unsolicited")
    assert laptop.received() == []
    assert box.errors()[-1].code == RelayErrorCode.NO_TICKET
    net.send(box, phone, b"fine")
    assert phone.received() == [RelayReceived(box.id, b"fine")]


def test_clients_cannot_talk_to_each_other() -> None:
    net = Net()
    phone = net.add(PHONE_ADDR)
    laptop = net.add(LAPTOP_ADDR)
    net.send(phone, laptop, b"hi")
    assert laptop.received() == []
    assert phone.errors()[-1].code == RelayErrorCode.NO_TICKET


def test_expired_ticket_stops_forwarding() -> None:
    net = Net(RelayConfig(idle_timeout=10_000))
    box = net.add(BOX_ADDR, box=True)
    phone = net.add(PHONE_ADDR)
    phone.client.add_ticket(box.issue(phone, lifetime=100))
    net.pump()
    net.send(phone, box, b"one")
    net.now += 101
    net.send(phone, box, b"two")
    net.send(box, phone, b"three")
    assert box.received() == [RelayReceived(phone.id, b"one")]
    assert phone.received() == []
    assert phone.errors()[-1] == RelayErrorReceived(RelayErrorCode.NO_TICKET, "ticket expired")


def test_ticket_for_another_box_does_not_open_this_one() -> None:
    net = Net()
    box = net.add(BOX_ADDR, box=True)
    other_box = net.add(("203.0.113.8", 41641), box=True)
    phone = net.add(PHONE_ADDR)
    phone.client.add_ticket(other_box.issue(phone))
    net.pump()
    net.send(phone, box, b"x")
    assert box.received() == []
    assert phone.errors()[-1].code == RelayErrorCode.NO_TICKET


def test_ticket_naming_a_box_but_signed_by_another_key_is_refused() -> None:
    net = Net()
    box = net.add(BOX_ADDR, box=True)
    phone = net.add(PHONE_ADDR)
    wall = int(WALL)
    forged = TicketKey.generate().issue(box.id, phone.id, wall + 60, now_wall=wall)
    phone.client.add_ticket(forged)
    net.pump()
    assert phone.errors()[-1] == RelayErrorReceived(RelayErrorCode.BAD_TICKET, "bad signature")
    net.send(phone, box, b"x")
    assert box.received() == []


def test_ticket_naming_another_client_is_refused() -> None:
    net = Net()
    box = net.add(BOX_ADDR, box=True)
    phone = net.add(PHONE_ADDR)
    laptop = net.add(LAPTOP_ADDR)
    laptop.client.add_ticket(box.issue(phone))  # phone's ticket, shown by laptop
    net.pump()
    assert laptop.errors()[-1].code == RelayErrorCode.BAD_TICKET
    net.send(laptop, box, b"x")
    assert box.received() == []


def test_pairing_ticket_admits_any_client() -> None:
    net = Net()
    box = net.add(BOX_ADDR, box=True)
    newcomer = net.add(PHONE_ADDR)
    newcomer.client.add_ticket(box.issue(ANY_CLIENT, lifetime=PAIRING_TICKET_MAX_LIFETIME))
    net.pump()
    net.send(newcomer, box, b"pair me")
    net.send(box, newcomer, b"pending")
    assert box.received() == [RelayReceived(newcomer.id, b"pair me")]
    assert newcomer.received() == [RelayReceived(box.id, b"pending")]


def test_ticket_shown_before_the_box_arrives_is_checked_on_first_use() -> None:
    net = Net()
    phone = net.add(PHONE_ADDR)
    box = net.add(BOX_ADDR, box=True, register=False)
    phone.client.add_ticket(box.issue(phone))
    net.pump()
    assert phone.errors() == []  # kept, unverified: the box is not here yet
    box.client.connect(net.now)
    net.pump()
    net.send(phone, box, b"late")
    assert box.received() == [RelayReceived(phone.id, b"late")]


def test_forged_ticket_shown_before_the_box_arrives_fails_on_first_use() -> None:
    net = Net()
    phone = net.add(PHONE_ADDR)
    box = net.add(BOX_ADDR, box=True, register=False)
    wall = int(WALL)
    phone.client.add_ticket(TicketKey.generate().issue(box.id, phone.id, wall + 60, now_wall=wall))
    net.pump()
    box.client.connect(net.now)
    net.pump()
    net.send(phone, box, b"forged")
    net.send(box, phone, b"nor back")
    assert box.received() == [] and phone.received() == []
    assert phone.errors()[-1] == RelayErrorReceived(RelayErrorCode.NO_TICKET, "bad signature")


def test_box_rotating_its_ticket_key_voids_old_tickets() -> None:
    net = Net()
    box = net.add(BOX_ADDR, box=True)
    phone = net.add(PHONE_ADDR)
    phone.client.add_ticket(box.issue(phone))
    net.pump()
    net.send(phone, box, b"before")
    # The box registers again with a new ticket key (same static key, same address).
    box.ticket_key = TicketKey.generate()
    hello = hello_for(net, BOX_ADDR, box.public)
    net.feed(
        register_frame(box.private, box.public, hello, box.ticket_key.public_bytes()), BOX_ADDR
    )
    net.send(phone, box, b"after")
    assert box.received() == [RelayReceived(phone.id, b"before")]
    assert phone.errors()[-1] == RelayErrorReceived(RelayErrorCode.NO_TICKET, "bad signature")
    phone.client.add_ticket(box.issue(phone))
    net.pump()
    net.send(phone, box, b"renewed")
    assert box.received()[-1] == RelayReceived(phone.id, b"renewed")


def test_lost_ticket_frame_is_presented_again_after_no_ticket() -> None:
    net = Net()
    box = net.add(BOX_ADDR, box=True)
    phone = net.add(PHONE_ADDR)
    phone.client.add_ticket(box.issue(phone))
    phone.client.take_outgoing()  # the TICKET frame is lost on the way
    net.now += 2
    net.send(phone, box, b"first")  # NO_TICKET, and the client presents its tickets again
    net.pump()
    net.send(phone, box, b"second")
    assert box.received() == [RelayReceived(phone.id, b"second")]


def test_unknown_destination_gets_a_small_unknown_peer_error() -> None:
    net = Net()
    net.add(PHONE_ADDR)
    send = bytes([RelayType.SEND]) + bytes(16) + b"x"
    ((dst, answer),) = net.feed(send, PHONE_ADDR)
    assert dst == PHONE_ADDR
    assert len(answer) <= len(send)
    assert decode_error(answer).code == RelayErrorCode.UNKNOWN_PEER


def test_errors_are_rate_limited_per_peer() -> None:
    net = Net(RelayConfig(peer_errors_per_s=1, peer_errors_burst=3))
    phone = net.add(PHONE_ADDR)
    answers = [net.send(phone, bytes(16), b"x" * 40) for _ in range(10)]
    assert sum(1 for a in answers if a) == 3
    net.now += 1
    assert net.send(phone, bytes(16), b"x" * 40)


# --- limits -------------------------------------------------------------------------------------


def _pair(net: Net) -> tuple[Peer, Peer]:
    box = net.add(BOX_ADDR, box=True)
    phone = net.add(PHONE_ADDR)
    phone.client.add_ticket(box.issue(phone))
    net.pump()
    return box, phone


def test_byte_rate_limit_drops_beyond_the_burst_and_refills() -> None:
    config = RelayConfig(peer_bytes_per_s=10_000, peer_bytes_burst=10_000)
    net = Net(config)
    box, phone = _pair(net)
    payload = bytes(983)  # 1,000-byte frames
    for _ in range(20):
        net.send(phone, box, payload)
    delivered = len(box.received())
    assert 8 <= delivered <= 10  # registration and the ticket spent a few hundred bytes
    assert net.core.stats.drops["rate_limited"] == 20 - delivered
    assert phone.errors()[0].code == RelayErrorCode.RATE_LIMITED
    net.now += 0.5  # 5,000 bytes of refill
    for _ in range(10):
        net.send(phone, box, payload)
    assert len(box.received()) - delivered == 5


def test_packet_rate_limit_drops_beyond_the_burst() -> None:
    config = RelayConfig(peer_packets_per_s=100, peer_packets_burst=50)
    net = Net(config)
    box, phone = _pair(net)
    for _ in range(100):
        net.send(phone, box, b"p")
    delivered = len(box.received())
    assert 45 <= delivered <= 50
    net.now += 0.1  # 10 packets of refill
    for _ in range(20):
        net.send(phone, box, b"p")
    assert len(box.received()) - delivered == 10


def test_rate_limit_applies_to_the_sender_not_the_receiver() -> None:
    config = RelayConfig(peer_packets_per_s=1, peer_packets_burst=20)
    net = Net(config)
    box, phone = _pair(net)
    laptop = net.add(LAPTOP_ADDR)
    laptop.client.add_ticket(box.issue(laptop))
    net.pump()
    for _ in range(30):
        net.send(phone, box, b"p")
    net.send(laptop, box, b"l")
    assert box.received()[-1] == RelayReceived(laptop.id, b"l")


def test_oversized_frame_is_dropped() -> None:
    net = Net(RelayConfig(max_frame=1500))
    box, phone = _pair(net)
    assert net.send(phone, box, bytes(1500)) == []
    assert net.core.stats.drops["too_large"] == 1
    net.send(phone, box, bytes(1400))
    assert len(box.received()) == 1


def test_max_peers_refuses_newcomers_but_not_returning_peers() -> None:
    net = Net(RelayConfig(max_peers=2))
    box = net.add(BOX_ADDR, box=True)
    net.add(PHONE_ADDR)
    laptop = net.add(LAPTOP_ADDR, register=False)
    laptop.client.connect(net.now)
    net.pump()
    assert not laptop.client.registered
    assert laptop.errors()[-1].code == RelayErrorCode.FULL
    assert net.core.stats.drops["full"] >= 1
    # A registered peer may still register again (e.g. after moving).
    box.client.connect(net.now)
    net.pump()
    assert box.client.registered and net.core.peer_count == 2


def test_accept_rate_limits_new_registrations() -> None:
    net = Net(RelayConfig(accept_per_s=1, accept_burst=3))
    peers = [net.add(("192.0.2.10", 1000 + i), register=False) for i in range(5)]
    for peer in peers:
        peer.client.connect(net.now)
    net.pump()
    assert sum(p.client.registered for p in peers) == 3
    assert net.core.stats.drops["accept_rate"] == 2
    assert any(e.code == RelayErrorCode.RATE_LIMITED for p in peers for e in p.errors())
    net.advance(2.5)  # the clients retry by themselves; the bucket refilled two tokens
    assert sum(p.client.registered for p in peers) == 5


def test_admit_connection_uses_the_accept_rate() -> None:
    net = Net(RelayConfig(accept_per_s=10, accept_burst=2))
    assert net.core.admit_connection(net.now)
    assert net.core.admit_connection(net.now)
    assert not net.core.admit_connection(net.now)
    assert net.core.admit_connection(net.now + 0.1)


# --- roaming, expiry, keepalive -----------------------------------------------------------------


def test_roaming_peer_registers_again_from_its_new_address() -> None:
    net = Net()
    box, phone = _pair(net)
    new_addr = ("198.51.100.99", 7777)
    # The phone's NAT rebinds: its frames now come from a new address the relay does not know.
    del net.peers[PHONE_ADDR]
    phone.handle = new_addr
    net.peers[new_addr] = phone
    net.send(phone, box, bytes(60))  # unknown source: answered with a HELLO
    net.pump()
    assert phone.client.registered and phone.client.observed == new_addr
    assert any(isinstance(e, RelayLost) for e in phone.events)
    assert net.core.evicted == [PHONE_ADDR]
    assert not net.core.is_registered(PHONE_ADDR)
    assert net.core.peer_count == 2
    net.send(box, phone, b"to the new address")
    assert phone.received()[-1] == RelayReceived(box.id, b"to the new address")
    net.send(phone, box, b"tickets survive roaming")
    assert box.received()[-1] == RelayReceived(phone.id, b"tickets survive roaming")


def test_idle_peers_expire_and_pinging_peers_stay() -> None:
    net = Net(RelayConfig(idle_timeout=60))
    net.add(BOX_ADDR, box=True)  # its client pings every 20 s
    silent = net.add(PHONE_ADDR)
    silent.client.state = "idle"  # this one stops talking (its timers stop)
    for _ in range(8):
        net.advance(10)
    assert net.core.is_registered(BOX_ADDR)
    assert not net.core.is_registered(PHONE_ADDR)
    assert net.core.stats.expired == 1
    assert PHONE_ADDR in net.core.evicted


def test_ping_gets_a_pong_of_the_same_size_and_an_rtt() -> None:
    net = Net()
    phone = net.add(PHONE_ADDR)
    phone.client.ping(net.now)
    frame = phone.client.take_outgoing()[0]
    net.now += 0.025
    ((_, answer),) = net.feed(frame, PHONE_ADDR)
    assert len(answer) == len(frame) and answer[0] == RelayType.PONG
    pong = phone.events[-1]
    assert isinstance(pong, RelayPong) and pong.rtt == pytest.approx(0.025)
    assert phone.client.rtt == pytest.approx(0.025)


def test_client_registers_again_after_a_relay_restart() -> None:
    net = Net()
    box, phone = _pair(net)
    net.core = RelayCore(now=net.now, wall_offset=net.wall_offset)  # restarted: knows nobody
    net.send(phone, box, bytes(60))  # answered with HELLO: the phone registers again
    net.pump()
    assert phone.client.registered
    box.client.ping(net.now)  # a 9-byte PING gets NOT_REGISTERED: the box registers again
    net.pump()
    assert box.client.registered
    assert net.core.peer_count == 2
    net.send(phone, box, b"after restart")  # the phone's ticket was presented again
    assert box.received()[-1] == RelayReceived(phone.id, b"after restart")


def test_client_notices_a_silent_relay_and_starts_over() -> None:
    net = Net()
    phone = net.add(PHONE_ADDR)
    del net.peers[PHONE_ADDR]  # the relay's answers no longer arrive
    lost = []
    for _ in range(10):
        net.now += 10
        lost += [e for e in phone.client.on_timer(net.now) if isinstance(e, RelayLost)]
    assert lost == [RelayLost("no answer from the relay")]
    assert phone.client.state == "hello"


def test_client_retries_registration_with_backoff() -> None:
    net = Net()
    phone = Peer(net, PHONE_ADDR, box=False)
    phone.client.connect(net.now)
    sent_at = []
    now = net.now
    while now < net.now + 30:
        for _ in phone.client.take_outgoing():
            sent_at.append(now)
        timer = phone.client.next_timer()
        assert timer is not None
        now = timer
        phone.client.on_timer(now)
    gaps = [b - a for a, b in itertools.pairwise(sent_at)]
    assert gaps[:5] == [0.5, 1.0, 2.0, 4.0, 8.0] and max(gaps) == 8.0


# --- STUN on the same port ----------------------------------------------------------------------


def _binding_request() -> bytes:
    # RFC 8489 sec. 5: type 0x0001, length 0, magic cookie, 96-bit transaction id.
    return b"\x00\x01\x00\x00" + wire.STUN_MAGIC_COOKIE.to_bytes(4, "big") + bytes(range(12))


def test_stun_datagrams_go_to_the_stun_handler() -> None:
    seen: list[tuple[bytes, wire.Address]] = []

    def stun(data: bytes, source: wire.Address, now: float) -> bytes | None:
        seen.append((data, source))
        return b"\x01\x01" + data[2:]

    core = RelayCore(now=START, stun_handler=stun)
    request = _binding_request()
    out = core.receive(request, (0, PHONE_ADDR), START, PHONE_ADDR)
    assert out == (((0, PHONE_ADDR), b"\x01\x01" + request[2:]),)
    assert seen == [(request, PHONE_ADDR)]
    assert core.stats.stun == 1


def test_stun_answer_larger_than_the_request_is_not_sent() -> None:
    core = RelayCore(now=START, stun_handler=lambda data, source, now: data + bytes(12))
    assert core.receive(_binding_request(), PHONE_ADDR, START, PHONE_ADDR) == ()
    assert core.stats.drops["stun_answer_too_large"] == 1


# --- properties ---------------------------------------------------------------------------------

_frames = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda k, b: bytes([k]) + b, st.integers(0x20, 0x28), st.binary(max_size=140)),
    st.builds(lambda b: bytes([RelayType.REGISTER]) + b, st.binary(min_size=96, max_size=96)),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([0, 1, 2]), _frames, st.floats(0, 5)), max_size=20))
def test_arbitrary_bytes_never_raise_and_no_answer_outgrows_its_trigger(
    script: list[tuple[int, bytes, float]],
) -> None:
    net = Net()
    _pair(net)
    handles = [BOX_ADDR, PHONE_ADDR, ("192.0.2.1", 9)]
    for who, frame, later in script:
        net.now += later
        out = net.core.receive(frame, handles[who], net.now, handles[who])
        for _, answer in out:
            assert len(answer) <= len(frame)
        net.core.on_timer(net.now)


@settings(max_examples=200)
@given(st.binary(max_size=120))
def test_relay_client_never_raises(data: bytes) -> None:
    client = RelayClient(static_pair()[0], now=START)
    client.connect(START)
    assert isinstance(client.receive(data, START), list)
    assert isinstance(client.receive(bytes([RelayType.HELLO]) + data[:48].ljust(48), START), list)


def test_register_frame_sizes_match_the_wire() -> None:
    client = RelayClient(static_pair()[0], now=START)
    client.connect(START)
    (request,) = client.take_outgoing()
    assert len(request) == REGISTER_LEN
    assert isinstance(wire.decode_relay(request), wire.Register)
