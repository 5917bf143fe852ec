"""Every message lazycat puts on the wire, and the codecs for them.

Everything else in ``transport/`` builds and parses messages through this module; the byte
layouts below are the contract. Parsers raise only :class:`WireError`, whatever the input.
Integers are big-endian unless a field says otherwise.

One UDP socket, three kinds of datagram
=======================================

The box and the clients each use one UDP socket for everything, told apart by the first byte
(the same trick as RFC 7983's demultiplexing):

======  =====================================================================================
first   datagram
======  =====================================================================================
0-3     STUN (RFC 8489): the top two bits of a STUN message are zero; see ``transport.stun``
0x01-   tunnel messages (below): Noise handshakes, cookie replies, encrypted transport
0x0f
0x20-   relay frames (below): between a peer and a relay; over TCP/WebSocket the same frames
0x3f    are carried length-prefixed
======  =====================================================================================

STUN's first byte is 0x00 or 0x01 for the classes we use, which overlaps 0x01: a STUN message
is recognised by its magic cookie 0x2112A442 at bytes 4-8 *first* (:func:`classify`).

Tunnel messages (WireGuard's shape, Noise inside)
=================================================

Every tunnel message starts with ``type(1) | pattern(1) | ...``. ``sender`` / ``receiver`` are
32-bit session indices each side picks at random, so many sessions share one socket and a
session survives a change of address (roaming). ``mac1`` proves the sender knows the
responder's static public key; ``mac2`` is zero unless the responder asked for a cookie
(``transport.session`` computes both).

HANDSHAKE_INIT (0x01)::

    0      1          2                 6                         6+n      6+n+16   6+n+32
    +------+----------+-----------------+-------------------------+--------+--------+
    | 0x01 | pattern  | sender (4)      | noise message 1 (n)     | mac1   | mac2   |
    +------+----------+-----------------+-------------------------+--------+--------+

HANDSHAKE_RESP (0x02)::

    +------+----------+-------------+---------------+----------------------+------+------+
    | 0x02 | pattern  | sender (4)  | receiver (4)  | noise message 2 (n)  | mac1 | mac2 |
    +------+----------+-------------+---------------+----------------------+------+------+

HANDSHAKE_FINAL (0x03), the third message of a three-message pattern (pairing)::

    +------+----------+---------------+------------------------------------+------+------+
    | 0x03 | pattern  | receiver (4)  | noise message 3 (n)                | mac1 | mac2 |
    +------+----------+---------------+------------------------------------+------+------+

COOKIE_REPLY (0x04), sent instead of a response when the responder is under load::

    +------+------+---------------+------------------+-----------------------------------+
    | 0x04 | 0    | receiver (4)  | nonce (12)       | encrypted cookie (16 + 16 tag)    |
    +------+------+---------------+------------------+-----------------------------------+

TRANSPORT (0x05), the encrypted payload of an established session::

    +------+------+---------------+---------------------+--------------------------------+
    | 0x05 | 0    | receiver (4)  | counter (8)         | ChaCha20-Poly1305(inner) + tag |
    +------+------+---------------+---------------------+--------------------------------+

The counter is explicit (so loss and reordering don't break decryption, unlike Noise's implicit
nonces) and is checked against a sliding replay window (RFC 6479). The AEAD nonce is 4 zero
bytes then the counter little-endian (as WireGuard); the associated data is the 14-byte header.

Inner frames (the plaintext of TRANSPORT)::

    +---------+----------------------------------------+
    | kind(1) | body                                   |
    +---------+----------------------------------------+

    KEEPALIVE   0x00  (empty)
    PACKET      0x01  an IP packet (IPv6 or IPv4), as read from the TUN interface
    PROBE       0x02  txid (8)                        path probe, sent on a candidate path
    PROBE_ACK   0x03  txid (8) | address              "your probe came from <address>"
    PAIR_STATE  0x04  state (1) | address (16) | message (utf-8, rest)   pairing outcome
    CONTROL     0x05  channel (1) | bytes             small control messages (JSON), see paths

An *address* on the wire is ``family(1: 4 or 6) | port(2) | ip(4 or 16)``.

Relay frames
============

Between a peer (a box or a client) and a relay. Peers are named by opaque 16-byte ids
(:func:`peer_id` = BLAKE2s-128 of the static key); the relay forwards payloads it cannot read.

::

    HELLO      0x20  relay->peer  challenge (16) | relay ephemeral X25519 key (32)
    REGISTER   0x21  peer->relay  static key (32) | ticket key (32, zeros for a client) |
                                  challenge (16) | proof (16)
    REGISTERED 0x22  relay->peer  peer id (16) | observed address
    SEND       0x23  peer->relay  destination id (16) | payload
    RECV       0x24  relay->peer  source id (16) | payload
    TICKET     0x25  peer->relay  ticket (TICKET_LEN): lets this client send to a box
    ERROR      0x26  relay->peer  code (1) | message (utf-8)
    PING       0x27  either       nonce (8)
    PONG       0x28  either       nonce (8)

``proof`` = BLAKE2s-128(key = X25519(peer static, relay ephemeral), "lazycat relay register" |
challenge | ticket key): possession of the static key without the relay holding a key that
could decrypt anything. A **ticket** is what a box signs to let a client reach it through a
relay::

    +--------------+---------------+-------------------+----------------------------------+
    | box id (16)  | client id (16)| expires (8, unix) | Ed25519 signature (64) by the    |
    |              | (zeros = any, |                   | box's ticket key over the first  |
    |              | for pairing)  |                   | 40 bytes, prefixed "lazycat tkt" |
    +--------------+---------------+-------------------+----------------------------------+

Over TCP (and TLS) each frame is preceded by its length, 2 bytes; over WebSocket each frame is
one binary message.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address, ip_address

STUN_MAGIC_COOKIE = 0x2112A442
NOISE_PROLOGUE = b"lazycat v1"
MAC_LEN = 16
KEY_LEN = 32
INDEX_LEN = 4
COUNTER_LEN = 8
TAG_LEN = 16
TRANSPORT_HEADER_LEN = 1 + 1 + INDEX_LEN + COUNTER_LEN  # 14
PEER_ID_LEN = 16
CHALLENGE_LEN = 16
TICKET_BODY_LEN = PEER_ID_LEN * 2 + 8
TICKET_LEN = TICKET_BODY_LEN + 64
TXID_LEN = 8
MAX_DATAGRAM = 65535
MAX_FRAME = 65535  # length prefix is 2 bytes


class WireError(ValueError):
    """A message that cannot be parsed. The only exception this module's parsers raise."""


