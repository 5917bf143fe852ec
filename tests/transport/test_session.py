"""Tunnel sessions in memory with a fake clock: handshakes, transport, timers, roaming, attacks."""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from collections.abc import Iterable
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from noise.connection import Keypair as NoiseKeypair
from noise.connection import NoiseConnection

from transport import wire
from transport.session import (
    KEEPALIVE_TIMEOUT,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER,
    CookieRequired,
    Datagram,
    Endpoint,
    EndpointChanged,
    Event,
    FrameReceived,
    HandshakeCompleted,
    HandshakeFailed,
    Keys,
    PairingRequested,
    Session,
    SessionClosed,
    SessionError,
    _split,
    mac1_key,
    tai64n,
)

VECTORS = Path(__file__).parent / "vectors" / "noise_vectors.json"
BOX_ADDR = ("203.0.113.10", 51820)
CLIENT_ADDR = ("198.51.100.20", 40000)
ROAMED_ADDR = ("198.51.100.77", 50123)
ATTACKER_ADDR = ("192.0.2.66", 6666)
SECRET = bytes(range(16))
FACTS = {"name": "Ada's phone", "os": "Android 15", "model": "Pixel 9", "version": "0.1.0"}
WALL0 = 1_767_225_600.0


class World:
    """A box and a client endpoint, a fake clock, and a wire between them we control."""

    def __init__(self, *, allowed: bool = True, **box_options: Any) -> None:
        self.box_keys = Keys.generate()
        self.client_keys = Keys.generate()
        self.allowed: set[bytes] = {self.client_keys.public} if allowed else set()
        self.box = Endpoint(
            self.box_keys,
            is_allowed=self.allowed.__contains__,
            allow_pairing=True,
            rng=random.Random(1),
            **box_options,
        )
        self.client = Endpoint(self.client_keys, rng=random.Random(2))
        self.now = 1000.0
        self.client_addr = CLIENT_ADDR
        self.box_events: list[Event] = []
        self.client_events: list[Event] = []

    @property
    def wall(self) -> float:
        return WALL0 + self.now

    def to_box(self, data: bytes, source: wire.Address | None = None) -> list[Event]:
        events = self.box.receive(data, source or self.client_addr, self.now, self.wall)
        self.box_events += events
        return events

    def to_client(self, data: bytes) -> list[Event]:
        events = self.client.receive(data, BOX_ADDR, self.now, self.wall)
        self.client_events += events
        return events

    def pump(self, rounds: int = 6) -> None:
        """Deliver every queued datagram both ways until the wire is quiet."""
        for _ in range(rounds):
            from_box = self.box.datagrams_to_send()
            from_client = self.client.datagrams_to_send()
            if not from_box and not from_client:
                return
            for datagram in from_client:
                self.to_box(datagram.data)
            for datagram in from_box:
                self.to_client(datagram.data)

    def advance(self, seconds: float, *, deliver: bool = True) -> None:
        """Move the clock, running both endpoints' timers at each deadline on the way."""
        end = self.now + seconds
        for _ in range(100_000):
            deadlines = [d for d in (self.box.next_timer(), self.client.next_timer()) if d]
            step = min([d for d in deadlines if d <= end], default=None)
            if step is None:
                break
            self.now = max(self.now, step)
            self.box_events += self.box.handle_timer(self.now, self.wall)
            self.client_events += self.client.handle_timer(self.now, self.wall)
            if deliver:
                self.pump()
            else:
                self.box.datagrams_to_send()
                self.client.datagrams_to_send()
        else:
            raise AssertionError("timers never settled")
        self.now = end

    def connect(self) -> tuple[Session, Session]:
        session = self.client.connect(self.box_keys.public)
        self.to_box(session.initiate(self.now, self.wall))
        self.pump()
        box_session = self.box.session(self.client_keys.public)
        assert box_session is not None
        return session, box_session


def of_type(events: Iterable[object], kind: type) -> list[Any]:
    return [event for event in events if isinstance(event, kind)]


def frames(events: Iterable[object]) -> list[wire.InnerFrame]:
    return [event.frame for event in of_type(events, FrameReceived)]


# --- handshakes -----------------------------------------------------------------------------


def test_ik_handshake_then_data_both_ways() -> None:
    world = World()
    client_session, box_session = world.connect()
    assert of_type(world.client_events, HandshakeCompleted)[0].pattern is wire.Pattern.IK
    completed = of_type(world.box_events, HandshakeCompleted)
    assert [e.peer_key for e in completed] == [world.client_keys.public]
    assert box_session.address == CLIENT_ADDR
    assert client_session.address == BOX_ADDR

    up = client_session.send(wire.Packet(b"\x60" + bytes(39)), world.now)
    assert up is not None and up[0] == wire.MessageType.TRANSPORT
    assert frames(world.to_box(up)) == [wire.Packet(b"\x60" + bytes(39))]
    down = box_session.send_packet(b"\x45" + bytes(19), world.now)
    assert down is not None
    assert frames(world.to_client(down)) == [wire.Packet(b"\x45" + bytes(19))]
    probe = wire.Probe(b"12345678")
    sent = box_session.send(probe, world.now)
    assert sent is not None and frames(world.to_client(sent)) == [probe]


