"""The Peer's own behaviour: the home relay choice (fake clock), demultiplexing that never
raises, relayed datagrams that never roam a session, pairing, losing and regaining the box,
and a device moving its home relay — in memory on ``natsim`` (``tests/transport/natlab.py``)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.transport.natlab import (
    CLIENT_PUBLIC,
    RELAY,
    RELAY_IP,
    RELAY_UDP,
    WALL0,
    SimRelay,
    make_lab,
    via,
)
from transport import natsim, wire
from transport.paths import Candidate, CandidateKind, ViaRelay
from transport.peer import (
    CandidatesChanged,
    Connected,
    Disconnected,
    FrameReceived,
    HomeRelay,
    Peer,
    PeerConfig,
)
from transport.session import Keys, SessionError

XK = wire.Pattern.XK

# --- the home relay ------------------------------------------------------------------------------

ROUND = 30.0  # one STUN round apart


def rounds(home: HomeRelay, samples: dict[str, list[float]], start: float = 0.0) -> list[str]:
    """Feed one measurement per relay per round (the home's first); the home after each."""
    homes, clock = [], start
    for i in range(max(len(v) for v in samples.values())):
        for name, rtts in samples.items():
            if i < len(rtts):
                home.measured(name, rtts[i], clock)
        homes.append(home.home or "")
        clock += ROUND
    return homes


def test_the_first_relay_to_answer_is_home() -> None:
    home = HomeRelay()
    assert home.measured("eu", 0.030, 0.0) == "eu"
    assert home.measured("us", 0.012, 0.001) is None  # faster, but once is not enough
    assert home.home == "eu"


def test_a_clearly_faster_relay_takes_over_on_its_third_measurement() -> None:
    home = HomeRelay()
    homes = rounds(home, {"eu": [0.050] * 5, "us": [0.030] * 5})
    assert homes == ["eu", "eu", "us", "us", "us"]  # measurements 1, 2, 3 of us: switch at 3


@pytest.mark.parametrize(
    ("home_rtt", "other_rtt"),
    [
        (0.020, 0.012),  # 40 % lower, but only 8 ms: not worth a move
        (0.100, 0.085),  # 15 ms lower, but only 15 %: within noise of a far relay
        (0.060, 0.049),  # 11 ms, but only 18 %
    ],
)
def test_a_relay_not_clearly_faster_never_takes_over(home_rtt: float, other_rtt: float) -> None:
    home = HomeRelay()
    assert set(rounds(home, {"eu": [home_rtt] * 20, "us": [other_rtt] * 20})) == {"eu"}


def test_one_measurement_that_is_not_clearly_better_starts_the_count_again() -> None:
    home = HomeRelay()
    us = [0.030, 0.030, 0.049, 0.030, 0.030, 0.030]
    homes = rounds(home, {"eu": [0.050] * 6, "us": us})
    assert homes == ["eu", "eu", "eu", "eu", "eu", "us"]


def test_a_failed_home_is_left_at_once_for_the_fastest_other() -> None:
    home = HomeRelay()
    rounds(home, {"eu": [0.030], "us": [0.045], "asia": [0.040]})
    assert home.failed("us", 31.0) is None  # not the home: forgotten, nothing else
    assert home.failed("eu", 31.0) == "asia"
    assert home.latency("eu") is None


def test_a_home_silent_for_longer_than_max_age_is_left() -> None:
    home = HomeRelay(max_age=120.0)
    home.measured("eu", 0.030, 0.0)
    home.measured("us", 0.035, 0.0)
    assert home.measured("us", 0.035, 100.0) is None  # the home is quiet, but not for long
    assert home.measured("us", 0.035, 121.0) == "us"


def test_fallback_only_without_a_home() -> None:
    home = HomeRelay()
    assert home.fallback("eu") == "eu"
    assert home.fallback("us") is None
    with pytest.raises(ValueError):
        HomeRelay(margin=1.0)


# --- demultiplexing ------------------------------------------------------------------------------


def _busy_peer() -> Peer:
    peer = Peer(Keys.generate(), now=0.0, is_allowed=lambda key: True, allow_pairing=True)
    peer.add_relay(RELAY, RELAY_UDP, 0.0)
    peer.datagrams_to_send()
    peer.take_events()
    return peer


ADDRESSES = st.one_of(
    st.sampled_from(
        [RELAY_UDP, ("::ffff:192.0.2.1", 3478, 0, 0), ("2001:db8::1", 5), ("relay:r1/00", 0)]
    ),
    st.tuples(st.text(max_size=20), st.integers(-5, 70000)),
)


@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.builds(lambda b, rest: bytes([b]) + rest, st.integers(0, 0x40), st.binary(max_size=200)),
    ),
    source=ADDRESSES,
)
def test_arbitrary_datagrams_never_raise(data: bytes, source: tuple[object, ...]) -> None:
    peer = _busy_peer()
    peer.receive(data, source, 1.0, WALL0 + 1)  # type: ignore[arg-type]
    peer.receive_stream(RELAY, data, 1.0, WALL0 + 1)
    peer.handle_timer(2.0, WALL0 + 2)
    assert peer.datagrams_to_send() is not None


