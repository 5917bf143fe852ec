"""The in-memory NAT lab the Peer tests share: a relay host, a box and a client on ``natsim``.

Not a test module (no ``test_`` prefix): ``test_nat_matrix.py`` and ``test_peer.py`` import it.
Everything is real except the network: Noise sessions (IK, the client's key in the box's
allow-list), tickets signed by the box's ticket key, relay registration with proofs, STUN
answered by ``stun.StunResponder`` through ``RelayCore``'s hook. Time is ``Network.now``;
the wall clock is ``WALL0 + now``. The client's monotonic clock runs 1000 s ahead of the box's
(``client_clock``): a Peer must never mix its clock with the other side's.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from transport import natsim, wire
from transport.natsim import Datagram, Network
from transport.paths import Candidate, CandidateKind, Destination, Direct, ViaRelay
from transport.peer import (
    Connected,
    PacketReceived,
    PairingRequested,
    PathChanged,
    Peer,
    PeerConfig,
    PeerEvent,
)
from transport.relay import RelayCore
from transport.session import Keys
from transport.stun import StunResponder
from transport.tickets import TicketKey

WALL0 = 1_767_225_600.0
RELAY_IP = "192.0.2.1"
RELAY_UDP = (RELAY_IP, 3478)
RELAY_TCP = (RELAY_IP, 443)
RELAY = "r1"
PORT = 41641
CLIENT_PUBLIC = "203.0.113.10"
BOX_PUBLIC = "198.51.100.20"


class SimRelay:
    """A public relay host: ``RelayCore`` on UDP 3478 (with STUN) and on "TCP" 443."""

    def __init__(self, net: Network, ip: str = RELAY_IP, name: str = "relay") -> None:
        self.net = net
        self.host = host = net.add_host(name, ip)
        self.udp = host.bind(RELAY_UDP[1], on_receive=self._on_udp)
        self.tcp = host.bind(RELAY_TCP[1], on_receive=self._on_tcp)
        self.stun = StunResponder()
        self.core = self._new_core()
        self.restarts = 0
        self._tick()

    def _new_core(self) -> RelayCore:
        return RelayCore(now=self.net.now, wall_offset=WALL0, stun_handler=self._stun)

    def restart(self) -> None:
        """The relay process restarts: every registration, ticket and grant is gone."""
        self.core = self._new_core()
        self.restarts += 1

    def _stun(self, data: bytes, source: wire.Address, now: float) -> bytes | None:
        for reply, destination, _ in self.stun.handle(data, source, source, now):
            if destination == source:
                return reply
        return None

    def _on_udp(self, dg: Datagram) -> None:
        self._send(self.core.receive(dg.data, dg.src, self.net.now, dg.src))

    def _on_tcp(self, dg: Datagram) -> None:
        self._send(self.core.receive(dg.data, ("tcp", dg.src), self.net.now, dg.src))

    def _send(self, out: Iterable[tuple[object, bytes]]) -> None:
        for handle, frame in out:
            if isinstance(handle, tuple) and handle[0] == "tcp":
                self.tcp.sendto(frame, handle[1], proto="tcp")
            else:
                assert isinstance(handle, tuple)
                self.udp.sendto(frame, (str(handle[0]), int(handle[1])))

    def _tick(self) -> None:
        self.core.on_timer(self.net.now)
        self.net.call_later(5.0, self._tick)


@dataclass
class Node:
    """A Peer on a natsim socket: delivers what it sends, runs its timers, logs its events."""

    net: Network
    name: str
    peer: Peer
    host: natsim.Host
    port: int = PORT
    clock: float = 0.0  # this peer's monotonic clock reads network time + clock
    events: list[tuple[float, PeerEvent]] = field(default_factory=list)
    received: list[tuple[float, int, Destination]] = field(default_factory=list)
    sent: list[tuple[float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = self.host.bind(self.port, on_receive=self._on_datagram)
        self._timer: natsim.Timer | None = None
        self._due = 0.0  # the peer's deadline the timer was set for, on the peer's clock
        self._seq = 0
        self._stream_every: float | None = None
        self.flush()

    @property
    def now(self) -> float:
        """The peer's own monotonic clock: each side of a connection has its own epoch."""
        return self.net.now + self.clock

    @property
    def wall(self) -> float:
        return WALL0 + self.net.now

    def _on_datagram(self, dg: Datagram) -> None:
        now = self.now
        if dg.proto == "tcp":
            self._log(self.peer.receive_stream(RELAY, dg.data, now, self.wall))
        else:
            self._log(self.peer.receive(dg.data, dg.src, now, self.wall))
        self.flush()

    def _on_timer(self) -> None:
        self._timer = None
        # max(): network time + clock can round to a hair before the deadline it came from
        self._log(self.peer.handle_timer(max(self.now, self._due), self.wall))
        self.flush()

    def _log(self, events: list[PeerEvent]) -> None:
        now = self.net.now
        for event in events:
            if isinstance(event, PacketReceived):
                seq = int.from_bytes(event.packet[:4], "big")
                self.received.append((now, seq, event.path))
            else:
                self.events.append((now, event))

    def flush(self) -> None:
        """Put on the wire what the peer queued, and set its timer."""
        self._log(self.peer.take_events())
        for data, destination in self.peer.datagrams_to_send():
            self.sock.sendto(data, destination)
        for _, frame in self.peer.stream_frames_to_send():
            self.sock.sendto(frame, RELAY_TCP, proto="tcp")
        due = self.peer.next_timer()
        if self._timer is not None and due != self._due:
            self._timer.cancel()
            self._timer = None
        if due is not None and self._timer is None:
            self._due = due
            self._timer = self.net.call_at(due - self.clock, self._on_timer)

    # -- the test's verbs --

    def send(self, other: Node) -> None:
        """One IP packet of 300 bytes, numbered, to ``other``."""
        self._seq += 1
        packet = self._seq.to_bytes(4, "big") + random.Random(self._seq).randbytes(296)
        self.sent.append((self.net.now, self._seq))
        self.peer.send_packet(other.peer.keys.public, packet, self.now)
        self.flush()

    def stream(self, other: Node, every: float | None) -> None:
        """Send a packet to ``other`` every ``every`` seconds from now on (None: stop)."""
        self._stream_every = every
        if every is not None:
            self.net.call_later(0, lambda: self._stream_tick(other, every))

    def _stream_tick(self, other: Node, every: float) -> None:
        if self._stream_every != every:
            return
        self.send(other)
        self.net.call_later(every, lambda: self._stream_tick(other, every))

    def move(self, host: natsim.Host) -> None:
        """The device joins another network: a new socket there, same Peer."""
        self.sock.close()
        self.host = host
        self.sock = host.bind(self.port, on_receive=self._on_datagram)
        self._log(self.peer.network_changed(self.now))
        self.flush()

    # -- reading the log --

    def paths(self) -> list[tuple[float, PathChanged]]:
        return [(t, e) for t, e in self.events if isinstance(e, PathChanged)]

    def kinds(self) -> list[str]:
        return [e.kind for _, e in self.paths()]

    def connected_at(self) -> float | None:
        return next((t for t, e in self.events if isinstance(e, Connected)), None)

    def pairing_requests(self) -> list[PairingRequested]:
        return [e for _, e in self.events if isinstance(e, PairingRequested)]