def test_transport_bytes_follow_the_wire_contract() -> None:
    """Header = wire.transport_header, nonce = wire.aead_nonce, keys = Noise's split."""
    world = World()
    client_session, _ = world.connect()
    sent = [client_session.send(wire.Control(1, b"{}"), world.now) for _ in range(3)]
    data = sent[-1]
    assert data is not None
    message = wire.decode_tunnel(data)
    assert isinstance(message, wire.Transport)
    assert data[:14] == wire.transport_header(message.receiver, message.counter)
    assert message.counter == 3  # 0 was the confirming keepalive
    keys = client_session._current
    assert keys is not None
    opened = keys.sealer.decrypt(wire.aead_nonce(3), message.ciphertext, data[:14])
    assert wire.decode_inner(opened) == wire.Control(1, b"{}")


def test_unknown_key_gets_no_answer_at_all() -> None:
    world = World(allowed=False)
    session = world.client.connect(world.box_keys.public)
    events = world.to_box(session.initiate(world.now, world.wall))
    assert world.box.datagrams_to_send() == []
    [failed] = of_type(events, HandshakeFailed)
    assert failed.peer_key == world.client_keys.public and failed.reason == "key not allowed"
    assert world.box.sessions() == []


def test_client_endpoint_answers_no_initiations() -> None:
    world = World()
    stranger = Endpoint(Keys.generate())
    session = stranger.connect(world.client_keys.public)
    assert world.to_client(session.initiate(world.now, world.wall)) == []
    assert world.client.datagrams_to_send() == []


def test_replayed_ik_initiation_is_ignored() -> None:
    world = World()
    session = world.client.connect(world.box_keys.public)
    first = session.initiate(world.now, world.wall)
    world.to_box(first)
    assert len(world.box.datagrams_to_send()) == 1
    world.now += 30
    events = world.to_box(first)  # an attacker replays the captured message 1
    assert world.box.datagrams_to_send() == []
    assert [e.reason for e in of_type(events, HandshakeFailed)] == ["replayed or stale initiation"]


def test_older_ik_initiation_is_ignored_after_a_newer_one() -> None:
    world = World()
    session = world.client.connect(world.box_keys.public)
    older = session.initiate(world.now, world.wall)
    world.now += 1
    newer = session.initiate(world.now, world.wall)
    world.to_box(newer)
    world.box.datagrams_to_send()
    events = world.to_box(older)
    assert world.box.datagrams_to_send() == []
    assert of_type(events, HandshakeFailed)


def test_tai64n_labels() -> None:
    assert tai64n(0.0) == bytes.fromhex("400000000000000a00000000")
    assert tai64n(1.5)[:8] == (0x400000000000000A + 1).to_bytes(8, "big")
    assert tai64n(1.5)[8:] == (500_000_000 & ~0xFFFFFF).to_bytes(4, "big")
    assert tai64n(WALL0) < tai64n(WALL0 + 0.02) < tai64n(WALL0 + 1)


def test_bad_mac1_is_dropped_silently() -> None:
    world = World()
    session = world.client.connect(world.box_keys.public)
    message = bytearray(session.initiate(world.now, world.wall))
    for position in (len(message) - 20, 10):  # in mac1; in the Noise message mac1 covers
        spoiled = bytearray(message)
        spoiled[position] ^= 1
        assert world.to_box(bytes(spoiled)) == []
    assert world.box.datagrams_to_send() == []
    assert world.box.stats["bad_mac1"] == 2
    world.to_box(bytes(message))
    assert len(world.box.datagrams_to_send()) == 1  # the genuine one still works


def test_initiation_to_the_wrong_box_fails_mac1() -> None:
    world = World()
    other_box = Keys.generate()
    session = world.client.connect(other_box.public)
    assert world.to_box(session.initiate(world.now, world.wall)) == []
    assert world.box.datagrams_to_send() == []
    assert world.box.stats["bad_mac1"] == 1


def test_cookie_reply_under_load_then_success_with_mac2() -> None:
    world = World()
    world.box.under_load = True
    session = world.client.connect(world.box_keys.public)
    initiation = session.initiate(world.now, world.wall)
    assert initiation[-16:] == bytes(16)  # no cookie yet: mac2 is zero
    assert world.to_box(initiation) == []
    [reply] = world.box.datagrams_to_send()
    assert reply.data[0] == wire.MessageType.COOKIE_REPLY and len(reply.data) == 50
    assert reply.destination == CLIENT_ADDR
    assert world.box.sessions() == []  # no Diffie-Hellman was spent
    events = world.to_client(reply.data)
    assert of_type(events, CookieRequired)
    [retry] = world.client.datagrams_to_send()
    assert retry.data[:-16] == initiation[:-16] and retry.data[-16:] != bytes(16)
    world.to_box(retry.data)
    world.pump()
    assert of_type(world.client_events, HandshakeCompleted)
    assert of_type(world.box_events, HandshakeCompleted)
    # A second cookie reply for the same initiation is not honoured (no resend loop).
    assert world.to_client(reply.data) == []