def test_a_relay_frame_from_a_stranger_is_dropped() -> None:
    peer = _busy_peer()
    hello = bytes([wire.RelayType.HELLO]) + bytes(48)
    assert peer.receive(hello, ("198.51.100.66", 3478), 1.0, WALL0) == []
    assert peer.stats["relay_frame_from_stranger"] == 1
    assert peer.datagrams_to_send() == []


def test_relayed_datagrams_never_roam_a_session() -> None:
    lab = make_lab(natsim.NAT4, natsim.NAT4)  # nothing direct: everything through the relay
    lab.up()
    lab.net.run_until(5)
    for node, other in ((lab.box, lab.client), (lab.client, lab.box)):
        session = node.peer.session(other.peer.keys.public)
        assert session is not None and session.established
        # a relay is not the peer's address: a session that only ever heard the peer through
        # the relay has no address, and its timer datagrams follow the path manager instead
        assert session.address is None
        assert {via(p) for _, _, p in node.received} == {"relay"}
        assert node.peer.endpoint.stats["unknown_index"] == 0


# --- sessions ------------------------------------------------------------------------------------


def test_pairing_through_the_relay_then_ik() -> None:
    lab = make_lab(natsim.NAT3, natsim.NAT3, approved=False)
    # what a pairing code carries: the box's key, the relay, a ticket for any client (1 h)
    pairing_ticket = lab.ticket_key.issue(
        wire.peer_id(lab.box_key), wire.ANY_CLIENT, int(WALL0) + 3600, now_wall=int(WALL0)
    )
    lab.client.peer.add_ticket(pairing_ticket)
    lab.net.run_until(0.2)
    facts = {"name": "Ada's phone", "os": "Android 15"}
    lab.client.peer.pair(lab.box_key, bytes(range(16)), facts, lab.client.now, lab.client.wall)
    lab.client.flush()
    lab.net.run_until(1.0)
    [request] = lab.box.pairing_requests()
    assert (request.peer_key, request.secret, request.facts) == (
        lab.client_key,
        bytes(range(16)),
        facts,
    )
    assert [(e.kind, e.relay) for _, e in lab.box.paths()] == [("relay", RELAY)]
    lab.allowed.add(lab.client_key)  # the owner approves
    frame = wire.PairStateFrame(wire.PairState.APPROVED, None, "welcome")
    assert lab.box.peer.send_frame(lab.client_key, frame, lab.box.now, pattern=wire.Pattern.XK)
    lab.box.flush()
    lab.net.run_until(1.5)
    got = [e for _, e in lab.client.events if isinstance(e, FrameReceived)]
    assert [(e.frame, e.pattern) for e in got] == [(frame, wire.Pattern.XK)]
    with pytest.raises(SessionError):  # a pairing session carries no packets
        lab.client.peer.send_frame(lab.box_key, wire.Packet(b"x"), lab.client.now, pattern=XK)
    lab.connect()  # now as an approved device, still on the pairing ticket
    lab.net.run_until(2.0)
    for node in (lab.client, lab.box):
        patterns = [e.pattern for _, e in node.events if isinstance(e, Connected)]
        assert patterns == [wire.Pattern.XK, wire.Pattern.IK]
    assert lab.box.peer.session(lab.client_key, XK) is None  # closed: reconnected with IK
    lab.client.send(lab.box)
    lab.net.run_until(2.5)
    assert [seq for _, seq, _ in lab.box.received] == [1]