class Kind(IntEnum):
    """What a datagram is, from its first bytes (:func:`classify`)."""

    STUN = 0
    TUNNEL = 1
    RELAY = 2


class MessageType(IntEnum):
    HANDSHAKE_INIT = 0x01
    HANDSHAKE_RESP = 0x02
    HANDSHAKE_FINAL = 0x03
    COOKIE_REPLY = 0x04
    TRANSPORT = 0x05


class Pattern(IntEnum):
    """The Noise pattern a handshake uses (byte 1 of every handshake message)."""

    IK = 1  # a pinned, approved device reconnecting: 1 round trip
    XK = 2  # first contact (pairing): the client knows the box key from the pairing code


NOISE_PROTOCOLS = {
    Pattern.IK: b"Noise_IK_25519_ChaChaPoly_BLAKE2s",
    Pattern.XK: b"Noise_XK_25519_ChaChaPoly_BLAKE2s",
}


class Inner(IntEnum):
    KEEPALIVE = 0x00
    PACKET = 0x01
    PROBE = 0x02
    PROBE_ACK = 0x03
    PAIR_STATE = 0x04
    CONTROL = 0x05


class RelayType(IntEnum):
    HELLO = 0x20
    REGISTER = 0x21
    REGISTERED = 0x22
    SEND = 0x23
    RECV = 0x24
    TICKET = 0x25
    ERROR = 0x26
    PING = 0x27
    PONG = 0x28