def test_cookie_is_reused_for_the_next_initiation() -> None:
    world = World()
    world.box.under_load = True
    session = world.client.connect(world.box_keys.public)
    world.to_box(session.initiate(world.now, world.wall))
    world.pump()
    assert of_type(world.client_events, HandshakeCompleted)
    world.now += 3
    again = session.initiate(world.now, world.wall)
    assert again[-16:] != bytes(16)
    world.to_box(again)
    assert world.box.datagrams_to_send()[0].data[0] == wire.MessageType.HANDSHAKE_RESP


def test_cookie_from_one_address_does_not_serve_another() -> None:
    world = World()
    world.box.under_load = True
    session = world.client.connect(world.box_keys.public)
    world.to_box(session.initiate(world.now, world.wall))
    world.pump()
    world.now += 1
    again = session.initiate(world.now, world.wall)
    world.to_box(again, ROAMED_ADDR)  # the cookie was for CLIENT_ADDR
    [reply] = world.box.datagrams_to_send()
    assert reply.data[0] == wire.MessageType.COOKIE_REPLY


def test_load_threshold_turns_cookies_on() -> None:
    world = World(load_threshold=3)
    clients = [Endpoint(Keys.generate()) for _ in range(5)]
    answers = []
    for number, client in enumerate(clients):
        world.allowed.add(client.keys.public)
        session = client.connect(world.box_keys.public)
        source = ("198.51.100." + str(number + 1), 1000)
        world.box.receive(session.initiate(world.now, world.wall), source, world.now)
        answers += [d.data[0] for d in world.box.datagrams_to_send()]
    resp, cookie = wire.MessageType.HANDSHAKE_RESP, wire.MessageType.COOKIE_REPLY
    assert answers == [resp, resp, resp, cookie, cookie]
    world.now += 2.5  # a quiet second later the box is no longer under load
    session = clients[4].connect(world.box_keys.public)
    world.box.receive(session.initiate(world.now, world.wall), ("198.51.100.9", 1), world.now)
    assert [d.data[0] for d in world.box.datagrams_to_send()] == [resp]


def test_handshake_rate_limit_per_source() -> None:
    world = World(handshake_rate=1.0, handshake_burst=2.0)
    session = world.client.connect(world.box_keys.public)
    answered = []
    for _ in range(4):
        world.now += 0.05
        world.to_box(session.initiate(world.now, world.wall))
        answered.append(len(world.box.datagrams_to_send()))
    assert answered == [1, 1, 0, 0]
    assert world.box.stats["rate_limited"] == 2
    # Another host is not affected; the same /64 in IPv6 would be.
    world.now += 0.05
    world.to_box(session.initiate(world.now, world.wall), ROAMED_ADDR)
    assert len(world.box.datagrams_to_send()) == 1
    world.now += 1.0  # one token back
    world.to_box(session.initiate(world.now, world.wall))
    assert len(world.box.datagrams_to_send()) == 1


def test_ipv6_rate_limit_covers_the_whole_64() -> None:
    world = World(handshake_rate=1.0, handshake_burst=1.0)
    session = world.client.connect(world.box_keys.public)
    world.to_box(session.initiate(world.now, world.wall), ("2001:db8:1:2::1", 1))
    world.now += 0.1
    world.to_box(session.initiate(world.now, world.wall), ("2001:db8:1:2::ffff", 2))
    world.now += 0.1
    world.to_box(session.initiate(world.now, world.wall), ("2001:db8:1:3::1", 3))
    assert len(world.box.datagrams_to_send()) == 2


# --- pairing (XK) ----------------------------------------------------------------------------


def pair(world: World) -> tuple[Session, Session]:
    session = world.client.pair(world.box_keys.public, SECRET, FACTS)
    world.to_box(session.initiate(world.now, world.wall))
    world.pump()
    box_session = world.box.session(world.client_keys.public, wire.Pattern.XK)
    assert box_session is not None
    return session, box_session


def test_xk_pairing_hands_up_secret_and_facts() -> None:
    world = World(allowed=False)  # an unknown device may pair
    client_session, box_session = pair(world)
    [request] = of_type(world.box_events, PairingRequested)
    assert request.peer_key == world.client_keys.public
    assert request.secret == SECRET and request.facts == FACTS
    assert request.source == CLIENT_ADDR and request.session is box_session
    assert box_session.is_pairing and client_session.is_pairing
    pending = wire.PairStateFrame(wire.PairState.PENDING, None, "waiting for the owner")
    sent = box_session.send(pending, world.now)
    assert sent is not None and frames(world.to_client(sent)) == [pending]
    approved = wire.PairStateFrame(wire.PairState.APPROVED, IPv6Address("fc03:1136:3812::1"))
    sent = box_session.send(approved, world.now)
    assert sent is not None and frames(world.to_client(sent)) == [approved]


