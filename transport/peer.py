"""One peer's transport engine: sessions, paths, relays and STUN behind one UDP socket (sans-IO).

A :class:`Peer` is what the box (``transportd``: the responder, many devices) and a device
(``lazycat-client``: the initiator, one box) each run. It owns

- one ``session.Endpoint`` (the Noise sessions of our static key),
- one ``paths.PathManager`` per remote static key (where that peer's datagrams go),
- one ``relay.RelayClient`` per relay it is registered at,
- the STUN Binding transactions that find our reflexive address and each relay's latency,

and all of them share ONE UDP socket. It takes datagrams and the time and gives back datagrams,
events and its next deadline; the asyncio adapter (next issue) owns the socket and the clock.

One datagram in, and what comes out
===================================

::

  receive(data, source, now, wall)
    |  source normalised: addr[:2], ::ffff:a.b.c.d -> a.b.c.d        (stun.unmap_address)
    |  wire.classify(data)
    +-- STUN ----> the Binding transaction with that id --> reflexive candidate, relay RTT
    |              (HomeRelay picks the device's relay)     --> CandidatesChanged
    +-- RELAY ---> the RelayClient of the relay at `source`
    |                 HELLO/REGISTERED/PONG/ERROR: registration, tickets, keepalive
    |                 RECV(from id, payload) --+
    |                                          |  payload is a tunnel datagram; its source
    |                                          v  is a placeholder "relay:<name>/<id hex>"
    +-- TUNNEL ----------------------> Endpoint.receive(data, src, roam=<came direct>)
                                          |  (a relay is not the peer's address: roam=False)
           replies it queues (handshake   |  events:
           responses, cookie replies) go  |   HandshakeCompleted ---------> Connected
           back the way the datagram came |   FrameReceived(Packet) -------> PacketReceived
                                          |   FrameReceived(Probe) --> ProbeAck(txid, src)
                                          |                            to where it came from
                                          |   FrameReceived(ProbeAck) --> pm.probe_acked
                                          |   FrameReceived(Keepalive)--> pm.received
                                          |   PairingRequested, PAIR_STATE/CONTROL frames
                                          v
                              PathManager of that peer: pm.received(path, now, data=...)
                                SendProbe / SendKeepalive --> session.send(...) to that path
                                PathChanged --------------> PathChanged (the console's
                                                             PathReport, 1:1)

  send_packet(peer_key, packet, now)
    pm.route(now) -> [Direct] | [ViaRelay] | [Direct, ViaRelay] (dual send while SUSPECT)
    session.send_packet(packet)  -> ONE ciphertext, sent on each path (the receiver's
                                    replay window drops the second copy)
    Direct(ip, port)  -> (ciphertext, (ip, port))
    ViaRelay(name)    -> (SEND(peer id, ciphertext), relay address)   the relay sees only
                         ciphertext; over a stream relay: stream_frames_to_send()

  datagrams_to_send() -> [(bytes, (ip, port))]     next_timer() / handle_timer(now, wall)

Where a datagram the *session* makes goes
-----------------------------------------

- Made while handling a received datagram (a handshake response, a cookie reply, the
  initiator's key confirmation): back to where that datagram came from, relay or direct.
- Made by a timer or a send (rekeys, handshake retries, passive keepalives): to the peer's
  ``pm.primary`` (the active direct path, else the relay), else to the session's address,
  else to every direct candidate the peer announced *and* parked: sent once a path exists
  (a device whose home relay is not chosen yet; announced LAN addresses it cannot reach).

Relays
======

A box registers at every relay it is given (devices pick theirs). A device measures each
relay's latency with STUN (relays answer STUN on their relay port; a STUN round every
``stun_interval``) and registers only at its **home relay**, chosen by :class:`HomeRelay`: the
first to answer (requests go out together, so that is the nearest), then a switch only to one
lower by more than 20 % and 10 ms on 3 consecutive measurements. The previous home stays
registered for ``relay_grace`` seconds so datagrams already on their way still arrive.
A relay reached over TCP/TLS/WebSocket (``stream=True``: UDP is blocked) is always registered;
its frames leave through :meth:`Peer.stream_frames_to_send` and come back through
:meth:`Peer.receive_stream`.

The relay a path manager falls back to is one both sides are registered at, in the device's
order of preference: a device sends through its home relay; the box sends to a device through
the relay that device's datagrams last came through, else the first one it announced.

Datagrams for a relay we are still (re)registering at wait in a small queue (``relay_queue``)
and leave the moment REGISTERED arrives: a relay restart costs a round trip, not a retry timer.

Time
====

``now`` is monotonic seconds, ``wall`` unix seconds (for Noise IK timestamps); neither is read
here. The box's negotiation says "start probing in N ms": :meth:`Peer.schedule_start` takes
that *delay* and each side adds it to its own clock (the two clocks share no epoch).

Limits: :meth:`next_timer` and :meth:`handle_timer` visit every remote peer (fine for a box's
hundreds of devices; a heap would be the next step for many thousands).
"""

from __future__ import annotations

import os
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transport import paths, stun, wire
from transport.paths import (
    Candidate,
    CandidateKind,
    Destination,
    Direct,
    PathConfig,
    PathManager,
    SendKeepalive,
    SendProbe,
    ViaRelay,
)
from transport.relay import (
    ZERO_KEY,
    RelayClient,
    RelayEvent,
    RelayLost,
    RelayReceived,
    RelayRegistered,
)
from transport.session import (
    Endpoint,
    EndpointChanged,
    HandshakeCompleted,
    HandshakeFailed,
    Keys,
    Session,
    SessionClosed,
)
from transport.session import Event as SessionEvent
from transport.session import (
    FrameReceived as SessionFrame,
)
from transport.session import PairingRequested as SessionPairing
from transport.wire import Address, Pattern