class RelayErrorCode(IntEnum):
    BAD_FRAME = 1
    NOT_REGISTERED = 2
    BAD_PROOF = 3
    NO_TICKET = 4  # a client tried to send to a box without a valid ticket
    UNKNOWN_PEER = 5  # the destination is not connected to this relay
    RATE_LIMITED = 6
    FULL = 7  # the relay has no room for another connection
    BAD_TICKET = 8


def classify(data: bytes) -> Kind:
    """Which kind of datagram this is, without parsing it further."""
    if len(data) >= 20 and data[0] < 4 and int.from_bytes(data[4:8], "big") == STUN_MAGIC_COOKIE:
        return Kind.STUN
    if not data:
        raise WireError("empty datagram")
    first = data[0]
    if 0x01 <= first <= 0x0F:
        return Kind.TUNNEL
    if 0x20 <= first <= 0x3F:
        return Kind.RELAY
    raise WireError(f"unknown datagram type 0x{first:02x}")


def peer_id(static_key: bytes) -> bytes:
    """The opaque id a relay knows a peer by: BLAKE2s-128 of its static public key."""
    if len(static_key) != KEY_LEN:
        raise WireError("a static key is 32 bytes")
    return hashlib.blake2s(static_key, digest_size=PEER_ID_LEN, person=b"lzc-id").digest()


# --- addresses ----------------------------------------------------------------------------------

Address = tuple[str, int]  # (ip, port): the form asyncio's datagram endpoints use


def encode_address(addr: Address) -> bytes:
    host, port = addr
    try:
        ip = ip_address(host.split("%", 1)[0])
    except ValueError:
        raise WireError(f"{host!r} is not an IP address") from None
    if not 0 <= port <= 0xFFFF:
        raise WireError(f"port {port} out of range")
    family = 4 if isinstance(ip, IPv4Address) else 6
    return struct.pack("!BH", family, port) + ip.packed


def decode_address(data: bytes, offset: int = 0) -> tuple[Address, int]:
    """(address, offset after it)."""
    if len(data) < offset + 3:
        raise WireError("truncated address")
    family, port = struct.unpack_from("!BH", data, offset)
    size = {4: 4, 6: 16}.get(family)
    if size is None:
        raise WireError(f"unknown address family {family}")
    start = offset + 3
    raw = data[start : start + size]
    if len(raw) != size:
        raise WireError("truncated address")
    ip: IPv4Address | IPv6Address = IPv4Address(raw) if size == 4 else IPv6Address(raw)
    return (str(ip), port), start + size


# --- tunnel messages ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeInit:
    pattern: Pattern
    sender: int
    noise: bytes
    mac1: bytes = bytes(MAC_LEN)
    mac2: bytes = bytes(MAC_LEN)


@dataclass(frozen=True, slots=True)
class HandshakeResp:
    pattern: Pattern
    sender: int
    receiver: int
    noise: bytes
    mac1: bytes = bytes(MAC_LEN)
    mac2: bytes = bytes(MAC_LEN)


@dataclass(frozen=True, slots=True)
class HandshakeFinal:
    pattern: Pattern
    receiver: int
    noise: bytes
    mac1: bytes = bytes(MAC_LEN)
    mac2: bytes = bytes(MAC_LEN)


@dataclass(frozen=True, slots=True)
class CookieReply:
    receiver: int
    nonce: bytes  # 12
    encrypted_cookie: bytes  # 32


@dataclass(frozen=True, slots=True)
class Transport:
    receiver: int
    counter: int
    ciphertext: bytes


TunnelMessage = HandshakeInit | HandshakeResp | HandshakeFinal | CookieReply | Transport

_INIT_HEAD = struct.Struct("!BBI")
_RESP_HEAD = struct.Struct("!BBII")
_FINAL_HEAD = struct.Struct("!BBI")
_TRANSPORT_HEAD = struct.Struct("!BBIQ")


def _pattern(value: int) -> Pattern:
    try:
        return Pattern(value)
    except ValueError:
        raise WireError(f"unknown handshake pattern {value}") from None