def test_xk_carries_the_pairing_payload_compactly() -> None:
    world = World()
    session = world.client.pair(world.box_keys.public, SECRET, FACTS)
    assert (
        session._pairing_payload
        == SECRET + json.dumps(FACTS, separators=(",", ":"), sort_keys=True).encode()
    )
    with pytest.raises(SessionError):
        world.client.pair(world.box_keys.public, b"short", FACTS)
    with pytest.raises(SessionError):
        world.client.pair(world.box_keys.public, SECRET, {"name": "x" * 2000})


def test_pairing_session_refuses_packet_frames() -> None:
    world = World()
    client_session, box_session = pair(world)
    with pytest.raises(SessionError):
        client_session.send(wire.Packet(b"\x60" + bytes(39)), world.now)
    with pytest.raises(SessionError):
        client_session.send_packet(b"\x60" + bytes(39), world.now)
    with pytest.raises(SessionError):
        box_session.send(wire.Probe(b"abcdefgh"), world.now)
    # A peer that sends a PACKET anyway (bypassing send's check) is not heard.
    forged = client_session._seal(b"\x01" + bytes(40), world.now, False)
    assert forged is not None
    assert world.to_box(forged) == []
    assert world.box.stats["refused_on_pairing_session"] == 1
    control = client_session.send(wire.Control(2, b'{"hello":1}'), world.now)
    assert control is not None and frames(world.to_box(control)) == [
        wire.Control(2, b'{"hello":1}')
    ]


def test_pairing_is_refused_when_not_enabled() -> None:
    world = World()
    box = Endpoint(world.box_keys, is_allowed=world.allowed.__contains__)
    session = world.client.pair(world.box_keys.public, SECRET, FACTS)
    assert box.receive(session.initiate(world.now, world.wall), CLIENT_ADDR, world.now) == []
    assert box.datagrams_to_send() == []


def test_bad_pairing_payload_makes_no_session() -> None:
    world = World()
    session = world.client.pair(world.box_keys.public, SECRET, FACTS)
    session._pairing_payload = SECRET + b"[1, 2, 3]"  # JSON, but not an object
    world.to_box(session.initiate(world.now, world.wall))
    world.pump()
    assert [e.reason for e in of_type(world.box_events, HandshakeFailed)] == ["bad pairing payload"]
    assert world.box.session(world.client_keys.public, wire.Pattern.XK) is None


def test_late_xk_final_message_is_dropped() -> None:
    world = World()
    session = world.client.pair(world.box_keys.public, SECRET, FACTS)
    world.to_box(session.initiate(world.now, world.wall))
    [response] = world.box.datagrams_to_send()
    world.now += 30  # the box forgot the half-open handshake meanwhile
    world.box.handle_timer(world.now)
    world.to_client(response.data)
    [final] = world.client.datagrams_to_send()
    assert world.to_box(final.data) == []
    assert world.box.session(world.client_keys.public, wire.Pattern.XK) is None


def test_lost_xk_final_message_is_retried_within_15_s() -> None:
    world = World()
    session = world.client.pair(world.box_keys.public, SECRET, FACTS)
    world.to_box(session.initiate(world.now, world.wall))
    [response] = world.box.datagrams_to_send()
    world.to_client(response.data)
    world.client.datagrams_to_send()  # message 3 is lost
    world.advance(KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + 0.5)
    assert of_type(world.box_events, PairingRequested)
    assert world.box.session(world.client_keys.public, wire.Pattern.XK) is not None


def test_reconnecting_with_ik_closes_the_pairing_session() -> None:
    world = World(allowed=False)
    _, box_pairing = pair(world)
    world.allowed.add(world.client_keys.public)  # the owner approved the device
    world.now += 1
    world.connect()
    closed = of_type(world.box_events, SessionClosed)
    assert [(e.session, e.reason) for e in closed] == [(box_pairing, "reconnected with IK")]
    assert world.box.session(world.client_keys.public, wire.Pattern.XK) is None


# --- transport: loss, reordering, replay -----------------------------------------------------


def test_loss_and_reordering_are_survived_and_replays_rejected() -> None:
    world = World()
    client_session, _ = world.connect()
    sent = []
    for number in range(300):
        data = client_session.send(wire.Packet(number.to_bytes(2, "big")), world.now)
        assert data is not None
        sent.append((number, data))
    rng = random.Random(7)
    kept = [item for item in sent if rng.random() > 0.2]  # 20 % loss
    rng.shuffle(kept)  # and arbitrary reordering
    received = []
    for _, data in kept:
        received += [f.data for f in frames(world.to_box(data))]  # type: ignore[union-attr]
    assert sorted(received) == sorted(n.to_bytes(2, "big") for n, _ in kept)
    for _, data in kept[:50]:  # replays of anything already seen
        assert world.to_box(data) == []
    assert world.box.stats["replay"] == 50