__all__ = [
    "CandidatesChanged",
    "Connected",
    "Disconnected",
    "FrameReceived",
    "HomeRelay",
    "PacketReceived",
    "PairingRequested",
    "PathChanged",
    "Peer",
    "PeerConfig",
    "PeerEvent",
]

RELAY_SOURCE = "relay:"  # prefix of the placeholder source of relayed tunnel datagrams


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """A session with ``peer_key`` is up (its first handshake, or the first after it was down).
    Rekeys do not repeat it."""

    peer_key: bytes
    pattern: Pattern


@dataclass(frozen=True, slots=True)
class Disconnected:
    """No session with ``peer_key`` is left (the box: its keys expired; a device: the box did
    not answer a handshake for 90 s). Report the device offline."""

    peer_key: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class PathChanged:
    """Where ``peer_key``'s datagrams go now, field for field the console's ``PathReport``:
    ``kind`` a ``PathKind`` value, ``endpoint`` ``ip:port`` / ``[ip6]:port`` of a direct path
    (``""`` when relayed), ``relay`` the relay's name (``""`` when direct), ``rtt_ms`` the
    direct path's smoothed RTT, ``cause`` a few words for the timeline."""

    peer_key: bytes
    kind: str
    endpoint: str
    relay: str
    rtt_ms: float | None
    cause: str


@dataclass(frozen=True, slots=True)
class PacketReceived:
    """An IP packet from ``peer_key``, and the path it came on (for counters)."""

    peer_key: bytes
    packet: bytes
    path: Destination


@dataclass(frozen=True, slots=True)
class FrameReceived:
    """A PAIR_STATE or CONTROL frame from ``peer_key`` (path frames stay inside the Peer)."""

    peer_key: bytes
    frame: wire.InnerFrame
    pattern: Pattern


@dataclass(frozen=True, slots=True)
class PairingRequested:
    """Box side: a device finished an XK handshake with a pairing secret and its facts. May
    repeat for the same key (rekeys, retries): handle it idempotently."""

    peer_key: bytes
    secret: bytes
    facts: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CandidatesChanged:
    """Our candidates changed (a reflexive address found, a home relay chosen, the adapter's
    list replaced): give them to the negotiation, which hands them to the other side."""

    candidates: tuple[Candidate, ...]


PeerEvent = (
    Connected
    | Disconnected
    | PathChanged
    | PacketReceived
    | FrameReceived
    | PairingRequested
    | CandidatesChanged
)


# --- the home relay ----------------------------------------------------------------------------


class HomeRelay:
    """A device's choice of relay by latency, with hysteresis (sans-IO).

    Feed every latency measurement (``measured``) and every relay that failed to answer
    (``failed``); both return the new home when it changes, else None.

    - No home yet: the first relay measured becomes home (a round's requests leave together,
      so the first answer is the nearest relay), or the first one fed to ``fallback``.
    - Then another relay takes over only when it is lower than the home's latest latency by
      more than ``margin`` (20 %) *and* ``min_gain`` (10 ms) on ``streak`` (3) consecutive
      measurements of its own; one measurement that is not clearly better resets its count.
    - A home that failed to answer, or whose latest measurement is older than ``max_age``, is
      left at once for the relay with the lowest fresh latency.
    """

    def __init__(
        self,
        *,
        margin: float = 0.2,
        min_gain: float = 0.010,
        streak: int = 3,
        max_age: float = 120.0,
    ) -> None:
        if not 0 <= margin < 1 or min_gain < 0 or streak < 1 or max_age <= 0:
            raise ValueError("0 <= margin < 1, min_gain >= 0, streak >= 1, max_age > 0")
        self.margin = margin
        self.min_gain = min_gain
        self.streak = streak
        self.max_age = max_age
        self.home: str | None = None
        self._latest: dict[str, tuple[float, float]] = {}  # name -> (rtt, when)
        self._streaks: Counter[str] = Counter()

    def latency(self, name: str) -> float | None:
        entry = self._latest.get(name)
        return None if entry is None else entry[0]

    def measured(self, name: str, rtt: float, now: float) -> str | None:
        self._latest[name] = (rtt, now)
        if self.home is None:
            return self._switch(name)
        if name == self.home:
            return None
        home = self._latest.get(self.home)
        if home is None or now - home[1] > self.max_age:
            return self._best(now)  # the home has not answered in a long time
        if rtt < home[0] * (1 - self.margin) and home[0] - rtt > self.min_gain:
            self._streaks[name] += 1
            if self._streaks[name] >= self.streak:
                return self._switch(name)
        else:
            self._streaks[name] = 0
        return None

    def failed(self, name: str, now: float) -> str | None:
        self._latest.pop(name, None)
        self._streaks.pop(name, None)
        if name != self.home:
            return None
        return self._best(now)

    def fallback(self, name: str) -> str | None:
        """Nothing measured in time (STUN blocked?): take ``name`` if there is no home."""
        return self._switch(name) if self.home is None else None

    def _best(self, now: float) -> str | None:
        fresh = {
            n: rtt
            for n, (rtt, when) in self._latest.items()
            if n != self.home and now - when <= self.max_age
        }
        if not fresh:
            return None
        return self._switch(min(fresh, key=fresh.__getitem__))

    def _switch(self, name: str) -> str:
        self.home = name
        self._streaks.clear()
        return name


