"""asyncio around a :class:`transport.peer.Peer`: one UDP socket, its timers, stream relays and
the host's candidates. The Peer decides everything; this module only moves bytes and reads
clocks (``natlab.Node`` in the tests does the same on the in-memory network).

::

    UDP socket [::]:port (dual-stack)      stream relays (TCP / TLS / WebSocket)
        | datagram_received                    | one frame (length prefix or WS message off)
        v                                      v
    Peer.receive(data, src, now, wall)     Peer.receive_stream(name, frame, now, wall)
        |                                      |
        +-----------> events --> on_event callbacks / subscribe() queues
        |
    flush():  Peer.datagrams_to_send()     -> sendto (IPv4 as ::ffff:a.b.c.d on the v6 socket)
              Peer.stream_frames_to_send() -> the stream of that relay (dropped while it is down:
                                              the Peer registers again on stream_connected)
              Peer.next_timer()            -> one loop.call_at; handle_timer when it fires

Clocks: ``now`` is ``loop.time()`` (monotonic; uvloop's is in whole milliseconds and cached per
loop turn, so a timer may fire a hair before its deadline: the deadline is passed instead, as
``natlab`` does), ``wall`` is ``time.time()`` (Noise IK timestamps, tickets).

Candidates (ARCHITECTURE.md, "Connect"): every ``poll_interval`` seconds :func:`gather` reads
the interfaces' addresses (netlink, pyroute2) and the egress address per family (a UDP
``connect()`` to 6.6.6.6 / 2000::6666, which sends nothing), and gives the Peer LAN addresses
(RFC 1918, ULA outside the overlay), the egress address and global IPv6 addresses, all with
our socket's port. The Peer adds reflexive addresses (its own STUN) and relays. When the
egress addresses or the set of addresses change, :meth:`Peer.network_changed` runs (paths
re-checked at once, relays re-registered, STUN again). Addresses inside the overlay
(``fc03:1136:3800::/40``: our own TUN), loopback and link-local are never candidates: the first
would loop the tunnel into itself, the others do not leave the host or need a scope.

uvloop is used by :func:`transport.relay_aio.run` / ``new_event_loop`` when installed; this
module runs on whichever loop is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, cast
from urllib.parse import urlsplit

from transport import netcheck_aio, wire
from transport.addressing import OVERLAY
from transport.paths import Candidate, CandidateKind, Direct, is_lan_address
from transport.peer import PacketReceived, Peer, PeerEvent
from transport.relay_aio import WS_PATH, _ClientStream
from transport.stun import unmap_address
from transport.stun_aio import sockaddr_for
from transport.wire import Address, Pattern

__all__ = [
    "Gatherer",
    "PeerDriver",
    "Subscription",
    "gather",
    "open_udp_socket",
]

log = logging.getLogger("lazycat.peer")

Gatherer = Callable[[int], list[Candidate]]


# --- candidates ---------------------------------------------------------------------------------


def _kind_of(ip: str) -> CandidateKind | None:
    """What an address of this host is as a candidate, or None if it is not one."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if address.is_loopback or address.is_link_local or address.is_multicast:
        return None
    if address.is_unspecified or address in OVERLAY:
        return None  # our own TUN: announcing it would route the tunnel into itself
    if address.version == 6:
        return CandidateKind.LAN if is_lan_address(ip) else CandidateKind.IPV6
    return CandidateKind.LAN if is_lan_address(ip) else CandidateKind.EGRESS


def gather(port: int) -> list[Candidate]:
    """The host's candidates for a socket on ``port``: the egress address of each family first
    (the one the OS would use), then the other LAN / global IPv6 addresses. Blocking (netlink):
    run it in an executor."""
    out: list[Candidate] = []
    seen: set[str] = set()
    for family in (4, 6):
        egress = netcheck_aio.egress_address(family)
        if egress is None or _kind_of(egress) is None:
            continue
        kind = _kind_of(egress)
        if family == 4:
            kind = CandidateKind.EGRESS  # private or not, it is the route to the internet
        assert kind is not None
        out.append(Candidate(kind, Direct(egress, port)))
        seen.add(egress)
    for ip in sorted(netcheck_aio.host_addresses()):
        kind = _kind_of(ip)
        if kind is not None and ip not in seen:
            seen.add(ip)
            out.append(Candidate(kind, Direct(ip, port)))
    return out


def _network_fingerprint() -> tuple[str | None, str | None, frozenset[str]]:
    addresses = frozenset(a for a in netcheck_aio.host_addresses() if _kind_of(a) is not None)
    return netcheck_aio.egress_address(4), netcheck_aio.egress_address(6), addresses


# --- the socket ---------------------------------------------------------------------------------