def test_forged_and_truncated_transport_is_dropped() -> None:
    world = World()
    client_session, _ = world.connect()
    data = client_session.send(wire.Packet(b"x" * 100), world.now)
    assert data is not None
    spoiled = bytearray(data)
    spoiled[-1] ^= 0x80
    assert world.to_box(bytes(spoiled)) == []
    assert world.to_box(data[:29]) == []
    assert frames(world.to_box(data)) == [wire.Packet(b"x" * 100)]  # the forgery moved nothing


def test_responder_does_not_send_before_key_confirmation() -> None:
    world = World()
    session = world.client.connect(world.box_keys.public)
    world.to_box(session.initiate(world.now, world.wall))
    box_session = world.box.session(world.client_keys.public)
    assert box_session is not None and not box_session.established
    assert box_session.send(wire.Keepalive(), world.now) is None
    [response] = world.box.datagrams_to_send()
    world.to_client(response.data)
    [confirm] = world.client.datagrams_to_send()  # the initiator's keepalive
    assert of_type(world.to_box(confirm.data), HandshakeCompleted)
    assert box_session.send(wire.Keepalive(), world.now) is not None


def test_lost_response_is_retried_and_completes() -> None:
    world = World()
    session = world.client.connect(world.box_keys.public)
    world.to_box(session.initiate(world.now, world.wall))
    world.box.datagrams_to_send()  # the response is lost
    world.advance(REKEY_TIMEOUT + 0.5)
    assert of_type(world.client_events, HandshakeCompleted)
    assert of_type(world.box_events, HandshakeCompleted)
    data = session.send(wire.Packet(b"after retry"), world.now)
    assert data is not None and frames(world.to_box(data)) == [wire.Packet(b"after retry")]


# --- timers ------------------------------------------------------------------------------------


def test_rekey_at_120_s_with_traffic_continuing_and_nothing_lost() -> None:
    world = World()
    client_session, box_session = world.connect()
    in_flight: list[tuple[float, str, bytes]] = []  # (arrival, direction, bytes): 300 ms late
    sent = received = 0
    for tick in range(int(400 / 0.25)):
        world.now = 1000.0 + tick * 0.25
        for endpoint, events in (
            (world.box, world.box_events),
            (world.client, world.client_events),
        ):
            deadline = endpoint.next_timer()
            if deadline is not None and deadline <= world.now:
                events += endpoint.handle_timer(world.now, world.wall)
        world.pump()  # handshakes travel at once; data waits in flight
        for session, direction in ((client_session, "up"), (box_session, "down")):
            data = session.send(wire.Packet(sent.to_bytes(4, "big")), world.now)
            assert data is not None, f"could not send at {world.now - 1000:.2f} s"
            sent += 1
            in_flight.append((world.now + 0.3, direction, data))
        arrived = [item for item in in_flight if item[0] <= world.now]
        in_flight = [item for item in in_flight if item[0] > world.now]
        for _, direction, data in arrived:
            events = world.to_box(data) if direction == "up" else world.to_client(data)
            received += len(frames(events))
    assert received == sent - len(in_flight)
    rekeys = of_type(world.client_events, HandshakeCompleted)
    assert len(rekeys) == 4  # at 0, 120, 240 and 360 s
    assert REKEY_AFTER_TIME == 120
    assert of_type(world.box_events, SessionClosed) == []


def test_keys_are_refused_after_180_s_without_a_rekey() -> None:
    world = World()
    client_session, box_session = world.connect()
    old = client_session.send(wire.Packet(b"old"), world.now + REJECT_AFTER_TIME - 1)
    assert old is not None
    world.advance(REJECT_AFTER_TIME - 1, deliver=False)  # rekey attempts are all lost
    assert box_session.send(wire.Keepalive(), world.now) is not None  # still inside 180 s
    world.advance(2, deliver=False)
    assert box_session.send(wire.Packet(b"x"), world.now) is None
    assert client_session.send(wire.Packet(b"x"), world.now) is None
    assert world.to_box(old) == []  # made at 179 s, arriving at 181 s
    closed = of_type(world.box_events, SessionClosed)
    assert [(e.session, e.reason) for e in closed] == [(box_session, "keys expired")]


def test_expired_keys_are_refused_even_when_timers_run_late() -> None:
    world = World()
    client_session, box_session = world.connect()
    late = client_session.send(wire.Packet(b"late"), world.now + REJECT_AFTER_TIME - 0.5)
    assert late is not None
    world.now += REJECT_AFTER_TIME + 0.5  # no handle_timer call in between
    assert world.to_box(late) == []
    assert world.box.stats["expired_keys"] == 1
    assert box_session.send(wire.Keepalive(), world.now) is None


