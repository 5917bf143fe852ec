"""The wire contract: every message round-trips, and no input makes a parser raise anything but
WireError."""

from __future__ import annotations

import contextlib
from ipaddress import IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport import wire
from transport.wire import (
    Control,
    CookieReply,
    HandshakeFinal,
    HandshakeInit,
    HandshakeResp,
    Hello,
    Keepalive,
    Kind,
    Packet,
    PairState,
    PairStateFrame,
    Pattern,
    Ping,
    Pong,
    Probe,
    ProbeAck,
    Recv,
    Register,
    Registered,
    RelayErrorCode,
    RelayErrorFrame,
    Send,
    Ticket,
    TicketFrame,
    Transport,
    WireError,
)

u32 = st.integers(0, 2**32 - 1)
mac = st.binary(min_size=16, max_size=16)
pattern = st.sampled_from(list(Pattern))
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
address = st.tuples(st.one_of(ipv4, ipv6), st.integers(0, 65535))
peer = st.binary(min_size=16, max_size=16)

tunnel_messages = st.one_of(
    st.builds(HandshakeInit, pattern, u32, st.binary(min_size=32, max_size=200), mac, mac),
    st.builds(HandshakeResp, pattern, u32, u32, st.binary(min_size=32, max_size=200), mac, mac),
    st.builds(HandshakeFinal, pattern, u32, st.binary(min_size=16, max_size=200), mac, mac),
    st.builds(
        CookieReply, u32, st.binary(min_size=12, max_size=12), st.binary(min_size=32, max_size=32)
    ),
    st.builds(Transport, u32, st.integers(0, 2**64 - 1), st.binary(min_size=16, max_size=300)),
)
inner_frames = st.one_of(
    st.just(Keepalive()),
    st.builds(Packet, st.binary(max_size=300)),
    st.builds(Probe, st.binary(min_size=8, max_size=8)),
    st.builds(ProbeAck, st.binary(min_size=8, max_size=8), address),
    st.builds(
        PairStateFrame,
        st.sampled_from(list(PairState)),
        st.one_of(st.none(), st.ip_addresses(v=6).filter(lambda a: a.packed != bytes(16))),
        st.text(max_size=50),
    ),
    st.builds(Control, st.integers(0, 255), st.binary(max_size=100)),
)
relay_frames = st.one_of(
    st.builds(Hello, st.binary(min_size=16, max_size=16), st.binary(min_size=32, max_size=32)),
    st.builds(
        Register,
        st.binary(min_size=32, max_size=32),
        st.binary(min_size=32, max_size=32),
        st.binary(min_size=16, max_size=16),
        mac,
    ),
    st.builds(Registered, peer, address),
    st.builds(Send, peer, st.binary(max_size=300)),
    st.builds(Recv, peer, st.binary(max_size=300)),
    st.builds(TicketFrame, st.binary(min_size=wire.TICKET_LEN, max_size=wire.TICKET_LEN)),
    st.builds(RelayErrorFrame, st.sampled_from(list(RelayErrorCode)), st.text(max_size=40)),
    st.builds(Ping, st.binary(min_size=8, max_size=8)),
    st.builds(Pong, st.binary(min_size=8, max_size=8)),
)


@given(tunnel_messages)
def test_tunnel_messages_round_trip(message):
    data = wire.encode_tunnel(message)
    assert wire.classify(data) == Kind.TUNNEL
    assert wire.decode_tunnel(data) == message


@given(inner_frames)
def test_inner_frames_round_trip(frame):
    assert wire.decode_inner(wire.encode_inner(frame)) == frame


@given(relay_frames)
def test_relay_frames_round_trip(frame):
    data = wire.encode_relay(frame)
    assert wire.classify(data) == Kind.RELAY
    assert wire.decode_relay(data) == frame


@given(st.binary(max_size=400))
def test_parsers_raise_only_wire_error(data):
    for parse in (
        wire.classify,
        wire.decode_tunnel,
        wire.decode_inner,
        wire.decode_relay,
        Ticket.decode,
        lambda d: wire.decode_address(d, 0),
        lambda d: wire.StreamDecoder().feed(d),
    ):
        with contextlib.suppress(WireError):
            parse(data)


def test_stun_is_told_apart_from_tunnel_messages_by_its_magic_cookie():
    # A STUN Binding request starts 0x00 0x01 like nothing of ours; a tunnel message starting
    # 0x01 is not STUN unless the cookie is there.
    stun = bytes([0, 1, 0, 0]) + wire.STUN_MAGIC_COOKIE.to_bytes(4, "big") + bytes(12)
    assert wire.classify(stun) == Kind.STUN
    fake = bytes([1, 1]) + bytes(18)
    assert wire.classify(fake) == Kind.TUNNEL
    with pytest.raises(WireError):
        wire.classify(b"")
    with pytest.raises(WireError, match="0x10"):
        wire.classify(b"\x10abc")


def test_transport_header_is_the_aead_associated_data_and_nonce_is_little_endian():
    header = wire.transport_header(0x01020304, 5)
    assert header == bytes([5, 0, 1, 2, 3, 4]) + (5).to_bytes(8, "big")
    assert wire.encode_tunnel(Transport(0x01020304, 5, b"x" * 16)).startswith(header)
    assert wire.aead_nonce(1) == bytes(4) + b"\x01" + bytes(7)


def test_addresses_on_the_wire():
    assert wire.encode_address(("192.0.2.1", 443)) == b"\x04\x01\xbb" + bytes([192, 0, 2, 1])
    encoded = wire.encode_address(("2001:db8::1", 53))
    assert encoded[:3] == b"\x06\x00\x35" and encoded[3:] == IPv6Address("2001:db8::1").packed
    with pytest.raises(WireError):
        wire.encode_address(("not-an-ip", 1))
    with pytest.raises(WireError):
        wire.decode_address(b"\x05\x00\x01")


def test_stream_framing_reassembles_split_and_joined_frames():
    frames = [wire.encode_relay(Ping(b"12345678")), wire.encode_relay(Send(b"p" * 16, b"x" * 500))]
    stream = b"".join(wire.frame_stream(f) for f in frames)
    decoder = wire.StreamDecoder()
    got = []
    for i in range(0, len(stream), 7):  # arbitrary cuts, including inside the length prefix
        got += decoder.feed(stream[i : i + 7])
    assert got == frames
    with pytest.raises(WireError):
        wire.frame_stream(b"x" * (wire.MAX_FRAME + 1))
    with pytest.raises(WireError):
        wire.StreamDecoder().feed(b"\x00\x00")


def test_ticket_layout():
    ticket = Ticket(b"b" * 16, wire.ANY_CLIENT, 1_800_000_000, b"s" * 64)
    data = ticket.encode()
    assert len(data) == wire.TICKET_LEN
    assert Ticket.decode(data) == ticket
    assert ticket.signed_message() == b"lazycat tkt" + data[:40]


def test_peer_id_is_a_stable_hash_of_the_key():
    assert wire.peer_id(bytes(32)) == wire.peer_id(bytes(32))
    assert wire.peer_id(bytes(32)) != wire.peer_id(b"\x01" * 32)
    assert len(wire.peer_id(bytes(32))) == 16
    with pytest.raises(WireError):
        wire.peer_id(b"short")


def test_encoders_refuse_what_decoders_would_refuse():
    with pytest.raises(WireError, match="at least 32"):
        wire.encode_tunnel(HandshakeResp(Pattern.IK, 1, 2, b"short"))
    with pytest.raises(WireError, match="at least 16"):
        wire.encode_tunnel(HandshakeFinal(Pattern.XK, 1, b""))