# --- configuration and per-relay / per-peer state ----------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerConfig:
    paths: PathConfig = field(default_factory=PathConfig)
    stun_interval: float = 30.0  # a STUN round to every relay: reflexive address, latencies
    stun_rto: float = 0.25  # STUN retransmissions as netcheck's: 0, 0.25, 0.75 s, fail at 1.75 s
    stun_attempts: int = 3
    stun_final_wait: float = 1.0
    home_timeout: float = 2.0  # no relay answered STUN by then: the first one is home
    relay_grace: float = 60.0  # a device's previous home relay stays registered this long
    relay_queue: int = 64  # datagrams held per relay while (re)registering
    relay_keepalive: float = 20.0  # PING interval (under 30 s NAT mapping timeouts)
    # A box pings its relays more often: it learns of a relay's restart only from the answer to
    # something it sends, and until it registers again no device can reach it through there.
    box_relay_keepalive: float = 3.0

    def __post_init__(self) -> None:
        if min(self.stun_interval, self.stun_rto, self.home_timeout, self.relay_keepalive) <= 0:
            raise ValueError("intervals must be positive")
        if self.stun_attempts < 1 or self.relay_queue < 0 or self.relay_grace < 0:
            raise ValueError("stun_attempts >= 1, relay_queue >= 0, relay_grace >= 0")


class _Relay:
    __slots__ = ("address", "client", "last_sent", "name", "queue", "retire_at", "stream", "via")

    def __init__(self, name: str, address: Address, stream: bool) -> None:
        self.name = name
        self.address = address
        self.stream = stream
        self.via = ViaRelay(name)
        self.client: RelayClient | None = None  # None: not registered there (not our home)
        self.queue: deque[tuple[bytes, bytes]] = deque()  # (peer id, payload) until REGISTERED
        self.retire_at: float | None = None  # a device's former home: unregister then
        # The last datagram sent through it: a relay that answers it with HELLO (it restarted,
        # or we roamed) has dropped it, and it is often the one that matters (a TCP retransmit)
        self.last_sent: tuple[bytes, bytes] | None = None


class _Remote:
    """What we keep about one remote static key."""

    __slots__ = ("candidates", "connected", "heard_relay", "id", "last_path", "parked", "pm")

    def __init__(self, key: bytes) -> None:
        self.id = wire.peer_id(key)
        self.pm: PathManager | None = None
        self.candidates: list[Candidate] = []  # as the peer announced them
        self.heard_relay: str | None = None  # the relay its datagrams last came through
        self.connected: set[Pattern] = set()  # patterns with an established session
        self.last_path: paths.PathChanged | None = None  # the PM's latest announcement
        self.parked: bytes | None = None  # a session datagram that had nowhere to go


# --- the peer ------------------------------------------------------------------------------------