def test_passive_keepalive_after_10_s_and_keepalives_are_not_answered() -> None:
    world = World()
    client_session, _ = world.connect()
    data = client_session.send(wire.Packet(b"ping"), world.now)
    assert data is not None
    world.to_box(data)
    world.advance(KEEPALIVE_TIMEOUT - 0.5, deliver=False)
    assert world.box.datagrams_to_send() == []
    world.now += 0.5
    world.box.handle_timer(world.now)
    [keepalive] = world.box.datagrams_to_send()
    assert keepalive.destination == CLIENT_ADDR
    # authenticated: reported, as path liveness for transport.paths, and nothing else
    assert frames(world.to_client(keepalive.data)) == [wire.Keepalive()]
    assert client_session.last_received == world.now
    world.advance(KEEPALIVE_TIMEOUT + 1, deliver=False)
    assert world.client.datagrams_to_send() == []  # a keepalive is not answered


def test_a_reply_cancels_the_keepalive() -> None:
    world = World()
    client_session, box_session = world.connect()
    data = client_session.send(wire.Packet(b"ping"), world.now)
    assert data is not None
    world.to_box(data)
    world.now += 2
    assert box_session.send(wire.Packet(b"pong"), world.now) is not None
    world.advance(KEEPALIVE_TIMEOUT, deliver=False)
    assert world.box.datagrams_to_send() == []


def test_unanswered_data_triggers_a_new_handshake_after_15_s() -> None:
    world = World()
    client_session, _ = world.connect()
    world.now += 1
    assert client_session.send(wire.Packet(b"anyone?"), world.now) is not None  # lost
    world.advance(KEEPALIVE_TIMEOUT + REKEY_TIMEOUT - 0.1, deliver=False)
    assert world.client.datagrams_to_send() == []
    world.now += 0.1
    world.client.handle_timer(world.now)
    [initiation] = world.client.datagrams_to_send()
    assert initiation.data[0] == wire.MessageType.HANDSHAKE_INIT


def test_retries_with_jitter_then_give_up_after_90_s() -> None:
    def schedule(seed: int) -> tuple[list[float], list[Event]]:
        client = Endpoint(Keys.generate(), rng=random.Random(seed))
        session = client.connect(Keys.generate().public)
        now = 0.0
        session.initiate(now, WALL0)
        times, events = [], []
        for _ in range(1000):
            deadline = client.next_timer()
            if deadline is None:
                break
            now = deadline
            events += client.handle_timer(now, WALL0 + now)
            times += [now for d in client.datagrams_to_send() if d.data[0] == 1]
        return times, events

    times, events = schedule(3)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert all(REKEY_TIMEOUT <= gap <= REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER for gap in gaps)
    assert len(set(gaps)) > 1  # jittered, not fixed
    assert times[-1] < REKEY_ATTEMPT_TIME
    assert 15 <= len(times) <= 17
    [failed] = of_type(events, HandshakeFailed)
    assert failed.reason == "no answer after 90 s"
    assert schedule(3)[0] == times  # the injected RNG makes it reproducible
    assert schedule(4)[0] != times


def test_send_after_giving_up_starts_again() -> None:
    world = World()
    session = world.client.connect(world.box_keys.public)
    session.initiate(world.now, world.wall)
    world.advance(REKEY_ATTEMPT_TIME + 1, deliver=False)
    assert of_type(world.client_events, HandshakeFailed)
    assert session.send(wire.Packet(b"x"), world.now) is None
    [initiation] = world.client.datagrams_to_send()
    world.to_box(initiation.data)
    world.pump()
    assert session.send(wire.Packet(b"x"), world.now) is not None


def test_timers_settle() -> None:
    """An idle pair of endpoints wakes up a bounded number of times (no busy loop)."""
    world = World()
    world.connect()
    wakeups = 0
    for _ in range(10_000):
        deadline = min(d for d in (world.box.next_timer(), world.client.next_timer()) if d)
        if deadline > world.now + 3600:
            break
        assert deadline >= world.now
        world.now = deadline
        world.box.handle_timer(world.now)
        world.client.handle_timer(world.now)
        world.pump()
        wakeups += 1
        if world.now > 1000 + 1800:
            break
    assert wakeups < 200  # one rekey each 2 min plus keepalives: a handful per rekey


# --- roaming ---------------------------------------------------------------------------------


def test_roaming_follows_authenticated_packets_only() -> None:
    world = World()
    client_session, box_session = world.connect()
    world.client_addr = ROAMED_ADDR  # the phone moved from Wi-Fi to mobile data
    data = client_session.send(wire.Packet(b"from the new network"), world.now)
    assert data is not None
    events = world.to_box(data)
    [changed] = of_type(events, EndpointChanged)
    assert (changed.old, changed.new) == (CLIENT_ADDR, ROAMED_ADDR)
    assert box_session.address == ROAMED_ADDR
    # Unauthenticated: a copy with a broken tag, and junk with a real index, from elsewhere.
    data = client_session.send(wire.Packet(b"more"), world.now)
    assert data is not None
    spoiled = data[:-1] + bytes([data[-1] ^ 1])
    assert world.to_box(spoiled, ATTACKER_ADDR) == []
    assert world.to_box(data[:14] + bytes(40), ATTACKER_ADDR) == []
    assert box_session.address == ROAMED_ADDR
    world.box.handle_timer(world.now + KEEPALIVE_TIMEOUT)
    [keepalive] = world.box.datagrams_to_send()
    assert keepalive.destination == ROAMED_ADDR