def test_a_device_that_lost_the_box_says_so_and_comes_back_when_it_sends() -> None:
    lab = make_lab(natsim.NAT4, natsim.NAT4)
    lab.up()
    lab.net.run_until(5)
    lab.client.stream(lab.box, None)
    lab.box.stream(lab.client, None)
    lab.net.block(CLIENT_PUBLIC, RELAY_IP)  # the client's only path is gone
    lab.net.run_until(300)
    for node in (lab.client, lab.box):
        [(t, down)] = [(t, e) for t, e in node.events if isinstance(e, Disconnected)]
        # both: the keys expire 180 s after the last handshake (the rekey at 120 s failed)
        assert 180 < t < 181, (node.name, t, down.reason)
    assert lab.client.peer.send_packet(lab.box_key, b"\x60" * 40, lab.client.now) is False
    lab.net.unblock(CLIENT_PUBLIC, RELAY_IP)
    lab.net.run_until(320)  # the relay client registers again (its retries back off to 8 s)
    lab.client.send(lab.box)  # dropped, but it starts a handshake
    lab.net.run_until(330)
    for node in (lab.client, lab.box):
        assert [type(e) for _, e in node.events if isinstance(e, (Connected, Disconnected))] == [
            Connected,
            Disconnected,
            Connected,
        ]
    lab.client.stream(lab.box, 0.05)
    lab.net.run_until(332)
    assert len([t for t, _, _ in lab.box.received if t > 330]) >= 35


# --- relays --------------------------------------------------------------------------------------


def test_a_device_moves_its_home_to_a_clearly_nearer_relay_and_keeps_talking() -> None:
    config = PeerConfig(relay_grace=60.0)
    lab = make_lab(natsim.NAT4, natsim.NAT4, config=config)  # relay only
    far = SimRelay(lab.net, "192.0.2.2", "relay-2")
    far.host.link.latency = 0.040
    lab.box.peer.add_relay("r2", ("192.0.2.2", 3478), lab.box.now)
    lab.client.peer.add_relay("r2", ("192.0.2.2", 3478), lab.client.now)
    lab.box.flush()
    lab.client.flush()
    lab.up()
    lab.net.run_until(10)
    assert lab.client.peer.home is not None and lab.client.peer.home.home == RELAY
    assert lab.client.peer.relay_client("r2") is None  # measured, not registered
    # the near relay's network slows down: the other is now clearly nearer
    lab.relay.host.link.latency = 0.080
    lab.net.run_until(130)
    changes = [
        (t, [c.address for c in e.candidates if c.kind is CandidateKind.RELAY])
        for t, e in lab.client.events
        if isinstance(e, CandidatesChanged) and t > 10
    ]
    moved_at, relays = changes[0]
    assert relays == [ViaRelay("r2"), ViaRelay(RELAY)]  # the new home first, the old in grace
    # three STUN rounds (30 s apart) after the home's first slow answer
    assert 115 < moved_at < 125
    # the box follows the device to the relay its datagrams now come through
    for node in (lab.client, lab.box):
        assert node.paths()[-1][1].relay == "r2"
    lab.net.run_until(moved_at + config.relay_grace + 5)
    assert lab.client.peer.relay_client(RELAY) is None  # the grace is over: unregistered
    last = [e for _, e in lab.client.events if isinstance(e, CandidatesChanged)][-1]
    assert [c.address for c in last.candidates if c.kind is CandidateKind.RELAY] == [ViaRelay("r2")]
    # the negotiation passes the new candidates on
    lab.box.peer.set_remote_candidates(lab.client_key, list(last.candidates), lab.box.now)
    end = lab.net.now + 10
    lab.net.run_until(end)
    for node in (lab.client, lab.box):
        assert node.paths()[-1][1].relay == "r2"
        gap = max(b - a for a, b in itertools.pairwise(sorted(t for t, _, _ in node.received)))
        assert gap < 0.5, f"{node.name}: {gap:.2f} s without a packet"
        assert len([t for t, _, _ in node.received if t > end - 5]) >= 95
    assert far.core.stats.forwarded > 0


def test_local_candidates_put_reflexive_and_relay_after_the_adapters() -> None:
    lab = make_lab(natsim.NAT3, natsim.NAT1)
    lab.net.run_until(0.5)
    kinds = [c.kind for c in lab.client.peer.local_candidates()]
    assert kinds == [CandidateKind.LAN, CandidateKind.REFLEXIVE, CandidateKind.RELAY]
    reflexive = lab.client.peer.local_candidates()[1]
    assert reflexive == Candidate(CandidateKind.REFLEXIVE, reflexive.address)
    assert str(reflexive.address) == f"{CLIENT_PUBLIC}:41641"
