"""Encrypted tunnel sessions between a client device and the box (sans-IO).

A :class:`Session` is one peer's tunnel, known by the peer's static X25519 key — never by its
address. An :class:`Endpoint` owns the sessions of one static key (the box's or a client's), the
handshakes in flight and the table of 32-bit session indices every tunnel message is routed by
(``transport.wire``: HANDSHAKE_*, COOKIE_REPLY, TRANSPORT). It takes datagrams and the time and
gives back events, datagrams and its next deadline; it never touches a socket or reads a clock.

Handshakes (Noise, with ``noiseprotocol`` for the handshake only)
================================================================

Prologue ``wire.NOISE_PROLOGUE``; protocols ``wire.NOISE_PROTOCOLS`` (Noise spec section 7.5)::

    IK  (an approved device reconnecting: 1 round trip)     XK  (first contact: pairing)
      <- s                                                    <- s
      ...                                                     ...
      -> e, es, s, ss   payload: TAI64N timestamp (12)        -> e, es          payload: empty
      <- e, ee, se      payload: empty                        <- e, ee          payload: empty
                                                              -> s, se          payload: pairing

* The client always initiates; the box only responds (it has no address for a client until the
  client speaks). The client knows the box's static key from the pairing code in both patterns.
* **IK**: the box learns the client's key from message 1 and asks ``is_allowed(key)`` before it
  sends anything back: an unknown or unapproved key gets no answer at all.
* **First-message replay** (WireGuard paper section 5.1): IK message 1 carries a TAI64N
  timestamp; the box remembers the greatest one per client key and ignores a message 1 that is
  not newer. Timestamps come from the wall clock the caller passes (``wall``, seconds since the
  epoch), not from the monotonic ``now``; nanoseconds are rounded down to 2**24 ns as WireGuard
  does, so timestamps do not leak fine timing.
* **XK** is accepted only when the endpoint allows pairing. Message 3 carries the pairing payload
  ``secret (16) | facts (compact JSON object, utf-8, at most 1024 bytes)``, handed up as
  :class:`PairingRequested`. A session made with XK is a **pairing session**: it carries only
  PAIR_STATE, CONTROL and KEEPALIVE frames — :meth:`Session.send` refuses anything else and the
  receiver drops it — until the box says APPROVED and the client reconnects with IK (the box
  then closes the pairing session for that key). ``PairingRequested`` repeats for the same key
  when a pairing session rekeys (every 2 minutes) or the client retries: handle it idempotently.
* After the last handshake message both sides take Noise's split() keys (the ``k`` of the two
  CipherStates noiseprotocol leaves in ``noise_protocol.cipher_state_encrypt/decrypt``) and
  never use noiseprotocol's encrypt/decrypt, whose implicit nonces break on loss or reordering.

mac1, mac2 and cookies (WireGuard paper sections 5.4.4-5.4.7, adapted)
=====================================================================

Every handshake message ends ``mac1 (16) | mac2 (16)``. All macs are keyed BLAKE2s-128; the
responder's (box's) static public key ``S`` keys them in both directions, since only the client
initiates and it always knows ``S``::

    mac1 = BLAKE2s-128(key = BLAKE2s-256("mac1----" | S), message up to mac1)
    mac2 = BLAKE2s-128(key = cookie, message up to mac2)          (zeros without a cookie)
    cookie = BLAKE2s-128(key = secret, source address as wire.encode_address)
             (secret: 32 random bytes, replaced every 120 s)
    COOKIE_REPLY = receiver (the initiation's sender) | nonce (12, random) |
                   ChaCha20-Poly1305(key = BLAKE2s-256("cookie--" | S), nonce, cookie,
                                     AD = mac1 of the initiation it answers)

A message with a bad mac1 is dropped silently, before any Diffie-Hellman. A responder **under
load** (``Endpoint.under_load`` set, or more than ``load_threshold`` initiations with a good mac1
within one second, and for one second after) answers an initiation without a valid mac2 with a
COOKIE_REPLY and does nothing else; the initiator resends the same initiation at once with mac2
(only one cookie reply is honoured per initiation) and keeps the cookie for 115 s. Independently
of load, the responder takes initiations from one source (IPv4 address, IPv6 /64) at most
``handshake_rate`` per second with a burst of ``handshake_burst`` (token bucket).

Transport
=========

``TRANSPORT = 0x05 | 0 | receiver (4) | counter (8) | ChaCha20-Poly1305(inner frame) + tag``,
nonce ``wire.aead_nonce(counter)``, associated data the 14-byte header
(``wire.transport_header``). Counters start at 0 per keypair and are checked after
authentication against a sliding window of 8192 (``transport.replay``, RFC 6479).

Timers (WireGuard paper section 6, same constants)
==================================================

* The initiator starts a new handshake when its keys are ``REKEY_AFTER_TIME`` (120 s) old —
  unconditionally while the session is open, unlike WireGuard which waits for traffic, because a
  lazycat client keeps its tunnel ready for the box to reach it — or after
  ``REKEY_AFTER_MESSAGES``; and when it sent data (or XK message 3, which the box answers with
  a PAIR_STATE) and heard nothing for ``KEEPALIVE_TIMEOUT + REKEY_TIMEOUT`` (15 s).
* Keys older than ``REJECT_AFTER_TIME`` (180 s), or past ``REJECT_AFTER_MESSAGES``, neither send
  nor receive. A responder session left without usable keys is closed (:class:`SessionClosed`).
* Each side keeps the previous, current and next keypair, so packets in flight across a rekey
  still decrypt. The responder keeps a fresh keypair as *next* and sends with it only once the
  initiator has used it (key confirmation); the initiator confirms at once with a keepalive.
* Passive keepalive: having received data and sent nothing for ``KEEPALIVE_TIMEOUT`` (10 s),
  send a keepalive. Keepalives themselves are not answered.
* Handshake retries: a new initiation every ``REKEY_TIMEOUT`` (5 s) plus 0-333 ms of jitter (the
  ``rng`` given to the endpoint); after ``REKEY_ATTEMPT_TIME`` (90 s) give up with
  :class:`HandshakeFailed`. A later :meth:`Session.send` starts again.

Roaming
=======

Every *authenticated* message (a transport message that decrypts, a valid handshake message)
from a source address the session did not have sets :attr:`Session.address` and, when it
replaces a known one, emits :class:`EndpointChanged`. Unauthenticated datagrams never do.
Neither do datagrams the caller received with ``roam=False``: those that came through a relay
(``transport.peer`` passes a relay placeholder as their source, so replies to them can go back
the same way, but a relay is not an address of the peer and must not become the session's).

Using it
========

::

    box = Endpoint(box_keys, is_allowed=approved_keys.__contains__, allow_pairing=True)
    client = Endpoint(client_keys)
    session = client.connect(box_keys.public)
    sock.sendto(session.initiate(now, wall), box_address)       # the path layer picks the address
    for event in box.receive(data, source, now, wall): ...      # HandshakeCompleted, FrameReceived…
    for datagram in box.datagrams_to_send(): ...                # replies, keepalives, retries
    deadline = box.next_timer(); ...; box.handle_timer(now, wall)
    sock.sendto(session.send(frame, now), where)                # None: no usable keys right now

Where bytes go is the caller's choice (``transport/paths.py`` chooses per send, direct or relay):
:meth:`Session.send` and :meth:`Session.initiate` return bytes only. Queued datagrams carry the
address they answer (the source of the message that caused them) or the session's
:attr:`Session.address` (``None`` when not known yet) as a suggestion, and the peer's key.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import json
import math
import random
import secrets
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from noise.backends.default.keypairs import KeyPair25519 as NoiseKeyPair25519
from noise.connection import Keypair as NoiseKeypair
from noise.connection import NoiseConnection

from transport import wire
from transport.ratelimit import KeyedBuckets
from transport.replay import ReplayWindow

Address = wire.Address

# --- constants (WireGuard paper section 6.1 unless said otherwise) --------------------------------

REKEY_AFTER_MESSAGES = 2**60
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER = 1 / 3  # up to 333 ms added to each retry (section 6.1)
KEEPALIVE_TIMEOUT = 10.0
COOKIE_SECRET_MAX_AGE = 120.0
COOKIE_SECRET_LATENCY = 5.0  # an initiator stops using a cookie 5 s before it could go stale

PENDING_RESPONSE_TIMEOUT = 2 * REKEY_TIMEOUT  # a half-open XK handshake at the responder
MAX_PENDING_RESPONSES = 4096
MAX_PAIRING_SESSIONS = 1024
TIMESTAMP_LEN = 12
PAIRING_SECRET_LEN = 16
MAX_FACTS_LEN = 1024

DEFAULT_HANDSHAKE_RATE = 20.0  # initiations per second per source
DEFAULT_HANDSHAKE_BURST = 40.0
DEFAULT_LOAD_THRESHOLD = 256  # initiations per second before cookies are required

_LABEL_MAC1 = b"mac1----"
_LABEL_COOKIE = b"cookie--"
_ZERO_MAC = bytes(wire.MAC_LEN)
_KEEPALIVE = bytes([wire.Inner.KEEPALIVE])
_KEEPALIVE_FRAME = wire.Keepalive()
_PACKET = bytes([wire.Inner.PACKET])

# Noise message sizes (DH 32, tag 16): anything else is dropped before any Diffie-Hellman.
_IK1 = 32 + (32 + 16) + (TIMESTAMP_LEN + 16)  # e, s, payload
_IK2 = 32 + 16  # e, empty payload
_XK1 = 32 + 16
_XK2 = 32 + 16
_XK3_MIN = (32 + 16) + (PAIRING_SECRET_LEN + 16)
_XK3_MAX = _XK3_MIN + MAX_FACTS_LEN
_INIT_NOISE_LEN = {wire.Pattern.IK: _IK1, wire.Pattern.XK: _XK1}
_RESP_NOISE_LEN = {wire.Pattern.IK: _IK2, wire.Pattern.XK: _XK2}

# Same bytes as wire.transport_header / wire.aead_nonce, kept as Structs for the per-packet path.
_TRANSPORT_HEAD = struct.Struct("!BBIQ")
_NONCE = struct.Struct("<4xQ")  # 4 zero bytes, then the counter little-endian (as WireGuard)
_HEAD_LEN = wire.TRANSPORT_HEADER_LEN
_MIN_TRANSPORT = _HEAD_LEN + wire.TAG_LEN + 1  # an inner frame is at least its kind byte
_TAI64N = struct.Struct(">QI")
_TAI64_EPOCH = 0x400000000000000A  # 2**62 + 10 s of TAI-UTC offset, as WireGuard

_PAIRING_FRAMES = (wire.PairStateFrame, wire.Control, wire.Keepalive)


class SessionError(RuntimeError):
    """A call the session cannot honour (a PACKET on a pairing session, a bad argument)."""


# --- keys and small crypto helpers ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Keys:
    """A static X25519 key pair (RFC 7748): what identifies a box or a device."""

    private: bytes = field(repr=False)
    public: bytes

    @classmethod
    def generate(cls) -> Keys:
        return cls.from_private(X25519PrivateKey.generate().private_bytes_raw())

    @classmethod
    def from_private(cls, private: bytes) -> Keys:
        if not isinstance(private, bytes) or len(private) != wire.KEY_LEN:
            raise ValueError("an X25519 private key is 32 bytes")
        public = X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
        return cls(private, public)


def _hash(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def _mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, key=key, digest_size=wire.MAC_LEN).digest()


def mac1_key(responder_static: bytes) -> bytes:
    """BLAKE2s("mac1----" | responder static public key): the key of every mac1."""
    return _hash(_LABEL_MAC1 + responder_static)


def cookie_key(responder_static: bytes) -> bytes:
    """BLAKE2s("cookie--" | responder static public key): the key a cookie travels under."""
    return _hash(_LABEL_COOKIE + responder_static)


def tai64n(wall: float) -> bytes:
    """The 12-byte TAI64N label of a wall-clock time, nanoseconds rounded down to 2**24 ns
    (WireGuard's whitening: at most one distinct timestamp per ~17 ms)."""
    seconds = max(0, math.floor(wall))
    nanos = min(int((wall - seconds) * 1e9), 999_999_999) & ~0xFFFFFF
    return _TAI64N.pack(_TAI64_EPOCH + seconds, max(0, nanos))


def _address_bytes(source: Address) -> bytes:
    try:
        return wire.encode_address(source)
    except (wire.WireError, AttributeError, TypeError, ValueError):
        return repr(source).encode()  # not an IP address (a relay's pseudo-address): still unique


def _rate_key(source: Address) -> bytes:
    """Rate limits apply per IPv4 address and per IPv6 /64 (one host's usual share)."""
    try:
        ip = ip_address(str(source[0]).split("%", 1)[0])
    except (ValueError, TypeError, IndexError):
        return repr(source).encode()
    return ip.packed if ip.version == 4 else ip.packed[:8]


# --- events and datagrams -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class HandshakeCompleted:
    """New keys are in use. The initiator says so on the response (IK) or after sending message
    3 (XK); the responder once the initiator has used the keys (IK) or on message 3 (XK)."""

    peer_key: bytes
    pattern: wire.Pattern
    session: Session


@dataclass(frozen=True, slots=True, eq=False)
class PairingRequested:
    """A device finished an XK handshake carrying a pairing secret and its facts (box side). The
    secret is not checked here: that, the rate limits on codes and the audit are the box's."""

    peer_key: bytes
    secret: bytes
    facts: dict[str, Any]
    source: Address
    session: Session


@dataclass(frozen=True, slots=True, eq=False)
class FrameReceived:
    """An authenticated inner frame. Keepalives are reported too (as ``wire.Keepalive()``):
    they carry nothing, but they prove the path they came on is alive (``transport.paths``)."""

    peer_key: bytes
    frame: wire.InnerFrame
    source: Address
    session: Session


@dataclass(frozen=True, slots=True, eq=False)
class EndpointChanged:
    """An authenticated message came from a new address: replies go there now (roaming)."""

    peer_key: bytes
    old: Address | None
    new: Address
    session: Session


@dataclass(frozen=True, slots=True, eq=False)
class CookieRequired:
    """The responder is under load and sent a cookie; the initiation was resent with mac2."""

    peer_key: bytes
    session: Session


@dataclass(frozen=True, slots=True, eq=False)
class HandshakeFailed:
    """A handshake did not happen: the initiator gave up, or (box side) a key that is not
    allowed, a replayed or stale IK initiation, or a bad pairing payload."""

    peer_key: bytes | None
    reason: str
    source: Address | None = None


@dataclass(frozen=True, slots=True, eq=False)
class SessionClosed:
    """A responder session has no usable keys left, or a pairing session gave way to IK."""

    peer_key: bytes
    session: Session
    reason: str


Event = (
    HandshakeCompleted
    | PairingRequested
    | FrameReceived
    | EndpointChanged
    | CookieRequired
    | HandshakeFailed
    | SessionClosed
)


class Datagram(NamedTuple):
    """Bytes the endpoint wants sent: to ``destination`` if the caller has no better idea
    (``None``: the session's address is not known yet, use the peer's path)."""

    data: bytes
    destination: Address | None
    peer_key: bytes | None


# --- per-handshake and per-keypair state --------------------------------------------------------


class _Keypair:
    """Transport keys from one handshake: AEAD objects built once, the counter, the window."""

    __slots__ = (
        "created",
        "expires",
        "local_index",
        "opener",
        "rekey_at",
        "remote_index",
        "sealer",
        "send_counter",
        "session",
        "window",
    )

    def __init__(
        self,
        session: Session,
        local_index: int,
        remote_index: int,
        send_key: bytes,
        receive_key: bytes,
        now: float,
    ) -> None:
        self.session = session
        self.local_index = local_index
        self.remote_index = remote_index
        self.sealer = ChaCha20Poly1305(send_key)
        self.opener = ChaCha20Poly1305(receive_key)
        self.created = now
        self.rekey_at = now + REKEY_AFTER_TIME
        self.expires = now + REJECT_AFTER_TIME
        self.send_counter = 0
        self.window = ReplayWindow()


class _Initiation:
    """The initiator's handshake in flight (one per session; a retry replaces it)."""

    __slots__ = (
        "conn",
        "cookie_answered",
        "give_up_at",
        "local_index",
        "mac1",
        "message",
        "retry_at",
        "session",
        "started",
    )

    def __init__(
        self,
        session: Session,
        conn: Any,
        local_index: int,
        message: bytes,
        mac1: bytes,
        started: float,
        retry_at: float,
    ) -> None:
        self.session = session
        self.conn = conn
        self.local_index = local_index
        self.message = message
        self.mac1 = mac1
        self.started = started
        self.give_up_at = started + REKEY_ATTEMPT_TIME
        self.retry_at = retry_at
        self.cookie_answered = False


class _PendingResponse:
    """A responder's half-open XK handshake, waiting for message 3."""

    __slots__ = ("conn", "expires", "local_index", "remote_index", "state")

    def __init__(self, conn: Any, local_index: int, remote_index: int, now: float) -> None:
        self.conn = conn
        self.state = conn.noise_protocol.handshake_state  # noiseprotocol drops it on finishing
        self.local_index = local_index
        self.remote_index = remote_index
        self.expires = now + PENDING_RESPONSE_TIMEOUT


# --- sessions -----------------------------------------------------------------------------------


class Session:
    """One peer's tunnel, identified by ``peer_key`` (its static public key). Made by an
    :class:`Endpoint` (:meth:`Endpoint.connect`, :meth:`Endpoint.pair`, or an incoming
    handshake), never directly."""

    def __init__(
        self,
        owner: Endpoint,
        peer_key: bytes,
        pattern: wire.Pattern,
        is_initiator: bool,
        address: Address | None = None,
        pairing_payload: bytes = b"",
    ) -> None:
        self.peer_key = peer_key
        self.pattern = pattern
        self.is_initiator = is_initiator
        self.address: Address | None = address  # where replies go: the last authenticated source
        self.closed = False
        self.last_received: float | None = None
        self.last_sent: float | None = None
        self._owner = owner
        self._current: _Keypair | None = None
        self._previous: _Keypair | None = None
        self._next: _Keypair | None = None
        self._initiation: _Initiation | None = None
        self._rekeyed: _Keypair | None = None  # the keypair a time-based rekey was started for
        self._keepalive_at: float | None = None
        self._reply_expected_by: float | None = None
        self._scheduled: float | None = None  # the deadline the endpoint's heap holds for us
        self._pairing_payload = pairing_payload
        self._cookie: bytes | None = None
        self._cookie_until = -math.inf
        self._mac1_key = mac1_key(peer_key) if is_initiator else b""
        self._cookie_opener = ChaCha20Poly1305(cookie_key(peer_key)) if is_initiator else None

    def __repr__(self) -> str:
        role = "initiator" if self.is_initiator else "responder"
        return f"<Session {self.peer_key[:4].hex()}… {self.pattern.name} {role} {self.address}>"

    @property
    def is_pairing(self) -> bool:
        """A session made with XK: pairing traffic only, never PACKET (see the module doc)."""
        return self.pattern is wire.Pattern.XK

    @property
    def established(self) -> bool:
        """Whether the session has keys to send with (they may still be too old: see send)."""
        return self._current is not None

    def keys_age(self, now: float) -> float | None:
        """Seconds since the current keys were made, or None without keys."""
        return None if self._current is None else now - self._current.created

    # --- sending ----------------------------------------------------------------------------

    def initiate(self, now: float, wall: float) -> bytes:
        """Start a handshake now (initiator side) and return the HANDSHAKE_INIT to send. Retries
        and later rekeys come out of :meth:`Endpoint.datagrams_to_send`."""
        if not self.is_initiator:
            raise SessionError("only the initiator (the client) starts handshakes")
        if self.closed:
            raise SessionError("the session is closed")
        self._owner._learn_wall(now, wall)
        return self._owner._begin_handshake(self, now, fresh=True)

    def send(self, frame: wire.InnerFrame, now: float) -> bytes | None:
        """Encrypt one inner frame as a TRANSPORT message, or None if there are no usable keys
        (the initiator then starts a handshake; its datagram is queued). Raises SessionError
        for a frame a pairing session may not carry."""
        if self.pattern is wire.Pattern.XK and not isinstance(frame, _PAIRING_FRAMES):
            raise SessionError(
                f"a pairing session carries no {type(frame).__name__}: reconnect with IK"
            )
        return self._seal(wire.encode_inner(frame), now, isinstance(frame, wire.Keepalive))

    def send_packet(self, packet: bytes, now: float) -> bytes | None:
        """:meth:`send` for an IP packet without building a ``wire.Packet``: the TUN fast path."""
        if self.pattern is wire.Pattern.XK:
            raise SessionError("a pairing session carries no packets: reconnect with IK")
        return self._seal(_PACKET + packet, now, False)

    def close(self) -> None:
        """Forget every key and handshake of this session (no message is sent)."""
        self._owner._close(self)

    def _seal(self, plaintext: bytes, now: float, keepalive: bool) -> bytes | None:
        keys = self._current
        if self.closed:
            return None
        if keys is None or now >= keys.expires or keys.send_counter >= REJECT_AFTER_MESSAGES:
            if self.is_initiator and self._initiation is None:
                self._owner._rekey(self, now)
            return None
        counter = keys.send_counter
        keys.send_counter = counter + 1
        header = _TRANSPORT_HEAD.pack(wire.MessageType.TRANSPORT, 0, keys.remote_index, counter)
        sealed = header + keys.sealer.encrypt(_NONCE.pack(counter), plaintext, header)
        self.last_sent = now
        self._keepalive_at = None  # anything sent doubles as a keepalive
        if self.is_initiator:
            if not keepalive and self._reply_expected_by is None:
                self._reply_expected_by = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
            if self._initiation is None and counter >= REKEY_AFTER_MESSAGES:
                self._owner._rekey(self, now)
        self._owner._dirty.add(self)
        return sealed

    # --- keys ---------------------------------------------------------------------------------

    def _install(self, keys: _Keypair, confirmed: bool) -> None:
        """Put fresh keys in place: as current (confirmed) or as next (responder, IK)."""
        index = self._owner._index
        if confirmed:
            if self._previous is not None:
                index.pop(self._previous.local_index, None)
            if self._next is not None and self._next is not keys:
                index.pop(self._next.local_index, None)
                self._next = None
            self._previous = self._current
            self._current = keys
        else:
            if self._next is not None:
                index.pop(self._next.local_index, None)
            self._next = keys
        index[keys.local_index] = keys
        self._owner._dirty.add(self)

    def _keypairs(self) -> list[_Keypair]:
        return [k for k in (self._previous, self._current, self._next) if k is not None]

    def _deadline(self) -> float | None:
        if self.closed:
            return None
        deadlines = [keys.expires for keys in self._keypairs()]
        initiation = self._initiation
        if initiation is not None:
            deadlines.append(min(initiation.retry_at, initiation.give_up_at))
        elif self.is_initiator and self._current is not None and self._rekeyed is not self._current:
            deadlines.append(self._current.rekey_at)
        if self._keepalive_at is not None:
            deadlines.append(self._keepalive_at)
        if self._reply_expected_by is not None:
            deadlines.append(self._reply_expected_by)
        return min(deadlines) if deadlines else None


# --- the endpoint -------------------------------------------------------------------------------


class Endpoint:
    """All sessions of one static key, routed by session index (sans-IO).

    ``is_allowed(static_key)`` makes this endpoint answer IK handshakes (the box); it is asked
    before anything is sent back. ``allow_pairing`` makes it answer XK handshakes. Without
    either it only initiates (a client). ``rng`` draws retry jitter (tests pass a seeded one).
    """

    def __init__(
        self,
        keys: Keys,
        *,
        is_allowed: Callable[[bytes], bool] | None = None,
        allow_pairing: bool = False,
        rng: random.Random | None = None,
        handshake_rate: float = DEFAULT_HANDSHAKE_RATE,
        handshake_burst: float = DEFAULT_HANDSHAKE_BURST,
        load_threshold: int = DEFAULT_LOAD_THRESHOLD,
    ) -> None:
        self.keys = keys
        self.under_load = False  # set to demand cookies whatever the rate
        self.load_threshold = load_threshold
        self.stats: Counter[str] = Counter()  # why datagrams were dropped, for metrics
        self._is_allowed = is_allowed
        self._allow_pairing = allow_pairing
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter only
        self._limiter = KeyedBuckets(handshake_rate, handshake_burst)
        self._noise_static = NoiseKeyPair25519.from_private_bytes(keys.private)
        self._mac1_key = mac1_key(keys.public)
        self._cookie_sealer = ChaCha20Poly1305(cookie_key(keys.public))
        self._cookie_secret = b""
        self._cookie_secret_until = -math.inf
        self._load_second = -math.inf
        self._load_count = 0
        self._load_until = -math.inf
        self._index: dict[int, _Keypair | _Initiation | _PendingResponse] = {}
        self._pending: OrderedDict[int, _PendingResponse] = OrderedDict()
        self._sessions: dict[tuple[bytes, wire.Pattern], Session] = {}
        self._timestamps: dict[bytes, bytes] = {}
        self._outbox: list[Datagram] = []
        self._heap: list[tuple[float, int, Session]] = []
        self._dirty: set[Session] = set()
        self._sequence = itertools.count()
        self._wall_offset: float | None = None
        self._roam = True  # the current datagram's roam flag (see receive)

    # --- sessions -----------------------------------------------------------------------------

    def connect(self, peer_key: bytes, *, address: Address | None = None) -> Session:
        """The IK session to ``peer_key`` (made if there is none); call ``initiate`` on it."""
        _check_key(peer_key)
        session = self._sessions.get((peer_key, wire.Pattern.IK))
        if session is None:
            session = Session(self, peer_key, wire.Pattern.IK, True, address)
            self._sessions[(peer_key, wire.Pattern.IK)] = session
        return session

    def pair(
        self,
        peer_key: bytes,
        secret: bytes,
        facts: dict[str, Any],
        *,
        address: Address | None = None,
    ) -> Session:
        """A new XK pairing session to the box ``peer_key`` carrying ``secret`` and ``facts``
        (name, OS, model, client version…); call ``initiate`` on it."""
        _check_key(peer_key)
        if not isinstance(secret, bytes) or len(secret) != PAIRING_SECRET_LEN:
            raise SessionError("the pairing secret is 16 bytes")
        encoded = json.dumps(facts, separators=(",", ":"), sort_keys=True).encode()
        if len(encoded) > MAX_FACTS_LEN:
            raise SessionError(f"device facts take {len(encoded)} bytes; at most {MAX_FACTS_LEN}")
        old = self._sessions.get((peer_key, wire.Pattern.XK))
        if old is not None:
            self._close(old)
        session = Session(self, peer_key, wire.Pattern.XK, True, address, secret + encoded)
        self._sessions[(peer_key, wire.Pattern.XK)] = session
        return session

    def session(self, peer_key: bytes, pattern: wire.Pattern = wire.Pattern.IK) -> Session | None:
        return self._sessions.get((peer_key, pattern))

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    # --- the sans-IO surface --------------------------------------------------------------------

    def receive(
        self,
        data: bytes,
        source: Address,
        now: float,
        wall: float | None = None,
        *,
        roam: bool = True,
    ) -> list[Event]:
        """Take one tunnel datagram from ``source``. Never raises on any input: what cannot be
        used is dropped (and counted in :attr:`stats`). ``roam=False``: ``source`` is not the
        peer's address (a relay placeholder), so it never becomes :attr:`Session.address`;
        replies caused by this datagram are still queued to it."""
        if wall is not None:
            self._learn_wall(now, wall)
        events: list[Event] = []
        if not data:
            self.stats["empty"] += 1
            return events
        kind = data[0]
        self._roam = roam
        try:
            if kind == wire.MessageType.TRANSPORT:
                self._on_transport(data, source, now, events)
            elif kind == wire.MessageType.HANDSHAKE_INIT:
                self._on_initiation(data, source, now, events)
            elif kind == wire.MessageType.HANDSHAKE_RESP:
                self._on_response(data, source, now, events)
            elif kind == wire.MessageType.HANDSHAKE_FINAL:
                self._on_final(data, source, now, events)
            elif kind == wire.MessageType.COOKIE_REPLY:
                self._on_cookie_reply(data, source, now, events)
            else:
                self.stats["not_tunnel"] += 1
        except wire.WireError:
            self.stats["malformed"] += 1
        finally:
            self._roam = True
        return events

    def datagrams_to_send(self) -> list[Datagram]:
        """Handshake replies, cookie replies, retries and keepalives queued since the last call."""
        out, self._outbox = self._outbox, []
        return out

    def next_timer(self) -> float | None:
        """When to call :meth:`handle_timer` next (it may find nothing due), or None."""
        heap = self._heap
        for session in self._dirty:
            deadline = session._deadline()
            # Only a deadline that moved earlier is pushed: a later one is found when the
            # earlier entry fires (a spurious wake-up), so the heap holds about one entry per
            # session however often per-packet timers (keepalive) move.
            if deadline is not None and (
                session._scheduled is None or deadline < session._scheduled
            ):
                session._scheduled = deadline
                heapq.heappush(heap, (deadline, next(self._sequence), session))
        self._dirty.clear()
        while heap and (heap[0][2].closed or heap[0][0] != heap[0][2]._scheduled):
            heapq.heappop(heap)  # superseded by a later deadline of the same session
        return heap[0][0] if heap else None

    def handle_timer(self, now: float, wall: float | None = None) -> list[Event]:
        """Run every timer due at ``now``: retries, rekeys, keepalives, expiry."""
        if wall is not None:
            self._learn_wall(now, wall)
        events: list[Event] = []
        self.next_timer()
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, session = heapq.heappop(heap)
            if session.closed or deadline != session._scheduled:
                continue
            session._scheduled = None
            self._on_timer(session, now, events)
            self._dirty.add(session)
        self._prune_pending(now)
        return events

    # --- transport ----------------------------------------------------------------------------

    def _on_transport(self, data: bytes, source: Address, now: float, events: list[Event]) -> None:
        if len(data) < _MIN_TRANSPORT:
            self.stats["short"] += 1
            return
        _, _, receiver, counter = _TRANSPORT_HEAD.unpack_from(data)
        keys = self._index.get(receiver)
        if type(keys) is not _Keypair:
            self.stats["unknown_index"] += 1
            return
        if now >= keys.expires or counter >= REJECT_AFTER_MESSAGES:
            self.stats["expired_keys"] += 1
            return
        window = keys.window
        if not window.check(counter):
            self.stats["replay"] += 1
            return
        view = memoryview(data)
        try:
            plaintext = keys.opener.decrypt(
                _NONCE.pack(counter), view[_HEAD_LEN:], view[:_HEAD_LEN]
            )
        except InvalidTag:
            self.stats["bad_tag"] += 1
            return
        window.accept(counter)  # only now: a forgery must not move the window
        session = keys.session
        self._authenticated(session, keys, source, now, events)
        if plaintext == _KEEPALIVE:
            # Reported (it proves the path alive) but never answered, so no passive keepalive.
            events.append(FrameReceived(session.peer_key, _KEEPALIVE_FRAME, source, session))
            return
        try:
            frame = wire.decode_inner(plaintext)
        except wire.WireError:
            self.stats["bad_frame"] += 1
            return
        if session.pattern is wire.Pattern.XK and not isinstance(frame, _PAIRING_FRAMES):
            self.stats["refused_on_pairing_session"] += 1
            return
        if session._keepalive_at is None:
            session._keepalive_at = now + KEEPALIVE_TIMEOUT  # passive keepalive (section 6.5)
        events.append(FrameReceived(session.peer_key, frame, source, session))

    def _authenticated(
        self,
        session: Session,
        keys: _Keypair | None,
        source: Address,
        now: float,
        events: list[Event],
    ) -> None:
        """Bookkeeping for any authenticated message: key confirmation, roaming, timers."""
        if keys is not None and keys is session._next:
            session._next = None
            session._install(keys, confirmed=True)  # the initiator has the keys: confirmed
            events.append(HandshakeCompleted(session.peer_key, session.pattern, session))
            if session.pattern is wire.Pattern.IK:
                pairing = self._sessions.get((session.peer_key, wire.Pattern.XK))
                if pairing is not None and not pairing.is_initiator:
                    self._close(pairing)
                    events.append(SessionClosed(pairing.peer_key, pairing, "reconnected with IK"))
        session.last_received = now
        session._reply_expected_by = None
        if self._roam and source != session.address:
            old, session.address = session.address, source
            if old is not None:
                events.append(EndpointChanged(session.peer_key, old, source, session))
        self._dirty.add(session)

    # --- handshakes: responder --------------------------------------------------------------

    def _on_initiation(self, data: bytes, source: Address, now: float, events: list[Event]) -> None:
        if self._is_allowed is None and not self._allow_pairing:
            self.stats["not_responder"] += 1
            return
        msg = wire.decode_tunnel(data)
        assert isinstance(msg, wire.HandshakeInit)
        if len(msg.noise) != _INIT_NOISE_LEN[msg.pattern]:
            self.stats["bad_length"] += 1
            return
        if not hmac.compare_digest(_mac(self._mac1_key, data[: -2 * wire.MAC_LEN]), msg.mac1):
            self.stats["bad_mac1"] += 1  # silently: not even a cookie (section 5.4.7)
            return
        if self._count_load(now):
            cookie = self._cookie(source, now)
            if not hmac.compare_digest(_mac(cookie, data[: -wire.MAC_LEN]), msg.mac2):
                nonce = secrets.token_bytes(12)
                sealed = self._cookie_sealer.encrypt(nonce, cookie, msg.mac1)
                reply = wire.encode_tunnel(wire.CookieReply(msg.sender, nonce, sealed))
                self._outbox.append(Datagram(reply, source, None))
                self.stats["cookie_sent"] += 1
                return
        if not self._limiter.allow(_rate_key(source), now):
            self.stats["rate_limited"] += 1
            return
        if msg.pattern is wire.Pattern.IK:
            self._answer_ik(msg, source, now, events)
        else:
            self._answer_xk(msg, source, now)

    def _answer_ik(
        self, msg: wire.HandshakeInit, source: Address, now: float, events: list[Event]
    ) -> None:
        if self._is_allowed is None:
            self.stats["ik_not_accepted"] += 1
            return
        conn = self._noise(wire.Pattern.IK, None)
        state = conn.noise_protocol.handshake_state
        try:
            timestamp = bytes(conn.read_message(msg.noise))
        except Exception:  # noiseprotocol raises assorted types on a bad message
            self.stats["bad_handshake"] += 1
            return
        peer = bytes(state.rs.public_bytes)
        if not self._is_allowed(peer):
            events.append(HandshakeFailed(peer, "key not allowed", source))
            return
        # Section 5.1: a replayed (or older) message 1 is worthless to an attacker only if the
        # responder refuses timestamps that are not strictly newer than the last one it took.
        if len(timestamp) != TIMESTAMP_LEN or timestamp <= self._timestamps.get(peer, b""):
            events.append(HandshakeFailed(peer, "replayed or stale initiation", source))
            return
        try:
            response = bytes(conn.write_message(b""))
        except Exception:
            self.stats["bad_handshake"] += 1
            return
        self._timestamps[peer] = timestamp
        session = self._sessions.get((peer, wire.Pattern.IK))
        if session is None:
            session = Session(self, peer, wire.Pattern.IK, False)
            self._sessions[(peer, wire.Pattern.IK)] = session
        local = self._new_index()
        send_key, receive_key = _split(conn)
        keys = _Keypair(session, local, msg.sender, send_key, receive_key, now)
        session._install(keys, confirmed=False)  # next, until the initiator uses it
        self._authenticated(session, None, source, now, events)
        self._outbox.append(
            Datagram(self._response(wire.Pattern.IK, local, msg.sender, response), source, peer)
        )

    def _answer_xk(self, msg: wire.HandshakeInit, source: Address, now: float) -> None:
        if not self._allow_pairing:
            self.stats["xk_not_accepted"] += 1
            return
        conn = self._noise(wire.Pattern.XK, None)
        try:
            conn.read_message(msg.noise)
            pending = _PendingResponse(conn, self._new_index(), msg.sender, now)
            response = bytes(conn.write_message(b""))
        except Exception:
            self.stats["bad_handshake"] += 1
            return
        self._prune_pending(now)
        while len(self._pending) >= MAX_PENDING_RESPONSES:
            _, oldest = self._pending.popitem(last=False)
            self._index.pop(oldest.local_index, None)
        self._pending[pending.local_index] = pending
        self._index[pending.local_index] = pending
        self._outbox.append(
            Datagram(
                self._response(wire.Pattern.XK, pending.local_index, msg.sender, response),
                source,
                None,
            )
        )

    def _on_final(self, data: bytes, source: Address, now: float, events: list[Event]) -> None:
        msg = wire.decode_tunnel(data)
        assert isinstance(msg, wire.HandshakeFinal)
        if msg.pattern is not wire.Pattern.XK or not _XK3_MIN <= len(msg.noise) <= _XK3_MAX:
            self.stats["bad_length"] += 1
            return
        if not hmac.compare_digest(_mac(self._mac1_key, data[: -2 * wire.MAC_LEN]), msg.mac1):
            self.stats["bad_mac1"] += 1
            return
        pending = self._index.get(msg.receiver)
        if type(pending) is not _PendingResponse:
            self.stats["unknown_index"] += 1
            return
        # One try per half-open handshake, good or bad.
        del self._index[pending.local_index]
        self._pending.pop(pending.local_index, None)
        if now >= pending.expires:
            self.stats["late_final"] += 1
            return
        try:
            payload = bytes(pending.conn.read_message(msg.noise))
        except Exception:
            self.stats["bad_handshake"] += 1
            return
        peer = bytes(pending.state.rs.public_bytes)
        facts = _parse_facts(payload)
        if facts is None:
            events.append(HandshakeFailed(peer, "bad pairing payload", source))
            return
        old = self._sessions.get((peer, wire.Pattern.XK))
        if old is not None:
            self._close(old)
        self._limit_pairing_sessions()
        session = Session(self, peer, wire.Pattern.XK, False, source if self._roam else None)
        self._sessions[(peer, wire.Pattern.XK)] = session
        send_key, receive_key = _split(pending.conn)
        keys = _Keypair(
            session, pending.local_index, pending.remote_index, send_key, receive_key, now
        )
        session._install(keys, confirmed=True)  # message 3 came from the initiator: confirmed
        self._authenticated(session, None, source, now, events)
        events.append(HandshakeCompleted(peer, wire.Pattern.XK, session))
        events.append(PairingRequested(peer, payload[:PAIRING_SECRET_LEN], facts, source, session))

    def _response(self, pattern: wire.Pattern, sender: int, receiver: int, noise: bytes) -> bytes:
        encoded = wire.encode_tunnel(wire.HandshakeResp(pattern, sender, receiver, noise))
        body = encoded[: -2 * wire.MAC_LEN]
        return body + _mac(self._mac1_key, body) + _ZERO_MAC

    def _count_load(self, now: float) -> bool:
        """Whether we are under load: forced, or over the threshold within the last second."""
        if now - self._load_second >= 1.0:
            self._load_second = now
            self._load_count = 0
        self._load_count += 1
        if self._load_count > self.load_threshold:
            self._load_until = now + 1.0
        return self.under_load or now < self._load_until

    def _cookie(self, source: Address, now: float) -> bytes:
        if now >= self._cookie_secret_until:  # section 5.4.7: a new random secret every 2 min
            self._cookie_secret = secrets.token_bytes(32)
            self._cookie_secret_until = now + COOKIE_SECRET_MAX_AGE
        return _mac(self._cookie_secret, _address_bytes(source))

    def _prune_pending(self, now: float) -> None:
        pending = self._pending
        while pending:
            index, oldest = next(iter(pending.items()))
            if now < oldest.expires:
                break
            del pending[index]
            self._index.pop(index, None)

    def _limit_pairing_sessions(self) -> None:
        pairing = [s for s in self._sessions.values() if s.is_pairing and not s.is_initiator]
        for session in pairing[: max(0, len(pairing) - MAX_PAIRING_SESSIONS + 1)]:
            self._close(session)

    # --- handshakes: initiator -------------------------------------------------------------

    def _on_response(self, data: bytes, source: Address, now: float, events: list[Event]) -> None:
        msg = wire.decode_tunnel(data)
        assert isinstance(msg, wire.HandshakeResp)
        initiation = self._index.get(msg.receiver)
        if type(initiation) is not _Initiation:
            self.stats["unknown_index"] += 1
            return
        session = initiation.session
        if msg.pattern is not session.pattern or len(msg.noise) != _RESP_NOISE_LEN[msg.pattern]:
            self.stats["bad_length"] += 1
            return
        if not hmac.compare_digest(_mac(session._mac1_key, data[: -2 * wire.MAC_LEN]), msg.mac1):
            self.stats["bad_mac1"] += 1
            return
        conn = initiation.conn
        final = b""
        try:
            conn.read_message(msg.noise)
            if session.pattern is wire.Pattern.XK:
                final = bytes(conn.write_message(session._pairing_payload))
        except Exception:
            # noiseprotocol has consumed this handshake's state, so the genuine response (if
            # this was a forgery) will fail too: the retry timer starts afresh within 5 s.
            self.stats["bad_handshake"] += 1
            return
        send_key, receive_key = _split(conn)
        keys = _Keypair(session, initiation.local_index, msg.sender, send_key, receive_key, now)
        session._initiation = None
        session._install(keys, confirmed=True)  # takes over the initiation's index
        self._authenticated(session, None, source, now, events)
        events.append(HandshakeCompleted(session.peer_key, session.pattern, session))
        if final:
            encoded = wire.encode_tunnel(wire.HandshakeFinal(session.pattern, msg.sender, final))
            body = encoded[: -2 * wire.MAC_LEN]
            message = body + _mac(session._mac1_key, body) + _ZERO_MAC
            self._outbox.append(Datagram(message, source, session.peer_key))
            # The box answers message 3 with a PAIR_STATE at once; without one, message 3 was
            # probably lost and the box has no session: try again rather than wait 2 minutes.
            session._reply_expected_by = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
        else:
            # Confirm the keys at once so the responder may use them (section 6.2 behaviour).
            keepalive = session._seal(_KEEPALIVE, now, True)
            if keepalive is not None:
                self._outbox.append(Datagram(keepalive, source, session.peer_key))

    def _on_cookie_reply(
        self, data: bytes, source: Address, now: float, events: list[Event]
    ) -> None:
        msg = wire.decode_tunnel(data)
        assert isinstance(msg, wire.CookieReply)
        initiation = self._index.get(msg.receiver)
        if type(initiation) is not _Initiation or initiation.cookie_answered:
            self.stats["unexpected_cookie"] += 1
            return
        session = initiation.session
        assert session._cookie_opener is not None
        try:
            cookie = session._cookie_opener.decrypt(
                msg.nonce, msg.encrypted_cookie, initiation.mac1
            )
        except InvalidTag:
            self.stats["bad_cookie"] += 1
            return
        session._cookie = cookie
        session._cookie_until = now + COOKIE_SECRET_MAX_AGE - COOKIE_SECRET_LATENCY
        initiation.cookie_answered = True
        body = initiation.message[: -wire.MAC_LEN]
        initiation.message = body + _mac(cookie, body)
        self._outbox.append(Datagram(initiation.message, source, session.peer_key))
        events.append(CookieRequired(session.peer_key, session))

    def _begin_handshake(self, session: Session, now: float, fresh: bool) -> bytes:
        """A new initiation for ``session`` (replacing one in flight); returns its bytes."""
        if self._wall_offset is None:
            raise SessionError("no wall clock yet: call initiate(now, wall) first")
        pattern = session.pattern
        conn = self._noise(pattern, session.peer_key)
        payload = tai64n(now + self._wall_offset) if pattern is wire.Pattern.IK else b""
        noise = bytes(conn.write_message(payload))
        old = session._initiation
        if old is not None:
            self._index.pop(old.local_index, None)
        local = self._new_index()
        encoded = wire.encode_tunnel(wire.HandshakeInit(pattern, local, noise))
        body = encoded[: -2 * wire.MAC_LEN]
        mac1 = _mac(session._mac1_key, body)
        body += mac1
        cookie = session._cookie if now < session._cookie_until else None
        message = body + (_mac(cookie, body) if cookie is not None else _ZERO_MAC)
        started = now if fresh or old is None else old.started
        retry_at = now + REKEY_TIMEOUT + self._rng.uniform(0.0, REKEY_TIMEOUT_JITTER)
        initiation = _Initiation(session, conn, local, message, mac1, started, retry_at)
        session._initiation = initiation
        session._rekeyed = session._current
        self._index[local] = initiation
        self._dirty.add(session)
        return message

    def _rekey(self, session: Session, now: float) -> None:
        """Start a handshake from inside (timer, send) and queue it, if we can."""
        if self._wall_offset is None or session.closed:
            return
        message = self._begin_handshake(session, now, fresh=True)
        self._outbox.append(Datagram(message, session.address, session.peer_key))

    # --- timers -------------------------------------------------------------------------------

    def _on_timer(self, session: Session, now: float, events: list[Event]) -> None:
        # Expired keys go first: they neither send nor receive (section 6.2).
        for name in ("_previous", "_next", "_current"):
            keys: _Keypair | None = getattr(session, name)
            if keys is not None and now >= keys.expires:
                self._index.pop(keys.local_index, None)
                setattr(session, name, None)
        initiation = session._initiation
        if initiation is not None:
            if now >= initiation.give_up_at:
                self._index.pop(initiation.local_index, None)
                session._initiation = None
                session._rekeyed = session._current
                events.append(
                    HandshakeFailed(
                        session.peer_key, f"no answer after {REKEY_ATTEMPT_TIME:g} s", None
                    )
                )
            elif now >= initiation.retry_at:
                message = self._begin_handshake(session, now, fresh=False)
                self._outbox.append(Datagram(message, session.address, session.peer_key))
        current = session._current
        if (
            session.is_initiator
            and session._initiation is None
            and current is not None
            and session._rekeyed is not current
            and now >= current.rekey_at
        ):
            session._rekeyed = current  # once per keypair, even if no handshake can start
            self._rekey(session, now)  # REKEY_AFTER_TIME
        if session._reply_expected_by is not None and now >= session._reply_expected_by:
            session._reply_expected_by = None
            if session.is_initiator and session._initiation is None:
                self._rekey(session, now)  # sent data, heard nothing for 15 s
        if session._keepalive_at is not None and now >= session._keepalive_at:
            session._keepalive_at = None
            keepalive = session._seal(_KEEPALIVE, now, True)
            if keepalive is not None:
                self._outbox.append(Datagram(keepalive, session.address, session.peer_key))
        if not session.is_initiator and not session._keypairs():
            self._close(session)
            events.append(SessionClosed(session.peer_key, session, "keys expired"))

    # --- helpers ------------------------------------------------------------------------------

    def _learn_wall(self, now: float, wall: float) -> None:
        self._wall_offset = wall - now

    def _new_index(self) -> int:
        while True:
            index = secrets.randbits(32)
            if index not in self._index:
                return index

    def _noise(self, pattern: wire.Pattern, remote: bytes | None) -> Any:
        conn = NoiseConnection.from_name(wire.NOISE_PROTOCOLS[pattern])
        conn.set_prologue(wire.NOISE_PROLOGUE)
        if remote is None:
            conn.set_as_responder()
        else:
            conn.set_as_initiator()
            conn.set_keypair_from_public_bytes(NoiseKeypair.REMOTE_STATIC, remote)
        # What set_keypair_from_private_bytes stores, built once per endpoint rather than per
        # handshake (deriving the public half again costs ~6 % of a handshake).
        conn.noise_protocol.keypairs["s"] = self._noise_static
        conn.start_handshake()
        return conn

    def _close(self, session: Session) -> None:
        if session.closed:
            return
        session.closed = True
        for keys in session._keypairs():
            self._index.pop(keys.local_index, None)
        if session._initiation is not None:
            self._index.pop(session._initiation.local_index, None)
        session._previous = session._current = session._next = None
        session._initiation = None
        key = (session.peer_key, session.pattern)
        if self._sessions.get(key) is session:
            del self._sessions[key]
        self._dirty.discard(session)


def _split(conn: Any) -> tuple[bytes, bytes]:
    """The transport keys Noise's Split() left in noiseprotocol's two CipherStates (section
    5.2), as (send, receive) for this side."""
    protocol = conn.noise_protocol
    return bytes(protocol.cipher_state_encrypt.k), bytes(protocol.cipher_state_decrypt.k)


def _parse_facts(payload: bytes) -> dict[str, Any] | None:
    if len(payload) < PAIRING_SECRET_LEN or len(payload) > PAIRING_SECRET_LEN + MAX_FACTS_LEN:
        return None
    try:
        facts = json.loads(payload[PAIRING_SECRET_LEN:])
    except (ValueError, RecursionError):
        return None
    return facts if isinstance(facts, dict) else None


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != wire.KEY_LEN:
        raise SessionError("a static public key is 32 bytes")