def test_datagrams_received_without_roaming_never_move_the_session() -> None:
    """What transport.peer does with datagrams that came through a relay: replies still go
    back to the placeholder they came from, but the session keeps the peer's real address."""
    relayed = ("relay:eu/00112233", 0)
    world = World()
    session = world.client.connect(world.box_keys.public)
    events = world.box.receive(
        session.initiate(world.now, world.wall), relayed, world.now, world.wall, roam=False
    )
    assert events == []
    [response] = world.box.datagrams_to_send()
    assert response.destination == relayed  # the answer goes back the way it came
    world.to_client(response.data)
    [confirm] = world.client.datagrams_to_send()
    events = world.box.receive(confirm.data, relayed, world.now, world.wall, roam=False)
    assert of_type(events, HandshakeCompleted)
    assert frames(events) == [wire.Keepalive()]  # the confirmation: liveness, nothing more
    box_session = world.box.session(world.client_keys.public)
    assert box_session is not None and box_session.address is None
    data = session.send(wire.Packet(b"direct now"), world.now)
    assert data is not None
    assert not of_type(world.to_box(data), EndpointChanged)  # first real address: no change
    assert box_session.address == CLIENT_ADDR
    data = session.send(wire.Packet(b"through the relay again"), world.now)
    assert data is not None
    events = world.box.receive(data, relayed, world.now, world.wall, roam=False)
    assert frames(events) == [wire.Packet(b"through the relay again")]
    assert not of_type(events, EndpointChanged) and box_session.address == CLIENT_ADDR


def test_replay_from_another_address_does_not_move_the_session() -> None:
    world = World()
    client_session, box_session = world.connect()
    data = client_session.send(wire.Packet(b"x"), world.now)
    assert data is not None
    world.to_box(data)
    assert world.to_box(data, ATTACKER_ADDR) == []
    assert box_session.address == CLIENT_ADDR


# --- arbitrary input -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def busy_world() -> World:
    world = World()
    world.connect()
    pair_world_session = world.client.pair(world.box_keys.public, SECRET, FACTS)
    world.to_box(pair_world_session.initiate(world.now, world.wall))
    world.pump()
    return world


def _headers() -> st.SearchStrategy[bytes]:
    return st.sampled_from(
        [b"\x01\x01", b"\x01\x02", b"\x02\x01", b"\x02\x02", b"\x03\x02", b"\x04\x00", b"\x05\x00"]
    )


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.builds(lambda head, rest: head + rest, _headers(), st.binary(max_size=300)),
    )
)
def test_arbitrary_bytes_never_raise(busy_world: World, data: bytes) -> None:
    for endpoint in (busy_world.box, busy_world.client):
        events = endpoint.receive(data, ATTACKER_ADDR, busy_world.now, busy_world.wall)
        assert not of_type(events, FrameReceived)
        endpoint.datagrams_to_send()


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(position=st.integers(0, 10_000), flip=st.integers(1, 255))
def test_corrupted_handshakes_never_raise(busy_world: World, position: int, flip: int) -> None:
    session = busy_world.client.connect(busy_world.box_keys.public)
    message = bytearray(session.initiate(busy_world.now, busy_world.wall))
    message[position % len(message)] ^= flip
    busy_world.box.receive(bytes(message), ATTACKER_ADDR, busy_world.now)
    for datagram in busy_world.box.datagrams_to_send():
        busy_world.client.receive(datagram.data, BOX_ADDR, busy_world.now)


def _with_mac1(message: bytes, responder_key: bytes) -> bytes:
    body = message[:-32]
    return (
        body
        + hashlib.blake2s(body, key=mac1_key(responder_key), digest_size=16).digest()
        + (bytes(16))
    )