class Peer:
    """See the module docstring. ``is_allowed`` (box) answers IK handshakes from those keys,
    ``allow_pairing`` (box) answers XK; ``ticket_public`` is the box's Ed25519 ticket key
    (relays learn it when the box registers); a device passes none of them. Tests pass a
    seeded ``random_bytes`` (probe ids) and ``rng`` (handshake retry jitter)."""

    def __init__(
        self,
        keys: Keys,
        *,
        now: float,
        is_allowed: Callable[[bytes], bool] | None = None,
        allow_pairing: bool = False,
        ticket_public: bytes = ZERO_KEY,
        config: PeerConfig | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        rng: random.Random | None = None,
    ) -> None:
        self.keys = keys
        self.config = config or PeerConfig()
        self.is_box = is_allowed is not None or allow_pairing
        self.endpoint = Endpoint(keys, is_allowed=is_allowed, allow_pairing=allow_pairing, rng=rng)
        self.home = None if self.is_box else HomeRelay()
        self.stats: Counter[str] = Counter()  # what was dropped and why
        self._ticket_public = ticket_public
        self._random_bytes = random_bytes
        self._relays: dict[str, _Relay] = {}
        self._by_address: dict[Address, _Relay] = {}
        self._remotes: dict[bytes, _Remote] = {}
        self._tickets: list[bytes] = []
        self._local: list[Candidate] = []  # from the adapter: LAN, egress, IPv6, port-mapped
        self._reflexive: dict[str, Direct] = {}  # relay name -> our address as it sees us
        self._announced: tuple[Candidate, ...] = ()
        self._stun: dict[bytes, tuple[str, stun.BindingTransaction]] = {}
        self._stun_at: float | None = None  # the next STUN round
        self._home_deadline: float | None = None
        self._relay_sources: dict[tuple[str, bytes], Address] = {}
        self._sources: dict[Address, Address] = {}  # socket source -> normalised (ip, port)
        self._out: list[tuple[bytes, Address]] = []
        self._stream_out: list[tuple[str, bytes]] = []
        self._events: list[PeerEvent] = []

    # --- status ----------------------------------------------------------------------------

    def path(self, peer_key: bytes) -> PathManager | None:
        """The path manager of ``peer_key`` (read it; don't drive it)."""
        remote = self._remotes.get(peer_key)
        return None if remote is None else remote.pm

    def session(self, peer_key: bytes, pattern: Pattern = Pattern.IK) -> Session | None:
        return self.endpoint.session(peer_key, pattern)

    def relay_client(self, name: str) -> RelayClient | None:
        relay = self._relays.get(name)
        return None if relay is None else relay.client

    def local_candidates(self) -> list[Candidate]:
        """Everything the other side should know to reach us: the adapter's candidates, our
        reflexive addresses, the relays we are registered at (the preferred one first)."""
        out = list(self._local)
        known = {c.address for c in out}
        relays = self._our_relays()
        for name in relays:
            # As the relays we are registered at see us: their keepalives hold those mappings
            # open (a mapping towards a relay we only measure may be gone by the time a peer
            # tries it). One address behind an endpoint-independent NAT (an open host or a port
            # mapping: already listed); one per relay behind a symmetric one (useless but
            # harmless: the peer learns the right one when our probes arrive).
            reflexive = self._reflexive.get(name)
            if reflexive is not None and reflexive not in known:
                known.add(reflexive)
                out.append(Candidate(CandidateKind.REFLEXIVE, reflexive))
        out += [Candidate(CandidateKind.RELAY, ViaRelay(name)) for name in relays]
        return out

    # --- configuration -----------------------------------------------------------------------

    def add_relay(self, name: str, address: Address, now: float, *, stream: bool = False) -> None:
        """A relay we may use: a box registers at once; a device measures it and registers
        only if it becomes home. ``stream``: reach it over TCP/TLS/WebSocket (UDP blocked)."""
        if name in self._relays:
            raise ValueError(f"relay {name!r} is already known")
        relay = _Relay(name, stun.unmap_address(address), stream)
        self._relays[name] = relay
        if not stream:
            self._by_address[relay.address] = relay
        if self.is_box or stream:
            self._register(relay, now)
            self._resync(now)
        elif self.home is not None and self.home.home is None and self._home_deadline is None:
            self._home_deadline = now + self.config.home_timeout
        if not stream:
            self._stun_round(now, [relay])
        if self._stun_at is None:
            self._stun_at = now + self.config.stun_interval

    def relay_over_stream(self, name: str, now: float) -> None:
        """UDP to ``name`` goes nowhere (blocked): from now on it is reached over the stream
        the adapter opens (and then reports with :meth:`stream_connected`). The relay keeps its
        name, so sessions routed through it stay where they are."""
        relay = self._relays[name]
        if relay.stream:
            return
        relay.stream = True
        if self._by_address.get(relay.address) is relay:
            del self._by_address[relay.address]
        if relay.client is not None:
            relay.client = None  # a fresh registration, on the stream this time
            self._register(relay, now)

    def add_ticket(self, ticket: wire.Ticket | bytes) -> None:
        """A ticket from the box, presented to every relay we register at."""
        raw = ticket.encode() if isinstance(ticket, wire.Ticket) else bytes(ticket)
        wire.Ticket.decode(raw)  # WireError now rather than at the relay
        self._tickets.append(raw)
        for relay in self._relays.values():
            if relay.client is not None:
                relay.client.add_ticket(raw)
                self._flush_relay(relay)

    def set_local_candidates(self, candidates: Iterable[Candidate], now: float) -> None:
        """Our candidates the adapter knows (LAN, egress, global IPv6, port mappings); the Peer
        adds reflexive addresses and relays itself."""
        self._local = [c for c in candidates if c.kind is not CandidateKind.RELAY]
        self._resync(now)

    def set_remote_candidates(
        self, peer_key: bytes, candidates: Iterable[Candidate], now: float
    ) -> None:
        """``peer_key``'s candidates, from the negotiation (replacing earlier ones)."""
        remote = self._remote(peer_key)
        remote.candidates = list(candidates)
        self._sync(peer_key, remote, now)

    def schedule_start(self, peer_key: bytes, delay: float, now: float) -> None:
        """The negotiation's simultaneous start: probe ``peer_key``'s candidates ``delay``
        seconds from ``now`` (each side converts the delay to its own clock)."""
        remote = self._remote(peer_key)
        pm = self._pm(peer_key, remote, now)
        pm.schedule(now + max(0.0, delay))
        self._pump(peer_key, remote, now)

    def network_changed(self, now: float) -> list[PeerEvent]:
        """Our addresses or interfaces changed: every mapping may be gone. Paths are checked at
        once (data goes direct and via relay meanwhile), relays are registered again from the
        new address and STUN runs again."""
        for key, remote in list(self._remotes.items()):
            if remote.pm is not None:
                remote.pm.network_changed(now)
                self._pump(key, remote, now)
        for relay in self._relays.values():
            if relay.client is not None:
                relay.client.connect(now)
                self._flush_relay(relay)
        self._reflexive.clear()  # found again by this STUN round
        self._resync(now)
        self._stun_round(now, [r for r in self._relays.values() if not r.stream])
        return self.take_events()

    # --- sessions ------------------------------------------------------------------------------

    def connect(self, peer_key: bytes, now: float, wall: float) -> None:
        """Device: open (or re-open) the IK session to the box ``peer_key``."""
        session = self.endpoint.connect(peer_key)
        remote = self._remote(peer_key)
        self._pm(peer_key, remote, now)
        self._send_session(peer_key, session.initiate(now, wall), None)
        self._drain_endpoint(now, None)

    def pair(
        self,
        peer_key: bytes,
        secret: bytes,
        facts: dict[str, Any],
        now: float,
        wall: float,
    ) -> None:
        """Device: a pairing (XK) session to the box ``peer_key``; see ``session.Endpoint.pair``."""
        session = self.endpoint.pair(peer_key, secret, facts)
        remote = self._remote(peer_key)
        self._pm(peer_key, remote, now)
        self._send_session(peer_key, session.initiate(now, wall), None)
        self._drain_endpoint(now, None)

    def send_packet(self, peer_key: bytes, packet: bytes, now: float) -> bool:
        """Send one IP packet to ``peer_key`` on its path(s). False if it could not go (it is
        dropped, as a lost packet would be): no session, or no keys — then a device starts a
        handshake, as WireGuard does, so traffic brings a lost session back."""
        session = self.endpoint.session(peer_key)
        if session is None or not (session.established or session.is_initiator):
            self.stats["no_session"] += 1
            return False
        remote = self._remote(peer_key)
        pm = self._pm(peer_key, remote, now)
        routes = pm.route(now) if session.established else []
        data = session.send_packet(packet, now)
        if data is None:  # no usable keys: the initiator queued a handshake
            self._drain_endpoint(now, None)
            return False
        for destination in routes:
            self._send_on(remote, destination, data)
        self._pump(peer_key, remote, now)
        return bool(routes)

    def send_frame(
        self, peer_key: bytes, frame: wire.InnerFrame, now: float, *, pattern: Pattern = Pattern.IK
    ) -> bool:
        """Send a PAIR_STATE or CONTROL frame (a pairing session carries nothing else:
        ``session.SessionError``)."""
        session = self.endpoint.session(peer_key, pattern)
        if session is None:
            return False
        data = session.send(frame, now)
        if data is None:
            self._drain_endpoint(now, None)
            return False
        remote = self._remote(peer_key)
        if pattern is Pattern.IK and remote.pm is not None:
            for destination in remote.pm.route(now):
                self._send_on(remote, destination, data)
            self._pump(peer_key, remote, now)
        else:
            self._send_session(peer_key, data, session.address)
        return True

    # --- the sans-IO surface ---------------------------------------------------------------------

    def receive(self, data: bytes, source: Address, now: float, wall: float) -> list[PeerEvent]:
        """One datagram from our UDP socket. Never raises on any input."""
        try:
            addr = self._sources.get(source)
            if addr is None:  # parsing an address costs a third of a packet's time: once
                addr = stun.unmap_address(source)
                if len(self._sources) >= 4096:
                    self._sources.clear()
                self._sources[source] = addr
            kind = wire.classify(data)
        except (wire.WireError, AttributeError, IndexError, TypeError):
            self.stats["unparseable"] += 1
            return self.take_events()
        if kind is wire.Kind.TUNNEL:
            self._on_tunnel(data, addr, Direct(addr[0], addr[1]), now, wall)
        elif kind is wire.Kind.STUN:
            self._on_stun(data, addr, now)
        else:
            relay = self._by_address.get(addr)
            if relay is None or relay.client is None:
                self.stats["relay_frame_from_stranger"] += 1
            else:
                self._on_relay(relay, relay.client.receive(data, now), now, wall)
        return self.take_events()

    def receive_stream(self, relay: str, frame: bytes, now: float, wall: float) -> list[PeerEvent]:
        """One relay frame off the stream connection to ``relay`` (length prefix removed)."""
        link = self._relays.get(relay)
        if link is None or link.client is None:
            self.stats["relay_frame_from_stranger"] += 1
        else:
            self._on_relay(link, link.client.receive(frame, now), now, wall)
        return self.take_events()

    def stream_connected(self, relay: str, now: float) -> None:
        """The adapter (re)opened the stream to ``relay``: register over it."""
        link = self._relays.get(relay)
        if link is not None and link.client is not None:
            link.client.connect(now)
            self._flush_relay(link)

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """(datagram, UDP destination) pairs queued since the last call, in order."""
        out, self._out = self._out, []
        return out

    def stream_frames_to_send(self) -> list[tuple[str, bytes]]:
        """(relay name, frame) for relays reached over a stream: frame them with
        ``wire.frame_stream`` (TCP, TLS) or send each as one WebSocket message."""
        out, self._stream_out = self._stream_out, []
        return out

    def take_events(self) -> list[PeerEvent]:
        """Events queued by calls that do not return them (send_packet, schedule_start…).
        :meth:`receive` and :meth:`handle_timer` return these too."""
        out, self._events = self._events, []
        return out

    def next_timer(self) -> float | None:
        """When :meth:`handle_timer` must run next (it may already be past), or None."""
        deadlines: list[float | None] = [
            self.endpoint.next_timer(),
            self._stun_at,
            self._home_deadline,
        ]
        for remote in self._remotes.values():
            if remote.pm is not None:
                deadlines.append(remote.pm.next_timer())
        for relay in self._relays.values():
            if relay.client is not None:
                deadlines.append(relay.client.next_timer())
                deadlines.append(relay.retire_at)
        deadlines += [tx.next_timer() for _, tx in self._stun.values()]
        due = [d for d in deadlines if d is not None]
        return min(due) if due else None

    def handle_timer(self, now: float, wall: float) -> list[PeerEvent]:
        """Run everything due at ``now``: session timers, path probes and keepalives, relay
        registration and pings, STUN retransmissions and rounds."""
        self._on_session_events(self.endpoint.handle_timer(now, wall), None, now)
        self._drain_endpoint(now, None)
        for key, remote in list(self._remotes.items()):
            if remote.connected:  # a device's keys expire without an event of their own
                self._check_sessions(key, "keys expired")
        for key, remote in list(self._remotes.items()):
            pm = remote.pm
            if pm is not None and (due := pm.next_timer()) is not None and due <= now:
                pm.handle_timer(now)
                self._pump(key, remote, now)
        for relay in list(self._relays.values()):
            client = relay.client
            if client is None:
                continue
            if relay.retire_at is not None and now >= relay.retire_at:
                self._unregister(relay, now)
                continue
            if (due := client.next_timer()) is not None and due <= now:
                self._on_relay(relay, client.on_timer(now), now, wall)
        for txid, (name, tx) in list(self._stun.items()):
            if (due := tx.next_timer()) is not None and due <= now:
                for request, server in tx.datagrams_to_send(now):
                    self._out.append((request, server))
                if tx.done:
                    del self._stun[txid]
                    self._stun_done(name, tx, now)
        if self._stun_at is not None and now >= self._stun_at:
            self._stun_round(now, [r for r in self._relays.values() if not r.stream])
        if self._home_deadline is not None and now >= self._home_deadline:
            self._home_deadline = None
            first = next((r for r in self._relays.values() if not r.stream), None)
            if self.home is not None and first is not None and not self._our_relays():
                self._home_changed(self.home.fallback(first.name), now)
        return self.take_events()

    # --- tunnel datagrams ------------------------------------------------------------------------

    def _on_tunnel(
        self, data: bytes, source: Address, path: Destination, now: float, wall: float
    ) -> None:
        direct = isinstance(path, Direct)
        events = self.endpoint.receive(data, source, now, wall, roam=direct)
        self._drain_endpoint(now, source)
        if events:
            self._on_session_events(events, path, now)

    def _on_session_events(
        self, events: Sequence[SessionEvent], path: Destination | None, now: float
    ) -> None:
        for event in events:
            if isinstance(event, SessionFrame):
                if path is not None:
                    self._on_frame(event, path, now)
            elif isinstance(event, HandshakeCompleted):
                self._on_handshake(event.peer_key, event.pattern, path, now)
            elif isinstance(event, SessionPairing):
                self._events.append(PairingRequested(event.peer_key, event.secret, event.facts))
            elif isinstance(event, SessionClosed):
                self._check_sessions(event.peer_key, event.reason)
            elif isinstance(event, HandshakeFailed):
                # Only the initiator's giving up can end anything; a refused or replayed
                # initiation at the box (source given) is counted and forgotten.
                if event.source is None and event.peer_key is not None:
                    self._check_sessions(event.peer_key, event.reason)
                else:
                    self.stats["handshake_refused"] += 1
            elif isinstance(event, EndpointChanged):
                pass  # the path manager learns new sources from pm.received

    def _on_frame(self, event: SessionFrame, path: Destination, now: float) -> None:
        key = event.peer_key
        remote = self._remote(key)
        if isinstance(path, ViaRelay) and remote.heard_relay != path.relay:
            remote.heard_relay = path.relay  # where to answer it through (box side)
            self._sync(key, remote, now)
        pm = self._pm(key, remote, now)
        frame = event.frame
        if isinstance(frame, wire.Packet):
            pm.received(path, now, data=True)
            self._events.append(PacketReceived(key, frame.data, path))
        elif isinstance(frame, wire.Probe):
            pm.received(path, now)
            if isinstance(path, Direct):  # probes only ever go direct; answer where from
                ack = event.session.send(wire.ProbeAck(frame.txid, path.addr), now)
                if ack is not None:
                    self._out.append((ack, path.addr))
        elif isinstance(frame, wire.ProbeAck):
            pm.probe_acked(frame.txid, path, frame.observed, now)
        elif isinstance(frame, wire.Keepalive):
            pm.received(path, now)
        else:
            pm.received(path, now)
            self._events.append(FrameReceived(key, frame, event.session.pattern))
        self._pump(key, remote, now)

    def _on_handshake(
        self, key: bytes, pattern: Pattern, path: Destination | None, now: float
    ) -> None:
        remote = self._remote(key)
        remote.parked = None  # the handshake it held is done
        newly = not remote.connected
        if pattern not in remote.connected:
            remote.connected.add(pattern)
            self._events.append(Connected(key, pattern))
        pm = self._pm(key, remote, now)
        if isinstance(path, ViaRelay) and remote.heard_relay != path.relay:
            remote.heard_relay = path.relay  # where to answer it through (box side)
            self._sync(key, remote, now)
        if path is not None:
            pm.received(path, now)
        if isinstance(path, ViaRelay) and isinstance(pm.primary, Direct):
            pm.peer_moved(now)  # a handshake through the relay: our direct path is stale
        if newly and remote.last_path is not None:
            self._report(key, remote.last_path)  # what the path manager said before: now show it
        self._pump(key, remote, now)

    def _check_sessions(self, key: bytes, reason: str) -> None:
        """Forget sessions of ``key`` that have no keys left; Disconnected if none is left."""
        remote = self._remotes.get(key)
        if remote is None or not remote.connected:
            return
        for pattern in list(remote.connected):
            session = self.endpoint.session(key, pattern)
            if session is None or not session.established:
                remote.connected.discard(pattern)
        if not remote.connected:
            self._events.append(Disconnected(key, reason))

    # --- where session datagrams go ------------------------------------------------------------

    def _drain_endpoint(self, now: float, reply_to: Address | None) -> None:
        for datagram in self.endpoint.datagrams_to_send():
            if reply_to is not None:  # it answers what just came in: back the same way
                self._send_address(datagram.destination or reply_to, datagram.data)
            elif datagram.peer_key is not None:
                self._send_session(datagram.peer_key, datagram.data, datagram.destination)
            elif datagram.destination is not None:
                self._send_address(datagram.destination, datagram.data)

    def _send_session(self, key: bytes, data: bytes, destination: Address | None) -> None:
        """A datagram the session made on a timer or a send: see the module docstring."""
        remote = self._remote(key)
        primary = remote.pm.primary if remote.pm is not None else None
        if primary is not None:
            self._send_on(remote, primary, data)
        elif destination is not None:
            self._send_address(destination, data)
        else:
            for c in remote.candidates:
                if isinstance(c.address, Direct):
                    self._out.append((data, c.address.addr))
            # Also kept for the first path that appears (the home relay, usually): announced
            # LAN addresses are often not reachable from here, and waiting for the handshake's
            # retry would cost 5 s. A copy arriving twice is refused by TAI64N (replay).
            remote.parked = data

    def _send_on(self, remote: _Remote, destination: Destination, data: bytes) -> None:
        if isinstance(destination, Direct):
            self._out.append((data, destination.addr))
        else:
            self._send_relayed(destination.relay, remote.id, data)

    def _send_address(self, address: Address, data: bytes) -> None:
        relayed = _parse_relay_source(address)
        if relayed is None:
            self._out.append((data, address))
        else:
            self._send_relayed(relayed[0], relayed[1], data)

    # --- relays ---------------------------------------------------------------------------------

    def _send_relayed(self, name: str, destination: bytes, payload: bytes) -> None:
        relay = self._relays.get(name)
        if relay is None or relay.client is None:
            self.stats["no_such_relay"] += 1
            return
        if relay.client.registered:
            relay.last_sent = (destination, payload)
            frame = relay.client.send_frame(destination, payload)
            if relay.stream:
                self._stream_out.append((relay.name, frame))
            else:
                self._out.append((frame, relay.address))
            return
        if len(relay.queue) >= self.config.relay_queue:
            relay.queue.popleft()
            self.stats["relay_queue_full"] += 1
        if self.config.relay_queue:
            relay.queue.append((destination, payload))

    def _flush_relay(self, relay: _Relay) -> None:
        if relay.client is None:
            return
        frames = relay.client.take_outgoing()
        if relay.stream:
            self._stream_out += [(relay.name, frame) for frame in frames]
        else:
            self._out += [(frame, relay.address) for frame in frames]

    def _on_relay(
        self, relay: _Relay, events: Sequence[RelayEvent], now: float, wall: float
    ) -> None:
        for event in events:
            if isinstance(event, RelayReceived):
                payload = event.payload
                if payload and 0x01 <= payload[0] <= 0x0F:  # only tunnel datagrams ride a relay
                    source = self._relay_source(relay.name, event.source)
                    self._on_tunnel(payload, source, relay.via, now, wall)
                else:
                    self.stats["relayed_non_tunnel"] += 1
            elif isinstance(event, RelayLost):
                if relay.last_sent is not None and relay.last_sent not in relay.queue:
                    relay.queue.appendleft(relay.last_sent)  # sent again once registered
                relay.last_sent = None
            elif isinstance(event, RelayRegistered):
                client = relay.client
                assert client is not None
                self._flush_relay(relay)  # the tickets go before the data they allow
                while relay.queue and client.registered:
                    destination, payload = relay.queue.popleft()
                    self._send_relayed(relay.name, destination, payload)
        self._flush_relay(relay)

    def _relay_source(self, name: str, peer: bytes) -> Address:
        """The placeholder source of datagrams ``peer`` sent us through relay ``name``: the
        session queues replies to it, and :meth:`_send_address` turns it back into a SEND."""
        source = self._relay_sources.get((name, peer))
        if source is None:
            if len(self._relay_sources) >= 4096:
                self._relay_sources.clear()
            source = self._relay_sources[(name, peer)] = (f"{RELAY_SOURCE}{name}/{peer.hex()}", 0)
        return source

    def _register(self, relay: _Relay, now: float) -> None:
        relay.retire_at = None
        if relay.client is not None:
            return
        client = RelayClient(
            self.keys.private,
            now=now,
            ticket_public=self._ticket_public,
            keepalive=(
                self.config.box_relay_keepalive if self.is_box else self.config.relay_keepalive
            ),
        )
        for ticket in self._tickets:
            client.add_ticket(ticket)
        relay.client = client
        client.connect(now)
        self._flush_relay(relay)

    def _unregister(self, relay: _Relay, now: float) -> None:
        relay.client = None
        relay.retire_at = None
        relay.queue.clear()
        self._resync(now)

    def _our_relays(self) -> list[str]:
        """The relays we are registered (or registering) at, the preferred one first."""
        names = [name for name, relay in self._relays.items() if relay.client is not None]
        home = self.home.home if self.home is not None else None
        if home in names:
            names.remove(home)
            names.insert(0, home)
        return names

    def _home_changed(self, name: str | None, now: float) -> None:
        if name is None:
            return
        for relay in self._relays.values():
            if relay.client is not None and relay.name != name and not relay.stream:
                relay.retire_at = now + self.config.relay_grace
        self._register(self._relays[name], now)
        self._resync(now)

    # --- STUN -----------------------------------------------------------------------------------

    def _stun_round(self, now: float, relays: Iterable[_Relay]) -> None:
        cfg = self.config
        self._stun_at = now + cfg.stun_interval
        for relay in relays:
            if any(name == relay.name for name, _ in self._stun.values()):
                continue  # the last round's request is still out
            tx = stun.BindingTransaction(
                relay.address,
                now,
                rto=cfg.stun_rto,
                attempts=cfg.stun_attempts,
                final_wait=cfg.stun_final_wait,
            )
            self._stun[tx.transaction_id] = (relay.name, tx)
            self._out += tx.datagrams_to_send(now)

    def _on_stun(self, data: bytes, source: Address, now: float) -> None:
        try:
            message = stun.decode(data)
        except stun.StunError:
            self.stats["bad_stun"] += 1
            return
        entry = self._stun.get(message.transaction_id)
        if entry is None or not entry[1].handle_message(message, source, now):
            self.stats["stray_stun"] += 1
            return
        name, tx = entry
        if tx.done:
            del self._stun[message.transaction_id]
            self._stun_done(name, tx, now)

    def _stun_done(self, name: str, tx: stun.BindingTransaction, now: float) -> None:
        result = tx.result
        if result is None:
            if self.home is not None:
                self._home_changed(self.home.failed(name, now), now)
            return
        try:
            mapped = stun.unmap_address(result.mapped)
            reflexive = Direct(mapped[0], mapped[1])
        except (stun.StunError, ValueError):
            self.stats["bad_stun"] += 1
            return
        if self._reflexive.get(name) != reflexive:
            self._reflexive[name] = reflexive
            self._resync(now)
        # Karn: an answer to a retransmitted request has an ambiguous RTT; don't use it.
        if self.home is not None and result.transmissions == 1:
            self._home_changed(self.home.measured(name, result.rtt, now), now)

    # --- path managers --------------------------------------------------------------------------

    def _remote(self, key: bytes) -> _Remote:
        remote = self._remotes.get(key)
        if remote is None:
            remote = self._remotes[key] = _Remote(key)
        return remote

    def _pm(self, key: bytes, remote: _Remote, now: float) -> PathManager:
        if remote.pm is None:
            remote.pm = PathManager(self.config.paths, now=now, random_bytes=self._random_bytes)
            self._sync(key, remote, now)
        return remote.pm

    def _resync(self, now: float) -> None:
        """Our candidates or relays changed: tell every path manager, and the negotiation."""
        for key, remote in list(self._remotes.items()):
            if remote.pm is not None:
                self._sync(key, remote, now)
        candidates = tuple(self.local_candidates())
        if candidates != self._announced:
            self._announced = candidates
            self._events.append(CandidatesChanged(candidates))

    def _sync(self, key: bytes, remote: _Remote, now: float) -> None:
        pm = remote.pm
        if pm is None:
            return
        ours = self._our_relays()
        theirs = [c.address.relay for c in remote.candidates if isinstance(c.address, ViaRelay)]
        if self.is_box:
            # The device chose: the relay it last spoke through, then the ones it announced.
            heard = [remote.heard_relay] if remote.heard_relay is not None else []
            relays = [r for r in dict.fromkeys(heard + theirs) if r in ours]
        else:
            relays = [r for r in ours if not theirs or r in theirs]
        pm.local_candidates(c for c in self.local_candidates() if c.kind is not CandidateKind.RELAY)
        pm.remote_candidates(
            [c for c in remote.candidates if isinstance(c.address, Direct)]
            + [Candidate(CandidateKind.RELAY, ViaRelay(r)) for r in relays]
        )
        if remote.parked is not None and pm.primary is not None:
            data, remote.parked = remote.parked, None
            self._send_on(remote, pm.primary, data)
        self._pump(key, remote, now)

    def _pump(self, key: bytes, remote: _Remote, now: float) -> None:
        """Carry out what the path manager asked for."""
        pm = remote.pm
        if pm is None:
            return
        for out in pm.take_outputs():
            if isinstance(out, SendProbe):
                self._send_path_frame(key, remote, wire.Probe(out.txid), out.destination, now)
            elif isinstance(out, SendKeepalive):
                self._send_path_frame(key, remote, wire.Keepalive(), out.destination, now)
            else:
                remote.last_path = out
                if remote.connected:
                    self._report(key, out)

    def _send_path_frame(
        self, key: bytes, remote: _Remote, frame: wire.InnerFrame, dest: Direct, now: float
    ) -> None:
        session = self.endpoint.session(key)
        if session is None or not session.established:
            self.stats["path_frame_without_session"] += 1
            return
        data = session.send(frame, now)
        if data is None:
            self._drain_endpoint(now, None)
            return
        self._out.append((data, dest.addr))

    def _report(self, key: bytes, out: paths.PathChanged) -> None:
        new = out.new
        self._events.append(
            PathChanged(
                key,
                out.kind,
                str(new) if isinstance(new, Direct) else "",
                new.relay if isinstance(new, ViaRelay) else "",
                None if out.rtt is None else out.rtt * 1000,
                out.cause,
            )
        )


def _parse_relay_source(address: Address) -> tuple[str, bytes] | None:
    host = address[0]
    if not host.startswith(RELAY_SOURCE):
        return None
    name, _, peer = host[len(RELAY_SOURCE) :].rpartition("/")
    try:
        return name, bytes.fromhex(peer)
    except ValueError:
        return None