def open_udp_socket(bind: Address = ("::", 0)) -> socket.socket:
    """A non-blocking UDP socket. ``::`` is dual-stack (IPV6_V6ONLY=0: IPv4 peers appear as
    ``::ffff:a.b.c.d``, RFC 4291 sec. 2.5.5.2), falling back to ``0.0.0.0`` on a host without
    IPv6; any other address binds that family only."""
    host, port = bind
    if host == "::":
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        except OSError:
            return open_udp_socket(("0.0.0.0", port))  # noqa: S104 - a tunnel endpoint
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", port))
        except OSError:
            sock.close()
            return open_udp_socket(("0.0.0.0", port))  # noqa: S104
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, 1 << 20)
    sock.setblocking(False)
    return sock


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, driver: PeerDriver) -> None:
        self.driver = driver

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.driver._datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        self.driver.stats["udp_errors"] += 1  # ICMP unreachable: the paths notice silence


# --- stream relays --------------------------------------------------------------------------------


class _StreamRelay:
    """One relay reached over TCP / TLS / WebSocket, reconnected with backoff. The framing is
    ``relay_aio``'s client stream; registration is the Peer's own relay client."""

    FIRST, MAX = 0.25, 8.0

    def __init__(self, driver: PeerDriver, name: str, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("tcp", "tls", "ws", "wss") or not parts.hostname:
            raise ValueError(f"{url!r}: a stream relay is tcp://, tls://, ws:// or wss://host:port")
        if parts.port is None:
            raise ValueError(f"{url!r}: the port is missing")
        self.driver = driver
        self.name = name
        self.url = url
        # the attributes relay_aio._ClientStream reads from its connection
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self.ws_path = parts.path or WS_PATH
        self.stream: _ClientStream | None = None
        self.up = False
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.stream is not None and self.stream.transport is not None:
            self.stream.transport.close()

    def write(self, frame: bytes) -> None:
        if self.up and self.stream is not None:
            self.stream.write(frame)

    # called by _ClientStream
    def _received(self, frame: bytes) -> None:
        self.driver._stream_frame(self.name, frame)

    def _connection_lost(self) -> None:
        self.up = False
        self._lost.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.FIRST
        secure = self.scheme in ("tls", "wss")
        while True:
            self._lost.clear()
            try:
                stream = _ClientStream(cast(Any, self), ws=self.scheme in ("ws", "wss"))
                await loop.create_connection(
                    lambda s=stream: s,
                    self.host,
                    self.port,
                    ssl=ssl.create_default_context() if secure else None,
                    server_hostname=self.host if secure else None,
                )
                await asyncio.wait_for(stream.ready, 10)
            except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as exc:
                log.debug("relay %s: %s", self.url, exc)
                await asyncio.sleep(delay)
                delay = min(self.MAX, delay * 2)
                continue
            self.stream, self.up, delay = stream, True, self.FIRST
            self.driver._stream_connected(self.name)
            await self._lost.wait()
            await asyncio.sleep(delay)


# --- events -------------------------------------------------------------------------------------


class Subscription:
    """A queue of the driver's events (bounded: the oldest are dropped when it is full)."""

    def __init__(self, driver: PeerDriver, size: int) -> None:
        self._driver = driver
        self.queue: asyncio.Queue[PeerEvent] = asyncio.Queue(size)
        self.dropped = 0

    def _put(self, event: PeerEvent) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)

    async def get(self, timeout: float | None = None) -> PeerEvent:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def wait_for(self, match: Callable[[PeerEvent], bool], timeout: float) -> PeerEvent:
        """The first event ``match`` accepts (others are consumed); TimeoutError after
        ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.queue.get()
                if match(event):
                    return event

    def close(self) -> None:
        self._driver._subscriptions.discard(self)

    def __aiter__(self) -> AsyncIterator[PeerEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[PeerEvent]:
        while True:
            yield await self.queue.get()


# --- the driver -----------------------------------------------------------------------------------


class PeerDriver:
    """Drives ``peer`` on a real UDP socket and the running loop. ``gatherer`` finds our
    candidates (default :func:`gather`; tests on loopback pass their own), ``poll_interval`` is
    how often the network is checked for changes (0: never). ``on_packet`` receives the IP
    packets (the TUN's write), so they do not go through the event queues."""

    def __init__(
        self,
        peer: Peer,
        *,
        bind: Address = ("::", 0),
        gatherer: Gatherer | None = gather,
        poll_interval: float = 5.0,
        on_packet: Callable[[PacketReceived], object] | None = None,
    ) -> None:
        self.peer = peer
        self.bind = bind
        self.gatherer = gatherer
        self.poll_interval = poll_interval
        self.on_packet = on_packet
        self.callbacks: list[Callable[[PeerEvent], None]] = []
        self.network_callbacks: list[Callable[[], None]] = []  # after each network_changed()
        self.stats: dict[str, int] = {
            "rx_bytes": 0,
            "tx_bytes": 0,
            "rx_packets": 0,
            "tx_packets": 0,
            "udp_errors": 0,
        }
        self.sock: socket.socket | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._streams: dict[str, _StreamRelay] = {}
        self._subscriptions: set[Subscription] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._due: float | None = None
        self._poller: asyncio.Task[None] | None = None
        self._fingerprint: tuple[str | None, str | None, frozenset[str]] | None = None
        self._closed = False
        self._flush_pending = False

    # --- life -------------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def now(self) -> float:
        return self.loop.time()

    @staticmethod
    def wall() -> float:
        return time.time()

    @property
    def local_address(self) -> Address:
        """The socket's (ip, port), IPv4-mapped addresses unmapped."""
        assert self.sock is not None, "start() first"
        return unmap_address(self.sock.getsockname()[:2])

    @property
    def port(self) -> int:
        return self.local_address[1]

    async def start(self) -> None:
        """Open the socket, give the Peer our candidates, start the network watch."""
        self.sock = open_udp_socket(self.bind)
        try:
            transport, _ = await self.loop.create_datagram_endpoint(
                lambda: _Udp(self), sock=self.sock
            )
        except BaseException:
            self.sock.close()
            raise
        self._transport = cast(asyncio.DatagramTransport, transport)
        if self.gatherer is not None:
            await self.refresh_candidates()
            if self.poll_interval > 0:
                self._poller = self.loop.create_task(self._watch())
        self.flush()

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for stream in self._streams.values():
            await stream.close()
        if self._transport is not None:
            self._transport.close()
        await asyncio.sleep(0)

    async def __aenter__(self) -> PeerDriver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- configuration ----------------------------------------------------------------------

    async def add_relay(self, name: str, where: str | Address, *, stream: bool = False) -> None:
        """A relay: ``(host, port)`` or ``udp://host:port`` over our UDP socket (a host name
        is resolved, the first address taken), or ``tcp://``, ``tls://``, ``ws://``,
        ``wss://host:port[/relay]`` for a stream (UDP blocked). ``stream=True`` with a plain
        address means ``tcp://``."""
        if isinstance(where, str):
            parts = urlsplit(where)
            if parts.scheme == "udp":
                if not parts.hostname or parts.port is None:
                    raise ValueError(f"{where!r}: expected udp://host:port")
                address: Address = (parts.hostname, parts.port)
                url = None
            else:
                url = where
                address = (parts.hostname or "", parts.port or 0)
        else:
            address = where
            url = f"tcp://{_bracket(where[0])}:{where[1]}" if stream else None
        if url is None:
            resolved = await netcheck_aio.resolve(*address)
            if not resolved:
                raise OSError(f"relay {name}: cannot resolve {address[0]!r}")
            self.peer.add_relay(name, resolved[0], self.now())
        else:
            link = _StreamRelay(self, name, url)
            try:  # the Peer never sends to a stream relay's address: a name needs no lookup
                placeholder = unmap_address((link.host, link.port))
            except ValueError:
                placeholder = ("::", link.port)
            self.peer.add_relay(name, placeholder, self.now(), stream=True)
            self._streams[name] = link
            link.start()
        self.flush()

    def relay_registered(self, name: str) -> bool:
        client = self.peer.relay_client(name)
        return client is not None and client.registered

    def use_stream(self, name: str, url: str) -> None:
        """Reach relay ``name`` over ``url`` (``tcp://``, ``tls://``, ``ws://``, ``wss://``)
        instead of UDP, keeping its name: what a box does when its network blocks UDP."""
        if name in self._streams:
            return
        link = _StreamRelay(self, name, url)
        self._streams[name] = link
        self.peer.relay_over_stream(name, self.now())
        link.start()
        self.flush()

    def add_ticket(self, ticket: wire.Ticket | bytes) -> None:
        self.peer.add_ticket(ticket)
        self.flush()

    async def refresh_candidates(self) -> None:
        """Gather our candidates now and give them to the Peer."""
        if self.gatherer is None:
            return
        gatherer, port = self.gatherer, self.port
        candidates = await self.loop.run_in_executor(None, gatherer, port)
        self.peer.set_local_candidates(candidates, self.now())
        self.flush()

    def network_changed(self) -> None:
        """Tell the Peer our network changed (the watch calls this; so may the owner)."""
        self._deliver(self.peer.network_changed(self.now()))
        self.flush()
        for callback in self.network_callbacks:
            callback()

    # --- verbs ----------------------------------------------------------------------------------

    def connect(self, peer_key: bytes) -> None:
        self.peer.connect(peer_key, self.now(), self.wall())
        self.flush()

    def pair(self, peer_key: bytes, secret: bytes, facts: dict[str, Any]) -> None:
        self.peer.pair(peer_key, secret, facts, self.now(), self.wall())
        self.flush()

    def send_packet(self, peer_key: bytes, packet: bytes) -> bool:
        sent = self.peer.send_packet(peer_key, packet, self.now())
        if sent:
            self.stats["tx_packets"] += 1
            self.stats["tx_bytes"] += len(packet)
        self._flush_soon()
        return sent

    def send_frame(
        self, peer_key: bytes, frame: wire.InnerFrame, *, pattern: Pattern = Pattern.IK
    ) -> bool:
        sent = self.peer.send_frame(peer_key, frame, self.now(), pattern=pattern)
        self.flush()
        return sent

    def set_remote_candidates(self, peer_key: bytes, candidates: Iterable[Candidate]) -> None:
        self.peer.set_remote_candidates(peer_key, candidates, self.now())
        self.flush()

    def schedule_start(self, peer_key: bytes, delay: float) -> None:
        self.peer.schedule_start(peer_key, delay, self.now())
        self.flush()

    # --- events ---------------------------------------------------------------------------------

    def subscribe(self, size: int = 1024) -> Subscription:
        """A queue of every event from now on (PacketReceived too unless ``on_packet`` is set)."""
        subscription = Subscription(self, size)
        self._subscriptions.add(subscription)
        return subscription

    def _deliver(self, events: list[PeerEvent]) -> None:
        for event in events:
            if isinstance(event, PacketReceived):
                self.stats["rx_packets"] += 1
                self.stats["rx_bytes"] += len(event.packet)
                if self.on_packet is not None:
                    self.on_packet(event)
                    continue
            for callback in self.callbacks:
                callback(event)
            for subscription in self._subscriptions:
                subscription._put(event)

    # --- plumbing -------------------------------------------------------------------------------

    def _datagram(self, data: bytes, source: Address) -> None:
        self._deliver(self.peer.receive(data, source, self.now(), self.wall()))
        self._flush_soon()

    def _flush_soon(self) -> None:
        """The data path's flush. Packets come in bursts within one loop iteration (a TUN read
        drains up to 64, the UDP socket as many as are queued): what they queued is sent at
        once, but events and the timer are looked at once after the burst, not per packet
        (``Peer.next_timer`` visits every peer)."""
        if self._closed:
            return
        self._send_queued()
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_pending = False
        self.flush()

    def _stream_frame(self, name: str, frame: bytes) -> None:
        self._deliver(self.peer.receive_stream(name, frame, self.now(), self.wall()))
        self.flush()

    def _stream_connected(self, name: str) -> None:
        self.peer.stream_connected(name, self.now())
        self.flush()

    def flush(self) -> None:
        """Send what the Peer queued, deliver its events, and set its timer."""
        if self._closed:
            return
        self._deliver(self.peer.take_events())
        self._send_queued()
        self._rearm()

    def _send_queued(self) -> None:
        peer = self.peer
        transport, sock = self._transport, self.sock
        if transport is not None and sock is not None:
            family = sock.family
            for data, destination in peer.datagrams_to_send():
                try:
                    transport.sendto(data, sockaddr_for(family, destination))
                except (OSError, ValueError) as exc:  # no route for that family…
                    self.stats["udp_errors"] += 1
                    log.debug("sendto %s: %s", destination, exc)
        for name, frame in peer.stream_frames_to_send():
            link = self._streams.get(name)
            if link is not None:
                link.write(frame)

    def _rearm(self) -> None:
        due = self.peer.next_timer()
        if due == self._due and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due = due
        if due is not None:
            self._timer = self.loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        due = self._due if self._due is not None else 0.0
        self._due = None
        self._deliver(self.peer.handle_timer(max(self.now(), due), self.wall()))
        self.flush()

    async def _watch(self) -> None:
        """Poll the host's addresses; on a change, new candidates and ``network_changed``."""
        loop = self.loop
        self._fingerprint = await loop.run_in_executor(None, _network_fingerprint)
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                fingerprint = await loop.run_in_executor(None, _network_fingerprint)
            except Exception as exc:  # netlink hiccup: try again next round
                log.debug("network check failed: %s", exc)
                continue
            if fingerprint != self._fingerprint:
                log.info("network changed: %s -> %s", self._fingerprint, fingerprint)
                self._fingerprint = fingerprint
                await self.refresh_candidates()
                self.network_changed()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