@settings(max_examples=150, deadline=None)
@given(
    which=st.sampled_from(["ik1", "xk1", "ik2", "xk2", "xk3"]),
    position=st.integers(0, 10_000),
    flip=st.integers(1, 255),
)
def test_corrupted_noise_with_a_valid_mac1_never_raises(
    which: str, position: int, flip: int
) -> None:
    """mac1 only needs the box's public key, so an attacker can get past it: whatever follows
    must drop bad Noise messages quietly and leave no session behind."""
    world = World()
    if which in ("ik1", "ik2"):
        session = world.client.connect(world.box_keys.public)
    else:
        session = world.client.pair(world.box_keys.public, SECRET, FACTS)
    messages = {"ik1": session.initiate(world.now, world.wall), "xk1": b""}
    messages["xk1"] = messages["ik1"]
    world.to_box(messages["ik1"])
    [response] = world.box.datagrams_to_send()
    messages["ik2"] = messages["xk2"] = response.data
    if which == "xk3":
        world.to_client(response.data)
        [final] = world.client.datagrams_to_send()
        messages["xk3"] = final.data
    message = bytearray(messages[which])
    noise_start = 6 if which in ("ik1", "xk1") else (10 if which in ("ik2", "xk2") else 6)
    noise_len = len(message) - 32 - noise_start
    message[noise_start + position % noise_len] ^= flip
    corrupted = _with_mac1(bytes(message), world.box_keys.public)
    if which in ("ik2", "xk2"):
        events = world.to_client(corrupted)
        assert not of_type(events, HandshakeCompleted)
    else:
        if which == "xk3":
            world.box_events.clear()
        events = world.to_box(corrupted)
        assert not of_type(events, HandshakeCompleted) and not of_type(events, PairingRequested)
    assert world.box.stats["bad_mac1"] == 0
    assert (world.box.stats + world.client.stats)["bad_handshake"] == 1  # reached Noise, dropped


def test_timer_heap_stays_small_under_traffic() -> None:
    world = World()
    client_session, box_session = world.connect()
    for number in range(5000):
        world.now += 0.01
        up = client_session.send(wire.Packet(b"u"), world.now)
        assert up is not None
        world.to_box(up)
        if number % 3 == 0:
            down = box_session.send(wire.Packet(b"d"), world.now)
            assert down is not None
            world.to_client(down)
        world.box.next_timer()
        world.client.next_timer()
        world.box.handle_timer(world.now)
        world.client.handle_timer(world.now)
        world.pump()
    assert len(world.box._heap) <= 3 and len(world.client._heap) <= 3


def test_datagram_shape() -> None:
    world = World()
    session = world.client.connect(world.box_keys.public, address=BOX_ADDR)
    world.to_box(session.initiate(world.now, world.wall))
    [reply] = world.box.datagrams_to_send()
    assert isinstance(reply, Datagram)
    assert reply.destination == CLIENT_ADDR and reply.peer_key == world.client_keys.public


# --- Noise test vectors ----------------------------------------------------------------------


def _vectors() -> list[dict[str, Any]]:
    return json.loads(VECTORS.read_text())["vectors"]


def test_vector_file_has_our_two_protocols() -> None:
    names = sorted(vector["protocol_name"] for vector in _vectors())
    assert names == sorted(p.decode() for p in wire.NOISE_PROTOCOLS.values())


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["protocol_name"])
def test_noise_vectors(vector: dict[str, Any]) -> None:
    """noiseprotocol, given the vectors' fixed keys, ephemerals and prologue, produces every
    handshake and transport message byte for byte; and our datagram AEAD, fed the keys we take
    from its split, reproduces the transport messages (explicit counter n = Noise's nonce)."""
    hexa = bytes.fromhex
    name = vector["protocol_name"].encode()
    sides = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noiseprotocol warns that fixed ephemerals are for tests
        for role in ("init", "resp"):
            conn = NoiseConnection.from_name(name)
            conn.set_as_initiator() if role == "init" else conn.set_as_responder()
            conn.set_prologue(hexa(vector[f"{role}_prologue"]))
            conn.set_keypair_from_private_bytes(NoiseKeypair.STATIC, hexa(vector[f"{role}_static"]))
            conn.set_keypair_from_private_bytes(
                NoiseKeypair.EPHEMERAL, hexa(vector[f"{role}_ephemeral"])
            )
            if f"{role}_remote_static" in vector:
                conn.set_keypair_from_public_bytes(
                    NoiseKeypair.REMOTE_STATIC, hexa(vector[f"{role}_remote_static"])
                )
            conn.start_handshake()
            sides[role] = conn
    writer, reader = sides["init"], sides["resp"]
    counters = {"init": 0, "resp": 0}
    role = "init"
    for message in vector["messages"]:
        payload, expected = hexa(message["payload"]), hexa(message["ciphertext"])
        if not (writer.handshake_finished and reader.handshake_finished):
            assert bytes(writer.write_message(payload)) == expected
            assert bytes(reader.read_message(expected)) == payload
        else:
            assert writer.encrypt(payload) == expected
            assert reader.decrypt(expected) == payload
            send_key, _ = _split(writer)
            _, receive_key = _split(reader)
            nonce = wire.aead_nonce(counters[role])
            assert ChaCha20Poly1305(send_key).encrypt(nonce, payload, b"") == expected
            assert ChaCha20Poly1305(receive_key).decrypt(nonce, expected, b"") == payload
            counters[role] += 1
        writer, reader = reader, writer
        role = "resp" if role == "init" else "init"
    assert all(counters.values())
    assert writer.get_handshake_hash() == reader.get_handshake_hash()