def _check_len(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise WireError(f"{name} must be {size} bytes")


# The shortest Noise message each handshake step can be (an ephemeral key, or an encrypted
# static key's tag): anything shorter is not a handshake message, whichever side built it.
MIN_NOISE = {
    MessageType.HANDSHAKE_INIT: KEY_LEN,
    MessageType.HANDSHAKE_RESP: KEY_LEN,
    MessageType.HANDSHAKE_FINAL: TAG_LEN,
}


def _check_noise(kind: MessageType, noise: bytes) -> None:
    if len(noise) < MIN_NOISE[kind]:
        raise WireError(f"a {kind.name.lower()} carries at least {MIN_NOISE[kind]} noise bytes")


def encode_tunnel(msg: TunnelMessage) -> bytes:
    if isinstance(msg, HandshakeInit):
        _check_noise(MessageType.HANDSHAKE_INIT, msg.noise)
        _check_len("mac1", msg.mac1, MAC_LEN)
        _check_len("mac2", msg.mac2, MAC_LEN)
        head = _INIT_HEAD.pack(MessageType.HANDSHAKE_INIT, msg.pattern, msg.sender)
        return head + msg.noise + msg.mac1 + msg.mac2
    if isinstance(msg, HandshakeResp):
        _check_noise(MessageType.HANDSHAKE_RESP, msg.noise)
        _check_len("mac1", msg.mac1, MAC_LEN)
        _check_len("mac2", msg.mac2, MAC_LEN)
        head = _RESP_HEAD.pack(MessageType.HANDSHAKE_RESP, msg.pattern, msg.sender, msg.receiver)
        return head + msg.noise + msg.mac1 + msg.mac2
    if isinstance(msg, HandshakeFinal):
        _check_noise(MessageType.HANDSHAKE_FINAL, msg.noise)
        _check_len("mac1", msg.mac1, MAC_LEN)
        _check_len("mac2", msg.mac2, MAC_LEN)
        head = _FINAL_HEAD.pack(MessageType.HANDSHAKE_FINAL, msg.pattern, msg.receiver)
        return head + msg.noise + msg.mac1 + msg.mac2
    if isinstance(msg, CookieReply):
        _check_len("nonce", msg.nonce, 12)
        _check_len("encrypted cookie", msg.encrypted_cookie, 32)
        return (
            _FINAL_HEAD.pack(MessageType.COOKIE_REPLY, 0, msg.receiver)
            + msg.nonce
            + msg.encrypted_cookie
        )
    if isinstance(msg, Transport):
        return _TRANSPORT_HEAD.pack(MessageType.TRANSPORT, 0, msg.receiver, msg.counter) + (
            msg.ciphertext
        )
    raise WireError(f"not a tunnel message: {type(msg).__name__}")


def macs_offset(data: bytes) -> int:
    """Where mac1 starts in an encoded handshake message (mac1 covers everything before it)."""
    return len(data) - 2 * MAC_LEN


def decode_tunnel(data: bytes) -> TunnelMessage:
    if not data:
        raise WireError("empty message")
    kind = data[0]
    try:
        if kind == MessageType.HANDSHAKE_INIT:
            _, pattern, sender = _INIT_HEAD.unpack_from(data)
            body = data[_INIT_HEAD.size :]
            if len(body) < 2 * MAC_LEN + MIN_NOISE[MessageType.HANDSHAKE_INIT]:
                raise WireError("truncated handshake initiation")
            return HandshakeInit(
                _pattern(pattern), sender, body[: -2 * MAC_LEN], body[-32:-16], body[-16:]
            )
        if kind == MessageType.HANDSHAKE_RESP:
            _, pattern, sender, receiver = _RESP_HEAD.unpack_from(data)
            body = data[_RESP_HEAD.size :]
            if len(body) < 2 * MAC_LEN + MIN_NOISE[MessageType.HANDSHAKE_RESP]:
                raise WireError("truncated handshake response")
            return HandshakeResp(
                _pattern(pattern), sender, receiver, body[:-32], body[-32:-16], body[-16:]
            )
        if kind == MessageType.HANDSHAKE_FINAL:
            _, pattern, receiver = _FINAL_HEAD.unpack_from(data)
            body = data[_FINAL_HEAD.size :]
            if len(body) < 2 * MAC_LEN + MIN_NOISE[MessageType.HANDSHAKE_FINAL]:
                raise WireError("truncated final handshake message")
            return HandshakeFinal(
                _pattern(pattern), receiver, body[:-32], body[-32:-16], body[-16:]
            )
        if kind == MessageType.COOKIE_REPLY:
            _, _, receiver = _FINAL_HEAD.unpack_from(data)
            body = data[_FINAL_HEAD.size :]
            if len(body) != 12 + 32:
                raise WireError("a cookie reply is 50 bytes")
            return CookieReply(receiver, body[:12], body[12:])
        if kind == MessageType.TRANSPORT:
            _, _, receiver, counter = _TRANSPORT_HEAD.unpack_from(data)
            body = data[_TRANSPORT_HEAD.size :]
            if len(body) < TAG_LEN:
                raise WireError("truncated transport message")
            return Transport(receiver, counter, body)
    except struct.error:
        raise WireError("truncated tunnel message") from None
    raise WireError(f"unknown tunnel message type 0x{kind:02x}")


def transport_header(receiver: int, counter: int) -> bytes:
    """The 14 bytes a TRANSPORT message starts with; also its AEAD associated data."""
    return _TRANSPORT_HEAD.pack(MessageType.TRANSPORT, 0, receiver, counter)


def aead_nonce(counter: int) -> bytes:
    """ChaCha20-Poly1305's 96-bit nonce for a counter: 4 zero bytes, then 64 bits LE."""
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")


# --- inner frames -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Keepalive:
    pass


@dataclass(frozen=True, slots=True)
class Packet:
    data: bytes


@dataclass(frozen=True, slots=True)
class Probe:
    txid: bytes


@dataclass(frozen=True, slots=True)
class ProbeAck:
    txid: bytes
    observed: Address  # the source address the probe arrived from, as the answering side saw it


class PairState(IntEnum):
    PENDING = 0
    APPROVED = 1
    REJECTED = 2
    REFUSED = 3  # the request itself was refused (bad code, rate limited…): see message


@dataclass(frozen=True, slots=True)
class PairStateFrame:
    state: PairState
    address: IPv6Address | None
    message: str = ""


@dataclass(frozen=True, slots=True)
class Control:
    channel: int
    data: bytes


InnerFrame = Keepalive | Packet | Probe | ProbeAck | PairStateFrame | Control


def encode_inner(frame: InnerFrame) -> bytes:
    if isinstance(frame, Keepalive):
        return bytes([Inner.KEEPALIVE])
    if isinstance(frame, Packet):
        return bytes([Inner.PACKET]) + frame.data
    if isinstance(frame, Probe):
        _check_len("txid", frame.txid, TXID_LEN)
        return bytes([Inner.PROBE]) + frame.txid
    if isinstance(frame, ProbeAck):
        _check_len("txid", frame.txid, TXID_LEN)
        return bytes([Inner.PROBE_ACK]) + frame.txid + encode_address(frame.observed)
    if isinstance(frame, PairStateFrame):
        address = frame.address.packed if frame.address is not None else bytes(16)
        return bytes([Inner.PAIR_STATE, frame.state]) + address + frame.message.encode()
    if isinstance(frame, Control):
        if not 0 <= frame.channel <= 255:
            raise WireError("control channel is one byte")
        return bytes([Inner.CONTROL, frame.channel]) + frame.data
    raise WireError(f"not an inner frame: {type(frame).__name__}")


def decode_inner(data: bytes) -> InnerFrame:
    if not data:
        raise WireError("empty inner frame")
    kind, body = data[0], data[1:]
    if kind == Inner.KEEPALIVE:
        return Keepalive()
    if kind == Inner.PACKET:
        return Packet(body)
    if kind == Inner.PROBE:
        if len(body) != TXID_LEN:
            raise WireError("a probe carries an 8-byte txid")
        return Probe(body)
    if kind == Inner.PROBE_ACK:
        if len(body) < TXID_LEN:
            raise WireError("truncated probe answer")
        observed, end = decode_address(body, TXID_LEN)
        if end != len(body):
            raise WireError("trailing bytes after a probe answer")
        return ProbeAck(body[:TXID_LEN], observed)
    if kind == Inner.PAIR_STATE:
        if len(body) < 17:
            raise WireError("truncated pairing state")
        try:
            state = PairState(body[0])
            message = body[17:].decode()
        except (ValueError, UnicodeDecodeError):
            raise WireError("bad pairing state") from None
        raw = body[1:17]
        return PairStateFrame(state, IPv6Address(raw) if any(raw) else None, message)
    if kind == Inner.CONTROL:
        if not body:
            raise WireError("a control frame names its channel")
        return Control(body[0], body[1:])
    raise WireError(f"unknown inner frame 0x{kind:02x}")


# --- relay frames -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    challenge: bytes
    relay_key: bytes


@dataclass(frozen=True, slots=True)
class Register:
    static_key: bytes
    ticket_key: bytes  # Ed25519 public key a box signs tickets with; zeros for a client
    challenge: bytes
    proof: bytes


@dataclass(frozen=True, slots=True)
class Registered:
    peer: bytes
    observed: Address


@dataclass(frozen=True, slots=True)
class Send:
    destination: bytes
    payload: bytes


@dataclass(frozen=True, slots=True)
class Recv:
    source: bytes
    payload: bytes


@dataclass(frozen=True, slots=True)
class TicketFrame:
    ticket: bytes


@dataclass(frozen=True, slots=True)
class RelayErrorFrame:
    code: RelayErrorCode
    message: str = ""


@dataclass(frozen=True, slots=True)
class Ping:
    nonce: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    nonce: bytes


RelayFrame = (
    Hello | Register | Registered | Send | Recv | TicketFrame | RelayErrorFrame | Ping | Pong
)


def encode_relay(frame: RelayFrame) -> bytes:
    if isinstance(frame, Hello):
        _check_len("challenge", frame.challenge, CHALLENGE_LEN)
        _check_len("relay key", frame.relay_key, KEY_LEN)
        return bytes([RelayType.HELLO]) + frame.challenge + frame.relay_key
    if isinstance(frame, Register):
        _check_len("static key", frame.static_key, KEY_LEN)
        _check_len("ticket key", frame.ticket_key, KEY_LEN)
        _check_len("challenge", frame.challenge, CHALLENGE_LEN)
        _check_len("proof", frame.proof, MAC_LEN)
        return (
            bytes([RelayType.REGISTER])
            + frame.static_key
            + frame.ticket_key
            + frame.challenge
            + frame.proof
        )
    if isinstance(frame, Registered):
        _check_len("peer id", frame.peer, PEER_ID_LEN)
        return bytes([RelayType.REGISTERED]) + frame.peer + encode_address(frame.observed)
    if isinstance(frame, Send):
        _check_len("destination", frame.destination, PEER_ID_LEN)
        return bytes([RelayType.SEND]) + frame.destination + frame.payload
    if isinstance(frame, Recv):
        _check_len("source", frame.source, PEER_ID_LEN)
        return bytes([RelayType.RECV]) + frame.source + frame.payload
    if isinstance(frame, TicketFrame):
        _check_len("ticket", frame.ticket, TICKET_LEN)
        return bytes([RelayType.TICKET]) + frame.ticket
    if isinstance(frame, RelayErrorFrame):
        return bytes([RelayType.ERROR, frame.code]) + frame.message.encode()[:512]
    if isinstance(frame, Ping):
        _check_len("nonce", frame.nonce, 8)
        return bytes([RelayType.PING]) + frame.nonce
    if isinstance(frame, Pong):
        _check_len("nonce", frame.nonce, 8)
        return bytes([RelayType.PONG]) + frame.nonce
    raise WireError(f"not a relay frame: {type(frame).__name__}")


def decode_relay(data: bytes) -> RelayFrame:
    if not data:
        raise WireError("empty relay frame")
    kind, body = data[0], data[1:]

    def exact(size: int, what: str) -> None:
        if len(body) != size:
            raise WireError(f"{what} is {size + 1} bytes")

    if kind == RelayType.HELLO:
        exact(CHALLENGE_LEN + KEY_LEN, "a relay hello")
        return Hello(body[:CHALLENGE_LEN], body[CHALLENGE_LEN:])
    if kind == RelayType.REGISTER:
        exact(2 * KEY_LEN + CHALLENGE_LEN + MAC_LEN, "a register frame")
        return Register(body[:32], body[32:64], body[64:80], body[80:96])
    if kind == RelayType.REGISTERED:
        if len(body) < PEER_ID_LEN:
            raise WireError("truncated registered frame")
        observed, end = decode_address(body, PEER_ID_LEN)
        if end != len(body):
            raise WireError("trailing bytes after a registered frame")
        return Registered(body[:PEER_ID_LEN], observed)
    if kind in (RelayType.SEND, RelayType.RECV):
        if len(body) < PEER_ID_LEN:
            raise WireError("truncated relay data frame")
        peer, payload = body[:PEER_ID_LEN], body[PEER_ID_LEN:]
        return Send(peer, payload) if kind == RelayType.SEND else Recv(peer, payload)
    if kind == RelayType.TICKET:
        exact(TICKET_LEN, "a ticket frame")
        return TicketFrame(body)
    if kind == RelayType.ERROR:
        if not body:
            raise WireError("truncated relay error")
        try:
            return RelayErrorFrame(RelayErrorCode(body[0]), body[1:].decode())
        except (ValueError, UnicodeDecodeError):
            raise WireError("bad relay error frame") from None
    if kind in (RelayType.PING, RelayType.PONG):
        exact(8, "a ping or pong")
        return Ping(body) if kind == RelayType.PING else Pong(body)
    raise WireError(f"unknown relay frame 0x{kind:02x}")


# --- tickets ------------------------------------------------------------------------------------

TICKET_SIGNING_PREFIX = b"lazycat tkt"
ANY_CLIENT = bytes(PEER_ID_LEN)


@dataclass(frozen=True, slots=True)
class Ticket:
    """A box's permission for a client (or, with ANY_CLIENT, any client: pairing) to reach it
    through a relay until ``expires``. Signed by the box's Ed25519 ticket key."""

    box: bytes
    client: bytes
    expires: int
    signature: bytes = bytes(64)

    def body(self) -> bytes:
        return self.box + self.client + struct.pack("!Q", self.expires)

    def signed_message(self) -> bytes:
        return TICKET_SIGNING_PREFIX + self.body()

    def encode(self) -> bytes:
        _check_len("box id", self.box, PEER_ID_LEN)
        _check_len("client id", self.client, PEER_ID_LEN)
        _check_len("signature", self.signature, 64)
        return self.body() + self.signature

    @classmethod
    def decode(cls, data: bytes) -> Ticket:
        if len(data) != TICKET_LEN:
            raise WireError(f"a ticket is {TICKET_LEN} bytes")
        (expires,) = struct.unpack_from("!Q", data, 2 * PEER_ID_LEN)
        return cls(data[:16], data[16:32], expires, data[TICKET_BODY_LEN:])


# --- framing over streams (TCP, TLS) ------------------------------------------------------------


def frame_stream(frame: bytes) -> bytes:
    """Length-prefix one relay frame for a byte stream."""
    if len(frame) > MAX_FRAME:
        raise WireError(f"frame of {len(frame)} bytes is larger than {MAX_FRAME}")
    return struct.pack("!H", len(frame)) + frame


class StreamDecoder:
    """Feed bytes from a stream, get whole frames back (sans-IO)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= 2:
            (size,) = struct.unpack_from("!H", self._buffer)
            if size == 0:
                raise WireError("an empty frame on the stream")
            if len(self._buffer) < 2 + size:
                break
            frames.append(bytes(self._buffer[2 : 2 + size]))
            del self._buffer[: 2 + size]
        return frames