def host_candidates(host: natsim.Host, port: int = PORT) -> list[Candidate]:
    """What the adapter would find on the host's interfaces."""
    out = []
    for address in host.addresses:
        direct = Direct(address, port)
        if ":" in address:
            out.append(Candidate(CandidateKind.IPV6, direct))
        elif address.startswith(("10.", "192.168.", "172.")):
            out.append(Candidate(CandidateKind.LAN, direct))
        else:
            out.append(Candidate(CandidateKind.EGRESS, direct))  # a public address, no NAT
    return out


@dataclass
class Lab:
    net: Network
    relay: SimRelay
    box: Node
    client: Node
    box_router: natsim.Router
    client_router: natsim.Router
    box_mapping: Candidate | None
    allowed: set[bytes]  # the box's approved device keys (its is_allowed)
    ticket_key: TicketKey

    @property
    def box_key(self) -> bytes:
        return self.box.peer.keys.public

    @property
    def client_key(self) -> bytes:
        return self.client.peer.keys.public

    def connect(self) -> None:
        """The client opens its IK session (through its relay: it has no other path yet)."""
        self.client.peer.connect(self.box_key, self.client.now, self.client.wall)
        self.client.flush()

    def exchange_candidates(self, delay: float = 0.5) -> None:
        """What the box's negotiation will do: each side gets the other's candidates, and a
        simultaneous start ``delay`` seconds from now."""
        client_cands = self.client.peer.local_candidates()
        box_cands = self.box.peer.local_candidates()
        self.box.peer.set_remote_candidates(self.client_key, client_cands, self.box.now)
        self.client.peer.set_remote_candidates(self.box_key, box_cands, self.client.now)
        # "start in `delay` s": each side adds it to its own clock
        self.box.peer.schedule_start(self.client_key, delay, self.box.now)
        self.client.peer.schedule_start(self.box_key, delay, self.client.now)
        self.box.flush()
        self.client.flush()

    def stream_both(self, every: float = 0.05) -> None:
        self.client.stream(self.box, every)
        self.net.call_later(every / 2, lambda: self.box.stream(self.client, every))

    def up(self, *, data_at: float = 0.5, start_delay: float = 0.5) -> None:
        """Connect at once, stream data both ways from ``data_at``, then exchange candidates
        and start punching ``start_delay`` later."""
        self.net.run_until(0.2)  # STUN answered, relays registered, the client's home chosen
        self.connect()
        self.net.run_until(data_at)
        assert self.client.connected_at() is not None and self.box.connected_at() is not None
        self.stream_both()
        self.exchange_candidates(start_delay)


