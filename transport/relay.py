"""The relay's core: registration, tickets, limits and forwarding, with no sockets (sans-IO).

A relay forwards opaque datagrams between peers (boxes and clients) that cannot reach each other
directly. It knows peers by 16-byte ids (``wire.peer_id`` of their static key) and forwards only
what a box allowed, with a signed ticket. Frames and their layouts are in ``transport.wire``
("Relay frames"); :class:`RelayCore` is the state machine behind ``lazycat-relay`` and
:class:`transport.relay_aio.RelayServer` is the thin asyncio layer around it.

Connections are keyed by a **handle**: any hashable the adapter picks (a UDP socket index and
source address, a stream's id). The core never touches a socket: :meth:`RelayCore.receive` takes
a frame, its handle and the time, and returns ``(handle, frame)`` pairs to send.

Registration (three frames; the relay keeps no state until the third)::

    peer                                                  relay
     | REGISTER(static, ticket key, challenge=0, proof=0)  |   97 bytes: "say hello"
     |---------------------------------------------------->|
     |              HELLO(challenge, relay ephemeral key)  |   49 bytes, stateless
     |<----------------------------------------------------|
     | REGISTER(static, ticket key, challenge, proof)      |
     |---------------------------------------------------->|   verify, create the peer
     |              REGISTERED(peer id, observed address)  |
     |<----------------------------------------------------|

- The **challenge** is BLAKE2s-128 keyed by a secret that rotates every ``rotation`` seconds,
  over the handle and the epoch number: the relay can check it later without having stored
  anything, and a challenge sent to one source address is worthless from another, so a spoofed
  source can neither make the relay keep state nor replay another peer's REGISTER (the same idea
  as DTLS's HelloVerifyRequest cookie, RFC 6347 sec. 4.2.1, and WireGuard's cookie MAC).
- The **relay ephemeral key** is an X25519 key of the same epoch; a challenge is only valid with
  the key handed out beside it, so verifying costs one X25519 operation, never two. Challenges
  and keys of the previous epoch are still accepted (a grace of one rotation).
- The **proof** (:func:`register_proof`) is BLAKE2s-128 keyed by X25519(peer static, relay
  ephemeral) over a label, the challenge and the ticket key: only the holder of the static
  private key (or of the relay's ephemeral private key) can compute it, and the ticket key is
  bound to it so nobody on the path can swap a box's ticket key for their own.
- A peer whose ticket key is non-zero is a **box**; one with a zero ticket key is a client.

Why the relay cannot read what it forwards: the tunnel's keys come from Noise handshakes
between the box's and the device's static keys and their own ephemerals (``transport.session``),
carried inside SEND payloads. The only Diffie-Hellman the relay takes part in is with its own
throw-away ephemeral key, whose result it could compute anyway and which is used for nothing
but the proof; it never learns a static private key, a Noise ephemeral or a session key. It sees
ids, sizes and timing, nothing more.

Tickets and the forwarding rule:

- A peer sends TICKET frames (``transport.tickets``) it got from a box. A ticket names the box
  and this client (or ANY_CLIENT: a pairing ticket) and is signed by the ticket key that box
  registered. A ticket for a box that is not (yet) here is kept, unverified, and checked on
  first use; at most ``max_tickets_per_peer`` are kept per peer.
- SEND(destination) from A to B is forwarded as RECV(A, payload) to B's current handle when
  A holds a valid, unexpired ticket for box B, or B holds one for box A (a box answers only the
  clients that presented a ticket for it). Each verified pair is cached both ways, so the
  forward path is a dict lookup and a comparison; the Ed25519 check runs once per ticket.

Limits (:class:`RelayConfig`): per-peer token buckets for bytes/s and packets/s on everything a
peer sends; the number of peers; a global rate of new registrations and stream connections
(the *accept rate*); a global rate of answers to unregistered sources; the frame size. Errors
are rate limited per peer and are **never larger than the frame that caused them** (the relay
must not be an amplifier: a spoofed 9-byte datagram gets a 2-byte error, not a 49-byte HELLO,
which is why a peer asks for HELLO with a full-size REGISTER). Peers that send nothing for
``idle_timeout`` seconds are dropped; peers send PING to stay (PONG is the same size).

Roaming: a registered peer that reappears from a new handle (a NAT rebinding, a new network)
is unknown there, so it is asked to register again; a valid REGISTER from the new handle moves
the peer, and the old handle is reported in :attr:`RelayCore.evicted` so a stream adapter can
close it.

STUN shares the UDP port: a datagram ``wire.classify`` calls STUN goes to ``stun_handler``.

Time: ``now`` is monotonic seconds from the caller. Tickets carry wall-clock unix seconds; the
caller gives ``wall_offset`` (wall = now + offset) and may update it with :attr:`wall_offset`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from transport import wire
from transport.ratelimit import TokenBucket
from transport.tickets import verify_ticket
from transport.wire import (
    ANY_CLIENT,
    CHALLENGE_LEN,
    KEY_LEN,
    MAC_LEN,
    PEER_ID_LEN,
    Address,
    RelayErrorCode,
    RelayType,
    Ticket,
    WireError,
)

Handle = Hashable
Output = Sequence[tuple[Handle, bytes]]
StunHandler = Callable[[bytes, Address, float], "bytes | None"]

REGISTER_LABEL = b"lazycat relay register"
HELLO_LEN = 1 + CHALLENGE_LEN + KEY_LEN  # 49
REGISTER_LEN = 1 + 2 * KEY_LEN + CHALLENGE_LEN + MAC_LEN  # 97
PING_LEN = 9
ZERO_KEY = bytes(KEY_LEN)
ZERO_CHALLENGE = bytes(CHALLENGE_LEN)

_SEND = RelayType.SEND.value
_RECV_BYTE = bytes([RelayType.RECV])
_NOTHING: Output = ()


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """The relay's limits. Rates are per second; a bucket's burst is what it holds when full."""

    max_peers: int = 10_000
    max_frame: int = 4096  # bytes, the whole relay frame; tunnel datagrams are < 1,500
    peer_bytes_per_s: float = 2_000_000.0
    peer_bytes_burst: float = 4_000_000.0
    peer_packets_per_s: float = 2_000.0
    peer_packets_burst: float = 4_000.0
    accept_per_s: float = 200.0  # new registrations and new stream connections, all peers
    accept_burst: float = 400.0
    unregistered_replies_per_s: float = 2_000.0  # HELLOs and errors to unregistered sources
    unregistered_replies_burst: float = 4_000.0
    peer_errors_per_s: float = 5.0
    peer_errors_burst: float = 10.0
    ticket_checks_per_s: float = 10.0  # Ed25519 verifications a peer may cause
    ticket_checks_burst: float = 20.0
    max_tickets_per_peer: int = 16
    idle_timeout: float = 60.0
    rotation: float = 60.0  # challenge secret and relay ephemeral key lifetime

    def __post_init__(self) -> None:
        for name in (
            "max_peers",
            "max_frame",
            "peer_bytes_per_s",
            "peer_bytes_burst",
            "peer_packets_per_s",
            "peer_packets_burst",
            "accept_per_s",
            "accept_burst",
            "idle_timeout",
            "rotation",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not REGISTER_LEN <= self.max_frame <= wire.MAX_FRAME:
            raise ValueError(f"max_frame must be between {REGISTER_LEN} and {wire.MAX_FRAME}")
        if self.peer_bytes_burst < self.max_frame:
            raise ValueError("peer_bytes_burst must hold at least one frame of max_frame bytes")
        if self.peer_packets_burst < 1 or self.accept_burst < 1:
            raise ValueError("a burst must hold at least one packet")


@dataclass(slots=True)
class RelayStats:
    """Counters for /metrics; they only grow."""

    frames_in: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    forwarded: int = 0
    forwarded_bytes: int = 0
    registrations: int = 0
    hellos: int = 0
    stun: int = 0
    expired: int = 0
    drops: Counter[str] = field(default_factory=Counter)


class _Peer:
    """A registered peer. The forward path touches only the first group of attributes."""

    __slots__ = (
        "btok",
        "errors",
        "handle",
        "id",
        "is_box",
        "may_send",
        "observed",
        "ptok",
        "recv_prefix",
        "stamp",
        "static_key",
        "ticket_checks",
        "ticket_key",
        "tickets",
    )

    def __init__(
        self,
        static_key: bytes,
        ticket_key: bytes,
        handle: Handle,
        observed: Address,
        config: RelayConfig,
        now: float,
    ) -> None:
        self.id = wire.peer_id(static_key)
        self.static_key = static_key
        self.ticket_key = ticket_key
        self.is_box = ticket_key != ZERO_KEY
        self.handle = handle
        self.observed = observed
        self.recv_prefix = _RECV_BYTE + self.id
        # Both token buckets share one stamp, which is also "last heard from" for idle expiry.
        self.stamp = now
        self.btok = config.peer_bytes_burst
        self.ptok = config.peer_packets_burst
        # peer id -> (expiry on the monotonic clock, that peer's object when it was verified)
        self.may_send: dict[bytes, tuple[float, _Peer]] = {}
        self.tickets: dict[bytes, Ticket] = {}  # box id -> a ticket this peer presented
        self.errors = TokenBucket(config.peer_errors_per_s, config.peer_errors_burst, now)
        self.ticket_checks = TokenBucket(
            config.ticket_checks_per_s, config.ticket_checks_burst, now
        )


class _Epoch:
    __slots__ = ("index", "private", "public", "secret")

    def __init__(self, index: int, urandom: Callable[[int], bytes]) -> None:
        self.index = index
        self.secret = urandom(32)
        self.private = X25519PrivateKey.from_private_bytes(urandom(32))
        self.public = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _proof_from_shared(shared: bytes, challenge: bytes, ticket_key: bytes) -> bytes:
    return hashlib.blake2s(
        REGISTER_LABEL + challenge + ticket_key, key=shared, digest_size=MAC_LEN
    ).digest()


def register_proof(
    static_private: bytes, relay_ephemeral_public: bytes, challenge: bytes, ticket_key: bytes
) -> bytes:
    """The REGISTER proof a peer sends: BLAKE2s-128 keyed by X25519(static, relay ephemeral)
    over ``"lazycat relay register" | challenge | ticket key``. Raises WireError on bad keys."""
    if len(static_private) != KEY_LEN or len(relay_ephemeral_public) != KEY_LEN:
        raise WireError("X25519 keys are 32 bytes")
    try:
        shared = X25519PrivateKey.from_private_bytes(static_private).exchange(
            X25519PublicKey.from_public_bytes(relay_ephemeral_public)
        )
    except ValueError:  # a low-order point gives an all-zero secret (RFC 7748 sec. 6.1)
        raise WireError("unusable relay ephemeral key") from None
    return _proof_from_shared(shared, challenge, ticket_key)


def _error(code: RelayErrorCode, message: str, limit: int) -> bytes | None:
    """An ERROR frame no longer than ``limit`` bytes (the trigger's size), or None if even the
    two-byte header does not fit. Messages are ASCII, so cutting them never splits a char."""
    if limit < 2:
        return None
    return bytes([RelayType.ERROR, code]) + message.encode("ascii")[: limit - 2]


class RelayCore:
    """The relay's state machine. Feed it frames with :meth:`receive`; call :meth:`on_timer` at
    :meth:`next_timer`; close stream handles listed in :attr:`evicted`."""

    def __init__(
        self,
        config: RelayConfig | None = None,
        *,
        now: float,
        wall_offset: float = 0.0,
        stun_handler: StunHandler | None = None,
        urandom: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.config = config or RelayConfig()
        self.wall_offset = wall_offset
        self.stun_handler = stun_handler
        self.stats = RelayStats()
        self.evicted: list[Handle] = []  # handles no longer bound to a peer; the adapter drains
        self._urandom = urandom
        self._by_handle: dict[Handle, _Peer] = {}
        self._by_id: dict[bytes, _Peer] = {}
        self._boxes = 0
        self._accept = TokenBucket(self.config.accept_per_s, self.config.accept_burst, now)
        self._unregistered = TokenBucket(
            self.config.unregistered_replies_per_s, self.config.unregistered_replies_burst, now
        )
        self._epoch = _Epoch(int(now // self.config.rotation), urandom)
        self._previous: _Epoch | None = None
        self._next_sweep = now + self._sweep_interval()
        # The forward path reads these as locals of receive() through self; keep them flat.
        self._brate = self.config.peer_bytes_per_s
        self._bburst = self.config.peer_bytes_burst
        self._prate = self.config.peer_packets_per_s
        self._pburst = self.config.peer_packets_burst
        self._max_frame = self.config.max_frame

    # --- public queries ---------------------------------------------------------------------

    @property
    def peer_count(self) -> int:
        return len(self._by_id)

    @property
    def box_count(self) -> int:
        return self._boxes

    def is_registered(self, handle: Handle) -> bool:
        return handle in self._by_handle

    def peer_handle(self, peer: bytes) -> Handle | None:
        p = self._by_id.get(peer)
        return None if p is None else p.handle

    # --- input --------------------------------------------------------------------------------

    def receive(
        self, data: bytes, handle: Handle, now: float, observed: Address | None = None
    ) -> Output:
        """One frame (a UDP datagram, or one frame off a stream) from ``handle``. Returns the
        frames to send, each with its handle. ``observed`` is the source address as this relay
        sees it (REGISTERED reports it; STUN answers it)."""
        stats = self.stats
        stats.frames_in += 1
        n = len(data)
        stats.bytes_in += n
        peer = self._by_handle.get(handle)
        if peer is not None and n > PEER_ID_LEN and data[0] == _SEND and n <= self._max_frame:
            # The forward path: bucket refill and charge, one lookup, one check, one slice.
            elapsed = now - peer.stamp
            peer.stamp = now
            btok = peer.btok + elapsed * self._brate
            if btok > self._bburst:
                btok = self._bburst
            ptok = peer.ptok + elapsed * self._prate
            if ptok > self._pburst:
                ptok = self._pburst
            if btok < n or ptok < 1.0:
                peer.btok = btok
                peer.ptok = ptok
                return self._limited(peer, n, now)
            peer.btok = btok - n
            peer.ptok = ptok - 1.0
            dst = self._by_id.get(data[1:17])
            if dst is not None:
                grant = peer.may_send.get(dst.id)
                if grant is not None and grant[1] is dst and grant[0] > now:
                    frame = peer.recv_prefix + data[17:]
                    stats.forwarded += 1
                    stats.forwarded_bytes += n
                    stats.frames_out += 1
                    stats.bytes_out += n
                    return ((dst.handle, frame),)
            return self._send_slow(peer, dst, data, now)
        if peer is None:
            return self._from_unregistered(data, handle, now, observed)
        return self._from_peer(peer, data, now, observed)

    def admit_connection(self, now: float) -> bool:
        """Whether a new stream connection may be accepted now (the accept rate)."""
        if self._accept.take(now):
            return True
        self.stats.drops["accept_rate"] += 1
        return False

    def close(self, handle: Handle) -> None:
        """A stream connection went away: forget the peer bound to it, if any."""
        peer = self._by_handle.get(handle)
        if peer is not None:
            self._remove(peer, evict=False)

    def next_timer(self) -> float | None:
        return self._next_sweep if self._by_id else None

    def on_timer(self, now: float) -> None:
        """Drop peers idle for longer than ``idle_timeout``."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._sweep_interval()
        deadline = now - self.config.idle_timeout
        for peer in [p for p in self._by_id.values() if p.stamp < deadline]:
            self.stats.expired += 1
            self._remove(peer, evict=True)

    # --- the slow paths -----------------------------------------------------------------------

    def _sweep_interval(self) -> float:
        return max(1.0, self.config.idle_timeout / 4)

    def _drop(self, reason: str) -> Output:
        self.stats.drops[reason] += 1
        return _NOTHING

    def _out(self, handle: Handle, frame: bytes | None) -> Output:
        if frame is None:
            return _NOTHING
        self.stats.frames_out += 1
        self.stats.bytes_out += len(frame)
        return ((handle, frame),)

    def _peer_error(
        self, peer: _Peer, code: RelayErrorCode, message: str, limit: int, now: float
    ) -> Output:
        if not peer.errors.take(now):
            return _NOTHING
        return self._out(peer.handle, _error(code, message, limit))

    def _unregistered_reply(self, handle: Handle, frame: bytes | None, now: float) -> Output:
        if frame is None:
            return _NOTHING
        if not self._unregistered.take(now):
            self.stats.drops["unregistered_reply_rate"] += 1
            return _NOTHING
        return self._out(handle, frame)

    def _limited(self, peer: _Peer, n: int, now: float) -> Output:
        self.stats.drops["rate_limited"] += 1
        return self._peer_error(peer, RelayErrorCode.RATE_LIMITED, "rate limited", n, now)

    def _charge(self, peer: _Peer, n: int, now: float) -> bool:
        """The forward path's bucket update, for every other frame a peer sends."""
        elapsed = now - peer.stamp
        peer.stamp = now
        peer.btok = min(self._bburst, peer.btok + elapsed * self._brate)
        peer.ptok = min(self._pburst, peer.ptok + elapsed * self._prate)
        if peer.btok < n or peer.ptok < 1.0:
            return False
        peer.btok -= n
        peer.ptok -= 1.0
        return True

    def _send_slow(self, peer: _Peer, dst: _Peer | None, data: bytes, now: float) -> Output:
        n = len(data)
        if dst is None:
            self.stats.drops["unknown_peer"] += 1
            return self._peer_error(
                peer, RelayErrorCode.UNKNOWN_PEER, "unknown peer " + data[1:17].hex(), n, now
            )
        reason = self._authorize(peer, dst, now)
        if reason is not None:
            self.stats.drops["no_ticket"] += 1
            return self._peer_error(peer, RelayErrorCode.NO_TICKET, reason, n, now)
        frame = peer.recv_prefix + data[17:]
        self.stats.forwarded += 1
        self.stats.forwarded_bytes += n
        return self._out(dst.handle, frame)

    def _authorize(self, peer: _Peer, dst: _Peer, now: float) -> str | None:
        """Why ``peer`` may not send to ``dst``, or None after caching the permission."""
        if dst.is_box and dst.id in peer.tickets:
            box, holder = dst, peer
        elif peer.is_box and peer.id in dst.tickets:
            box, holder = peer, dst
        elif dst.is_box:
            return "no ticket for this box"
        else:
            return "not a box, and no ticket from it"
        ticket = holder.tickets[box.id]
        wall = now + self.wall_offset
        if ticket.expires <= wall:
            return "ticket expired"
        if not peer.ticket_checks.take(now):
            return "too many ticket checks"
        reason = verify_ticket(ticket, box.ticket_key, wall)
        if reason is not None:
            del holder.tickets[box.id]
            return reason
        self._grant(holder, box, ticket)
        return None

    def _grant(self, holder: _Peer, box: _Peer, ticket: Ticket) -> None:
        expires = ticket.expires - self.wall_offset
        holder.may_send[box.id] = (expires, box)
        box.may_send[holder.id] = (expires, holder)

    def _from_peer(self, peer: _Peer, data: bytes, now: float, observed: Address | None) -> Output:
        n = len(data)
        if not self._charge(peer, n, now):
            return self._limited(peer, n, now)
        if n > self._max_frame:
            return self._drop("too_large")
        kind = data[0] if data else -1
        if kind == RelayType.PING and n == PING_LEN:
            return self._out(peer.handle, bytes([RelayType.PONG]) + data[1:])
        if kind == RelayType.TICKET:
            return self._on_ticket(peer, data, now)
        if kind == RelayType.REGISTER:
            return self._from_unregistered(data, peer.handle, now, observed)
        if kind == _SEND:  # shorter than a destination id
            return self._peer_error(peer, RelayErrorCode.BAD_FRAME, "truncated send", n, now)
        if kind in (RelayType.PONG, RelayType.ERROR):
            return _NOTHING  # answers to our pings (none yet) and errors from peers: ignore
        if self.stun_handler is not None and kind >= 0 and kind < 4:
            return self._stun(data, peer.handle, now, observed)
        return self._drop("unexpected_frame")

    def _on_ticket(self, peer: _Peer, data: bytes, now: float) -> Output:
        n = len(data)
        try:
            ticket = Ticket.decode(data[1:])
        except WireError:
            return self._peer_error(peer, RelayErrorCode.BAD_FRAME, "bad ticket frame", n, now)
        if ticket.client not in (peer.id, ANY_CLIENT):
            self.stats.drops["bad_ticket"] += 1
            return self._peer_error(
                peer, RelayErrorCode.BAD_TICKET, "ticket names another client", n, now
            )
        box = self._by_id.get(ticket.box)
        if box is not None and box.is_box:
            if not peer.ticket_checks.take(now):
                return self._limited(peer, n, now)
            wall = now + self.wall_offset
            reason = verify_ticket(ticket, box.ticket_key, wall)
            if reason is not None:
                self.stats.drops["bad_ticket"] += 1
                return self._peer_error(peer, RelayErrorCode.BAD_TICKET, reason, n, now)
            self._keep_ticket(peer, ticket)
            self._grant(peer, box, ticket)
        else:
            self._keep_ticket(peer, ticket)  # checked when first used, once the box is here
        return _NOTHING

    def _keep_ticket(self, peer: _Peer, ticket: Ticket) -> None:
        tickets = peer.tickets
        tickets.pop(ticket.box, None)
        while len(tickets) >= self.config.max_tickets_per_peer:
            del tickets[next(iter(tickets))]  # the oldest
        tickets[ticket.box] = ticket

    def _stun(self, data: bytes, handle: Handle, now: float, observed: Address | None) -> Output:
        assert self.stun_handler is not None
        source = observed if observed is not None else _address_of(handle)
        try:
            if wire.classify(data) != wire.Kind.STUN:
                return self._drop("not_relay")
            answer = self.stun_handler(data, source, now)
        except WireError:
            return self._drop("bad_stun")
        if answer is None:
            return _NOTHING
        if len(answer) > len(data):
            # ARCHITECTURE.md: a relay "answers STUN no larger than the request".
            return self._drop("stun_answer_too_large")
        self.stats.stun += 1
        return self._out(handle, answer)

    def _from_unregistered(
        self, data: bytes, handle: Handle, now: float, observed: Address | None
    ) -> Output:
        n = len(data)
        if n == 0:
            return self._drop("empty")
        kind = data[0]
        if kind < 0x20:
            if self.stun_handler is not None and kind < 4:
                return self._stun(data, handle, now, observed)
            return self._drop("not_relay")
        if kind > 0x3F:
            return self._drop("not_relay")
        if kind == RelayType.REGISTER and n == REGISTER_LEN:
            return self._register(data, handle, now, observed)
        if kind in (RelayType.PONG, RelayType.ERROR, RelayType.HELLO, RelayType.RECV):
            # Never answer what could be a relay's own answer: two relays (or a spoofed
            # source) must not be able to make relays talk to each other in a loop.
            return self._drop("unregistered")
        self.stats.drops["unregistered"] += 1
        if n >= HELLO_LEN:
            return self._hello(handle, now)
        return self._unregistered_reply(
            handle, _error(RelayErrorCode.NOT_REGISTERED, "register first", n), now
        )

    def _epochs(self, now: float) -> tuple[_Epoch, _Epoch | None]:
        index = int(now // self.config.rotation)
        if index != self._epoch.index:
            previous = self._epoch if index == self._epoch.index + 1 else None
            self._epoch = _Epoch(index, self._urandom)
            self._previous = previous
        return self._epoch, self._previous

    @staticmethod
    def _challenge(epoch: _Epoch, handle: Handle) -> bytes:
        message = repr(handle).encode() + epoch.index.to_bytes(8, "big", signed=True)
        return hashlib.blake2s(
            message, key=epoch.secret, digest_size=CHALLENGE_LEN, person=b"lzc-chal"
        ).digest()

    def _hello(self, handle: Handle, now: float) -> Output:
        epoch, _ = self._epochs(now)
        frame = bytes([RelayType.HELLO]) + self._challenge(epoch, handle) + epoch.public
        out = self._unregistered_reply(handle, frame, now)
        if out:
            self.stats.hellos += 1
        return out

    def _register(
        self, data: bytes, handle: Handle, now: float, observed: Address | None
    ) -> Output:
        n = len(data)
        static_key, ticket_key = data[1:33], data[33:65]
        challenge, proof = data[65:81], data[81:97]
        current, previous = self._epochs(now)
        epoch = None
        for candidate in (current, previous):
            if candidate is not None and hmac.compare_digest(
                self._challenge(candidate, handle), challenge
            ):
                epoch = candidate
                break
        if epoch is None:
            if challenge != ZERO_CHALLENGE:
                self.stats.drops["stale_challenge"] += 1
            return self._hello(handle, now)  # 49 bytes in answer to 97: no amplification
        pid = wire.peer_id(static_key)
        existing = self._by_id.get(pid)
        if existing is None and len(self._by_id) >= self.config.max_peers:
            self.stats.drops["full"] += 1
            return self._unregistered_reply(
                handle, _error(RelayErrorCode.FULL, "relay full", n), now
            )
        # Every X25519 the relay does is paid for from the accept rate.
        if not self._accept.take(now):
            self.stats.drops["accept_rate"] += 1
            return self._unregistered_reply(
                handle, _error(RelayErrorCode.RATE_LIMITED, "too many registrations", n), now
            )
        try:
            shared = epoch.private.exchange(X25519PublicKey.from_public_bytes(static_key))
        except ValueError:  # low-order point (RFC 7748 sec. 6.1)
            shared = b""
        if not shared or not hmac.compare_digest(
            _proof_from_shared(shared, challenge, ticket_key), proof
        ):
            self.stats.drops["bad_proof"] += 1
            return self._unregistered_reply(
                handle, _error(RelayErrorCode.BAD_PROOF, "bad proof", n), now
            )
        if observed is None:
            observed = _address_of(handle)
        self._bind(existing, static_key, ticket_key, handle, observed, now)
        self.stats.registrations += 1
        frame = bytes([RelayType.REGISTERED]) + pid + wire.encode_address(observed)
        return self._out(handle, frame)

    def _bind(
        self,
        existing: _Peer | None,
        static_key: bytes,
        ticket_key: bytes,
        handle: Handle,
        observed: Address,
        now: float,
    ) -> None:
        squatter = self._by_handle.get(handle)
        if squatter is not None and squatter is not existing:
            self._remove(squatter, evict=False)  # one peer per handle; the new one proved its key
        if existing is not None and existing.ticket_key == ticket_key:
            if existing.handle != handle:  # roaming: same peer, new address or connection
                del self._by_handle[existing.handle]
                self.evicted.append(existing.handle)
                existing.handle = handle
                self._by_handle[handle] = existing
            existing.observed = observed
            existing.stamp = now
            return
        peer = _Peer(static_key, ticket_key, handle, observed, self.config, now)
        if existing is not None:
            # The same key registered with another ticket key: a new peer object, so every
            # cached permission (which names the old object) is checked again from the tickets.
            peer.tickets = existing.tickets
            self._remove(existing, evict=existing.handle != handle)
        self._by_id[peer.id] = peer
        self._by_handle[handle] = peer
        if peer.is_box:
            self._boxes += 1

    def _remove(self, peer: _Peer, *, evict: bool) -> None:
        if self._by_id.get(peer.id) is peer:
            del self._by_id[peer.id]
            if peer.is_box:
                self._boxes -= 1
        if self._by_handle.get(peer.handle) is peer:
            del self._by_handle[peer.handle]
            if evict:
                self.evicted.append(peer.handle)
        for _, other in peer.may_send.values():
            entry = other.may_send.get(peer.id)
            if entry is not None and entry[1] is peer:
                del other.may_send[peer.id]
        peer.may_send = {}


def _address_of(handle: Handle) -> Address:
    """The address in a handle shaped like ``(ip, port)`` or ``(index, (ip, port, ...))``."""
    candidate: object = handle
    if isinstance(candidate, tuple) and len(candidate) == 2 and isinstance(candidate[1], tuple):
        candidate = candidate[1]
    if (
        isinstance(candidate, tuple)
        and len(candidate) >= 2
        and isinstance(candidate[0], str)
        and isinstance(candidate[1], int)
    ):
        return (candidate[0], candidate[1])
    return ("::", 0)


# --- the client side ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelayRegistered:
    """The relay accepted us: our id there and the address it sees us at."""

    peer: bytes
    observed: Address


@dataclass(frozen=True, slots=True)
class RelayReceived:
    source: bytes
    payload: bytes


@dataclass(frozen=True, slots=True)
class RelayPong:
    rtt: float


@dataclass(frozen=True, slots=True)
class RelayErrorReceived:
    code: RelayErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class RelayLost:
    """We are no longer registered (the relay restarted, forgot us, or went silent); the client
    is registering again by itself."""

    reason: str


RelayEvent = RelayRegistered | RelayReceived | RelayPong | RelayErrorReceived | RelayLost


class RelayClient:
    """A peer's side of one relay, sans-IO: what a box or a device runs per relay.

    Feed frames from the relay to :meth:`receive` (events come back), send what
    :meth:`take_outgoing` returns to the relay, and call :meth:`on_timer` at :meth:`next_timer`.
    Over a stream, wrap each frame with ``wire.frame_stream``; after a stream reconnects, call
    :meth:`connect` again. A box passes its ticket key's public half as ``ticket_public``.

    The client registers by itself: on start, whenever the relay says HELLO or NOT_REGISTERED
    (a restart, a NAT rebinding) and when the relay has been silent for ``timeout`` seconds.
    Tickets given to :meth:`add_ticket` are presented after every registration, and again when
    the relay answers NO_TICKET (a TICKET frame lost on UDP).
    """

    RETRY_FIRST = 0.5
    RETRY_MAX = 8.0
    MAX_PINGS = 8

    def __init__(
        self,
        static_private: bytes,
        *,
        now: float,
        ticket_public: bytes = ZERO_KEY,
        keepalive: float = 20.0,
        timeout: float | None = None,
        urandom: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if len(static_private) != KEY_LEN or len(ticket_public) != KEY_LEN:
            raise WireError("static and ticket keys are 32 bytes")
        self._private = static_private
        self.static_public = (
            X25519PrivateKey.from_private_bytes(static_private)
            .public_key()
            .public_bytes(Encoding.Raw, PublicFormat.Raw)
        )
        self.peer_id = wire.peer_id(self.static_public)
        self.ticket_public = ticket_public
        self.keepalive = keepalive
        self.timeout = timeout if timeout is not None else 3 * keepalive + 1
        self.state = "idle"  # idle -> hello -> registering -> ready
        self.observed: Address | None = None
        self.rtt: float | None = None
        self._urandom = urandom
        self._outbox: list[bytes] = []
        self._tickets: dict[bytes, bytes] = {}  # box id -> encoded ticket
        self._pings: dict[bytes, float] = {}
        self._retry_at: float | None = None
        self._retry_delay = self.RETRY_FIRST
        self._ping_at: float | None = None
        self._heard = now
        self._tickets_sent_at = -1e9

    @property
    def registered(self) -> bool:
        return self.state == "ready"

    def take_outgoing(self) -> list[bytes]:
        out, self._outbox = self._outbox, []
        return out

    def connect(self, now: float) -> None:
        """Start (or restart) registration: ask the relay for a HELLO."""
        self.state = "hello"
        self._heard = now
        self._retry_delay = self.RETRY_FIRST
        self._ask_hello(now)

    def _ask_hello(self, now: float) -> None:
        # A REGISTER with a zero challenge is how a peer says hello: 97 bytes, so the relay's
        # 49-byte HELLO is never an amplification of what it received.
        self._outbox.append(
            bytes([RelayType.REGISTER])
            + self.static_public
            + self.ticket_public
            + ZERO_CHALLENGE
            + bytes(MAC_LEN)
        )
        self._retry_at = now + self._retry_delay
        self._retry_delay = min(self.RETRY_MAX, self._retry_delay * 2)

    def add_ticket(self, ticket: Ticket | bytes) -> None:
        raw = ticket.encode() if isinstance(ticket, Ticket) else ticket
        box = Ticket.decode(raw).box
        self._tickets[box] = raw
        if self.state == "ready":
            self._outbox.append(bytes([RelayType.TICKET]) + raw)

    def send(self, destination: bytes, payload: bytes) -> bool:
        """Queue ``payload`` for ``destination`` (a peer id); False while not registered."""
        if self.state != "ready":
            return False
        if len(destination) != PEER_ID_LEN:
            raise WireError("a destination is a 16-byte peer id")
        self._outbox.append(bytes([RelayType.SEND]) + destination + payload)
        return True

    def send_frame(self, destination: bytes, payload: bytes) -> bytes:
        """The SEND frame for ``payload``, for callers that write it themselves (fast path)."""
        return bytes([RelayType.SEND]) + destination + payload

    def ping(self, now: float) -> None:
        nonce = self._urandom(8)
        if len(self._pings) >= self.MAX_PINGS:
            del self._pings[next(iter(self._pings))]
        self._pings[nonce] = now
        self._outbox.append(bytes([RelayType.PING]) + nonce)

    def next_timer(self) -> float | None:
        if self.state == "idle":
            return None
        if self.state == "ready":
            assert self._ping_at is not None
            return min(self._ping_at, self._heard + self.timeout)
        return self._retry_at

    def on_timer(self, now: float) -> list[RelayEvent]:
        if self.state == "idle":
            return []
        if self.state == "ready":
            if now >= self._heard + self.timeout:
                self.connect(now)
                return [RelayLost("no answer from the relay")]
            if self._ping_at is not None and now >= self._ping_at:
                self.ping(now)
                self._ping_at = now + self.keepalive
            return []
        if self._retry_at is not None and now >= self._retry_at:
            self._ask_hello(now)  # HELLO or our REGISTER got lost: start over
            self.state = "hello"
        return []

    def receive(self, data: bytes, now: float) -> list[RelayEvent]:
        """A frame from the relay. Never raises: what cannot be parsed is ignored."""
        if not data:
            return []
        kind = data[0]
        if kind == RelayType.RECV and len(data) >= 1 + PEER_ID_LEN:
            self._heard = now
            return [RelayReceived(data[1:17], data[17:])]
        try:
            frame = wire.decode_relay(data)
        except WireError:
            return []
        self._heard = now
        if isinstance(frame, wire.Hello):
            return self._on_hello(frame, now)
        if isinstance(frame, wire.Registered):
            if frame.peer != self.peer_id or self.state != "registering":
                return []
            self.state = "ready"
            self.observed = frame.observed
            self._retry_at = None
            self._retry_delay = self.RETRY_FIRST
            self._ping_at = now + self.keepalive
            self._present_tickets(now, force=True)
            return [RelayRegistered(frame.peer, frame.observed)]
        if isinstance(frame, wire.Pong):
            sent = self._pings.pop(frame.nonce, None)
            if sent is None:
                return []
            self.rtt = now - sent
            return [RelayPong(self.rtt)]
        if isinstance(frame, wire.Ping):
            self._outbox.append(bytes([RelayType.PONG]) + frame.nonce)
            return []
        if isinstance(frame, wire.RelayErrorFrame):
            events: list[RelayEvent] = [RelayErrorReceived(frame.code, frame.message)]
            if frame.code == RelayErrorCode.NOT_REGISTERED and self.state == "ready":
                self.connect(now)
                events.append(RelayLost("the relay does not know us"))
            elif frame.code == RelayErrorCode.BAD_PROOF and self.state == "registering":
                self.state = "hello"
                self._ask_hello(now)
            elif frame.code == RelayErrorCode.NO_TICKET and self.state == "ready":
                self._present_tickets(now)
            return events
        return []

    def _on_hello(self, hello: wire.Hello, now: float) -> list[RelayEvent]:
        try:
            proof = register_proof(
                self._private, hello.relay_key, hello.challenge, self.ticket_public
            )
        except WireError:
            return []
        lost = self.state == "ready"
        self.state = "registering"
        self._outbox.append(
            bytes([RelayType.REGISTER])
            + self.static_public
            + self.ticket_public
            + hello.challenge
            + proof
        )
        self._retry_at = now + self._retry_delay
        self._retry_delay = min(self.RETRY_MAX, self._retry_delay * 2)
        return [RelayLost("the relay asked us to register again")] if lost else []

    def _present_tickets(self, now: float, *, force: bool = False) -> None:
        if not force and now - self._tickets_sent_at < 1.0:
            return  # after NO_TICKET: at most once a second, however often the relay says it
        self._tickets_sent_at = now
        for raw in self._tickets.values():
            self._outbox.append(bytes([RelayType.TICKET]) + raw)