def make_lab(
    client_nat: natsim.Behavior,
    box_nat: natsim.Behavior,
    *,
    map_box: bool = False,
    ipv6: bool = False,
    cgnat: bool = False,
    seed: int = 7,
    config: PeerConfig | None = None,
    client_clock: float = 1000.0,
    approved: bool = True,
) -> Lab:
    """A relay, a box behind ``box_nat`` and a client behind ``client_nat`` (behind a carrier
    CGNAT too with ``cgnat``), both registered at the relay, nothing connected yet. An
    ``approved`` client is in the box's allow-list and holds a ticket for it."""
    net = Network(seed=seed)
    relay = SimRelay(net)
    rng = random.Random(seed)
    if cgnat:
        carrier = net.add_router("carrier", natsim.CGNAT, CLIENT_PUBLIC)
        client_router = net.add_router("client-nat", client_nat, "100.64.0.2", behind=carrier)
    else:
        client_router = net.add_router("client-nat", client_nat, CLIENT_PUBLIC)
    box_router = net.add_router("box-nat", box_nat, BOX_PUBLIC)
    client_addrs = ["192.168.1.10" if client_nat.translate else "203.0.113.2"]
    box_addrs = ["10.0.0.2" if box_nat.translate else "198.51.100.2"]
    if ipv6:
        client_addrs.append("2001:db8:1::10")
        box_addrs.append("2001:db8:2::2")
    client_host = net.add_host("client", client_addrs, behind=client_router)
    box_host = net.add_host("box", box_addrs, behind=box_router)

    box_keys, client_keys, ticket_key = Keys.generate(), Keys.generate(), TicketKey.generate()
    allowed = {client_keys.public} if approved else set()
    box_peer = Peer(
        box_keys,
        now=0.0,
        is_allowed=allowed.__contains__,
        allow_pairing=True,
        ticket_public=ticket_key.public_bytes(),
        config=config,
        random_bytes=random.Random(rng.random()).randbytes,
    )
    client_peer = Peer(
        client_keys,
        now=client_clock,
        config=config,
        random_bytes=random.Random(rng.random()).randbytes,
    )
    ticket = ticket_key.issue(
        wire.peer_id(box_keys.public),
        wire.peer_id(client_keys.public),
        int(WALL0) + 86400,
        now_wall=int(WALL0),
    )
    if approved:
        client_peer.add_ticket(ticket)
    box_peer.add_relay(RELAY, RELAY_UDP, 0.0)
    blocked = client_nat.udp_blocked
    client_peer.add_relay(RELAY, RELAY_TCP if blocked else RELAY_UDP, client_clock, stream=blocked)

    box_local = host_candidates(box_host)
    mapping = None
    if map_box and box_nat.translate:
        external = box_router.add_port_mapping((box_addrs[0], PORT))
        mapping = Candidate(CandidateKind.PORTMAPPED, Direct(*external), priority=1)
        box_local.append(mapping)
    box_peer.set_local_candidates(box_local, 0.0)
    client_peer.set_local_candidates(host_candidates(client_host), client_clock)
    box = Node(net, "box", box_peer, box_host)
    client = Node(net, "client", client_peer, client_host, clock=client_clock)
    return Lab(net, relay, box, client, box_router, client_router, mapping, allowed, ticket_key)


def via(path: Destination) -> str:
    return "relay" if isinstance(path, ViaRelay) else "direct"
