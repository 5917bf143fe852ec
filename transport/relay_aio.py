"""asyncio around the relay: the ``lazycat-relay`` server and the relay client's connection.

Nothing here decides anything: :class:`transport.relay.RelayCore` and
:class:`transport.relay.RelayClient` do, and this module moves their frames over sockets.

The server listens on

- **UDP** (one socket per address; IPv6 sockets are v6-only so each family has its own): bare
  relay frames, and STUN on the same port. The hot path is ``datagram_received`` ->
  ``RelayCore.receive`` -> ``sendto``.
- **TCP** and **TLS** (``--tcp``, ``--tls``; port 443 style, for networks that block UDP). One
  listener serves three things, told apart by the first byte a client sends:

  * ``G`` (of ``GET``) -> HTTP: ``GET /relay`` with an Upgrade is a **WebSocket** (RFC 6455),
    one relay frame per binary message; ``GET /healthz`` and ``GET /metrics`` answer plain HTTP.
    The HTTP and WebSocket parsing is the ``websockets`` package's sans-IO protocol.
  * anything else -> relay frames with a 2-byte length prefix (``wire.frame_stream``). A frame
    is at most ``max_frame`` <= 16,384 bytes, so a length never starts with ``0x47`` ("G") and
    the first byte decides unambiguously.

  So a relay needs only 443 open for TCP, TLS and WebSocket alike; a separate plain ``--tcp``
  listener on loopback is the usual place for Prometheus to scrape ``/metrics``.

``/metrics`` wants ``Authorization: Bearer <key>`` when a metrics key is set; without one it is
served to loopback clients only. New stream connections are counted against the core's accept
rate and ``max_connections``; a stream that has not registered within ``register_timeout`` is
closed. A stream whose write buffer is over ``stream_buffer`` drops frames (like a full UDP
queue would) instead of growing.

uvloop is used when installed (:func:`new_event_loop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import itertools
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from transport import wire
from transport.relay import (
    RelayClient,
    RelayConfig,
    RelayCore,
    RelayErrorReceived,
    RelayEvent,
    RelayLost,
    RelayPong,
    RelayReceived,
    RelayRegistered,
    StunHandler,
)
from transport.stun import StunResponder
from transport.wire import Address, Ticket, WireError

log = logging.getLogger("lazycat.relay")

WS_PATH = "/relay"
MAX_STREAM_FRAME = 16_384  # below 0x4700, so a length prefix never looks like "GET"
_G = ord("G")

try:  # pragma: no cover - depends on the machine
    import uvloop

    HAVE_UVLOOP = True
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]
    HAVE_UVLOOP = False


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed, else asyncio's."""
    if uvloop is not None:
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(coro: Any) -> Any:
    """``asyncio.run`` on :func:`new_event_loop`."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)


def _host_port(sockname: Any) -> Address:
    return (str(sockname[0]), int(sockname[1]))


def udp_socket(
    address: Address, *, buffer: int = 4 << 20, reuse_port: bool = False
) -> socket.socket:
    """A bound UDP socket for ``address``; IPv6 sockets are v6-only."""
    host, port = address
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, buffer)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# --- the server ---------------------------------------------------------------------------------


@dataclass
class ServerConfig:
    """Where and how ``lazycat-relay`` listens. Port 0 picks a free port (tests)."""

    udp: list[Address] = field(default_factory=list)
    tcp: list[Address] = field(default_factory=list)
    tls: list[Address] = field(default_factory=list)
    tls_cert: str | None = None
    tls_key: str | None = None
    relay: RelayConfig = field(default_factory=RelayConfig)
    region: str = ""
    metrics_key: str | None = None
    max_connections: int = 10_000
    register_timeout: float = 10.0
    stream_buffer: int = 1 << 20
    reuse_port: bool = False
    stun: bool = True  # answer STUN Binding requests on the UDP port (transport.stun)


def stun_hook(responder: StunResponder) -> StunHandler:
    """The core's STUN hook around a :class:`transport.stun.StunResponder` (plain Binding: the
    relay port is not an RFC 5780 server). A reply meant for another port (RESPONSE-PORT)
    is not sent: the core answers the source only."""

    def handle(data: bytes, source: Address, now: float) -> bytes | None:
        for reply, destination, _ in responder.handle(data, source, source, now):
            if destination == source:
                return reply
        return None

    return handle


class _Udp(asyncio.DatagramProtocol):
    """One UDP socket. Handles are the source address on socket 0, ``(index, address)`` on
    the others, so the common one-socket-per-family case allocates nothing per packet."""

    def __init__(self, server: RelayServer, index: int) -> None:
        self.server = server
        self.index = index
        self.transport: asyncio.DatagramTransport | None = None
        if index == 0:
            self.datagram_received = self._received_first  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement these interfaces without subclassing asyncio's.
        self.transport = cast(asyncio.DatagramTransport, transport)
        _small_receive_buffer(transport, self.server.config.relay.max_frame + 1)

    def _received_first(self, data: bytes, addr: Any) -> None:
        server = self.server
        out = server.core.receive(data, addr, server.time())
        if out:
            server.dispatch(out)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        server = self.server
        out = server.core.receive(data, (self.index, addr), server.time())
        if out:
            server.dispatch(out)

    def error_received(self, exc: Exception) -> None:
        self.server.core.stats.drops["udp_error"] += 1


def _small_receive_buffer(transport: asyncio.BaseTransport, size: int) -> None:
    """asyncio's own datagram transport reads with ``recvfrom(256 KiB)``: above glibc's mmap
    threshold, so every datagram can cost an mmap, an mremap and a munmap (measured: 56,000
    instead of 160,000 packets/s). A bigger datagram is truncated to ``size`` and then dropped
    as too large. uvloop reads into its own buffer and has no such attribute."""
    if hasattr(transport, "max_size"):
        transport.max_size = size


class _Stream(asyncio.Protocol):
    """One TCP or TLS connection: relay frames, a WebSocket or one HTTP request."""

    _serial = itertools.count(1)

    def __init__(self, server: RelayServer, listener: str) -> None:
        self.server = server
        self.listener = listener
        self.serial = next(self._serial)
        self.transport: asyncio.Transport | None = None
        self.peer: Address = ("::", 0)
        self.mode = ""  # "" until the first byte, then "frames" or "http"
        self.decoder = wire.StreamDecoder()
        self.ws: ServerProtocol | None = None
        self.ws_open = False
        self.fragments: list[bytes] = []
        self.opened = server.time()
        self.closed = False

    def __repr__(self) -> str:  # part of the registration challenge: unique per connection
        return f"stream-{self.serial}"

    # asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = _host_port(peer)
        server = self.server
        if len(server.streams) >= server.config.max_connections:
            server.core.stats.drops["max_connections"] += 1
            self.transport.abort()
            self.closed = True
            return
        if not server.core.admit_connection(server.time()):
            self.transport.abort()
            self.closed = True
            return
        server.streams.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.streams.discard(self)
        self.server.core.close(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.mode:
            self.mode = "http" if data[0] == _G else "frames"
            if self.mode == "http":
                self.ws = ServerProtocol(max_size=self.server.config.relay.max_frame)
        if self.mode == "frames":
            try:
                frames = self.decoder.feed(data)
            except WireError:
                self.close()
                return
            server = self.server
            for frame in frames:
                out = server.core.receive(frame, self, server.time(), self.peer)
                if out:
                    server.dispatch(out)
        else:
            self._ws_received(data)

    def eof_received(self) -> bool | None:
        if self.ws is not None:
            self.ws.receive_eof()
            self._ws_flush()
        return None

    # output

    def send(self, frame: bytes) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        if transport.get_write_buffer_size() > self.server.config.stream_buffer:
            self.server.core.stats.drops["stream_backlog"] += 1
            return
        if self.ws is not None:
            if not self.ws_open:
                return
            self.ws.send_binary(frame)
            self._ws_flush()
        else:
            transport.write(wire.frame_stream(frame))

    def close(self, code: int = 1001) -> None:
        if self.closed or self.transport is None:
            return
        if self.ws is not None and self.ws_open:
            with contextlib.suppress(Exception):
                self.ws.send_close(code)
                self._ws_flush()
        self.closed = True
        self.transport.close()

    # WebSocket and HTTP

    def _ws_received(self, data: bytes) -> None:
        ws = self.ws
        assert ws is not None
        ws.receive_data(data)
        server = self.server
        for event in ws.events_received():
            if isinstance(event, Request):
                self._http_request(event)
            elif isinstance(event, Frame):
                if event.opcode is Opcode.BINARY or (
                    event.opcode is Opcode.CONT and self.fragments
                ):
                    self.fragments.append(bytes(event.data))
                    if not event.fin:
                        continue
                    message = b"".join(self.fragments)
                    self.fragments = []
                    out = server.core.receive(message, self, server.time(), self.peer)
                    if out:
                        server.dispatch(out)
                elif event.opcode is Opcode.TEXT:
                    ws.fail(1003, "relay frames are binary messages")
        self._ws_flush()

    def _ws_flush(self) -> None:
        ws, transport = self.ws, self.transport
        assert ws is not None and transport is not None
        for chunk in ws.data_to_send():
            if chunk:
                transport.write(chunk)
            else:
                with contextlib.suppress(Exception):
                    transport.write_eof()
        if ws.close_expected() and not self.closed:
            self.closed = True
            transport.close()

    def _http_request(self, request: Request) -> None:
        ws = self.ws
        assert ws is not None
        path = request.path.split("?", 1)[0]
        if path == WS_PATH:
            response = ws.accept(request)
            self.ws_open = response.status_code == 101
            if not self.ws_open:
                self.server.core.stats.drops["bad_upgrade"] += 1
        elif path == "/healthz":
            response = ws.reject(200, f"ok region={self.server.config.region or '-'}\n")
        elif path == "/metrics":
            response = self._metrics(request)
        else:
            response = ws.reject(404, "not found\n")
        ws.send_response(response)

    def _metrics(self, request: Request) -> Response:
        ws = self.ws
        assert ws is not None
        key = self.server.config.metrics_key
        if key:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                response = ws.reject(401, "a bearer key is required\n")
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        elif not ipaddress.ip_address(self.peer[0]).is_loopback:
            return ws.reject(403, "set a metrics key to serve /metrics beyond loopback\n")
        body = self.server.metrics()
        headers = Headers(
            [
                ("Connection", "close"),
                ("Content-Length", str(len(body))),
                ("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),
            ]
        )
        return Response(200, "OK", headers, body)


class _RelayCollector(Collector):
    def __init__(self, server: RelayServer) -> None:
        self.server = server

    def collect(self) -> Iterable[Any]:
        server = self.server
        stats = server.core.stats
        prefix = "lazycat_relay_"
        info = InfoMetricFamily(prefix + "build", "The relay's region and event loop.")
        info.add_metric(
            [], {"region": server.config.region, "loop": "uvloop" if HAVE_UVLOOP else "asyncio"}
        )
        yield info
        for name, value, text in (
            ("frames_received", stats.frames_in, "Frames received (datagrams and stream frames)."),
            ("bytes_received", stats.bytes_in, "Bytes of frames received."),
            ("frames_sent", stats.frames_out, "Frames sent."),
            ("bytes_sent", stats.bytes_out, "Bytes of frames sent."),
            ("forwarded_frames", stats.forwarded, "SEND frames forwarded as RECV."),
            ("forwarded_bytes", stats.forwarded_bytes, "Bytes of SEND frames forwarded."),
            ("registrations", stats.registrations, "Successful registrations."),
            ("hellos", stats.hellos, "HELLO challenges sent."),
            ("stun_responses", stats.stun, "STUN answers sent."),
            ("expired_peers", stats.expired, "Peers dropped for being idle."),
            ("stream_connections", server.stream_accepts, "TCP/TLS connections accepted."),
        ):
            yield CounterMetricFamily(prefix + name, text, value=value)
        drops = CounterMetricFamily(
            prefix + "drops", "Frames or connections dropped, by reason.", labels=["reason"]
        )
        for reason, count in sorted(stats.drops.items()):
            drops.add_metric([reason], count)
        yield drops
        yield GaugeMetricFamily(prefix + "peers", "Registered peers.", value=server.core.peer_count)
        yield GaugeMetricFamily(prefix + "boxes", "Registered boxes.", value=server.core.box_count)
        yield GaugeMetricFamily(
            prefix + "streams", "Open TCP/TLS/WebSocket connections.", value=len(server.streams)
        )


class RelayServer:
    """The ``lazycat-relay`` server: start it, read :attr:`addresses`, stop it."""

    TICK = 1.0

    def __init__(self, config: ServerConfig, *, stun_handler: StunHandler | None = None) -> None:
        if config.relay.max_frame > MAX_STREAM_FRAME and (config.tcp or config.tls):
            raise ValueError(f"max_frame must be at most {MAX_STREAM_FRAME} with TCP listeners")
        if config.tls and not (config.tls_cert and config.tls_key):
            raise ValueError("a TLS listener needs a certificate and a key")
        self.config = config
        if stun_handler is None and config.stun:
            stun_handler = stun_hook(StunResponder())
        self.stun_handler = stun_handler
        self.time: Callable[[], float] = time.monotonic
        self.core = RelayCore(config.relay, now=time.monotonic(), stun_handler=stun_handler)
        self.streams: set[_Stream] = set()
        self.stream_accepts = 0
        self.addresses: dict[str, list[Address]] = {"udp": [], "tcp": [], "tls": []}
        self._udp: list[_Udp] = []
        self._servers: list[asyncio.Server] = []
        self._tick: asyncio.Task[None] | None = None
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_RelayCollector(self))

    def metrics(self) -> bytes:
        return generate_latest(self._registry)

    def tls_context(self) -> ssl.SSLContext:
        assert self.config.tls_cert and self.config.tls_key
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        return context

    async def start(self) -> None:
        """Bind every listener; raises OSError (port in use…) or ssl.SSLError (bad cert)."""
        loop = asyncio.get_running_loop()
        self.time = loop.time
        self.addresses = {"udp": [], "tcp": [], "tls": []}
        self.core = RelayCore(self.config.relay, now=loop.time(), stun_handler=self.stun_handler)
        self._update_wall_offset()
        context = self.tls_context() if self.config.tls else None
        try:
            for index, address in enumerate(self.config.udp):
                sock = udp_socket(address, reuse_port=self.config.reuse_port)
                proto = _Udp(self, index)
                await loop.create_datagram_endpoint(lambda p=proto: p, sock=sock)  # type: ignore[misc]
                self._udp.append(proto)
                self.addresses["udp"].append(_host_port(sock.getsockname()))
            for kind, addresses, ctx in (
                ("tcp", self.config.tcp, None),
                ("tls", self.config.tls, context),
            ):
                for host, port in addresses:
                    server = await loop.create_server(
                        lambda kind=kind: self._accept(kind),
                        host,
                        port,
                        ssl=ctx,
                        reuse_address=True,
                        backlog=1024,
                    )
                    self._servers.append(server)
                    for sock in server.sockets:
                        self.addresses[kind].append(_host_port(sock.getsockname()))
        except BaseException:
            await self.stop()
            raise
        self._tick = asyncio.create_task(self._ticker())

    def _accept(self, kind: str) -> _Stream:
        self.stream_accepts += 1
        return _Stream(self, kind)

    def dispatch(self, out: Iterable[tuple[Any, bytes]]) -> None:
        """Send the core's output: a handle is a UDP address, (index, address), or a stream."""
        udp = self._udp
        for handle, frame in out:
            if handle.__class__ is tuple:
                if handle[0].__class__ is int:
                    transport = udp[handle[0]].transport
                    handle = handle[1]
                else:
                    transport = udp[0].transport
                if transport is not None:
                    transport.sendto(frame, handle)
            else:
                handle.send(frame)
        if self.core.evicted:
            self._close_evicted()

    def _close_evicted(self) -> None:
        evicted, self.core.evicted = self.core.evicted, []
        for handle in evicted:
            if isinstance(handle, _Stream):
                handle.close()

    def _update_wall_offset(self) -> None:
        self.core.wall_offset = time.time() - self.time()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.TICK)
            now = self.time()
            self._update_wall_offset()
            self.core.on_timer(now)
            self._close_evicted()
            deadline = now - self.config.register_timeout
            for stream in [s for s in self.streams if s.opened < deadline]:
                if stream.mode != "http" or stream.ws_open:
                    if not self.core.is_registered(stream):
                        self.core.stats.drops["stream_never_registered"] += 1
                        stream.close()
                else:
                    stream.close()  # an HTTP request that never finished

    async def stop(self) -> None:
        """Stop listening, say goodbye to stream clients, close every socket."""
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
            self._tick = None
        for server in self._servers:
            server.close()
        for stream in list(self.streams):
            stream.close(1001)
        for proto in self._udp:
            if proto.transport is not None:
                proto.transport.close()
        for server in self._servers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        self._servers = []
        self._udp = []
        await asyncio.sleep(0)


# --- the client's connection --------------------------------------------------------------------


class RelayConnection:
    """A :class:`transport.relay.RelayClient` on a socket of its own: what a device uses to
    talk through one relay (the box's engine feeds its shared UDP socket to the sans-IO client
    instead). ``url`` is ``udp://host:port``, ``tcp://host:port``, ``tls://host:port``,
    ``ws://host:port/relay`` or ``wss://host:port/relay``.

    It registers by itself, again after a relay restart, and reconnects streams with backoff.
    Received payloads wait in :meth:`recv` (a bounded queue: the oldest are dropped when full).
    """

    RECONNECT_FIRST = 0.25
    RECONNECT_MAX = 8.0

    def __init__(
        self,
        url: str,
        static_private: bytes,
        *,
        ticket_public: bytes = bytes(32),
        ssl_context: ssl.SSLContext | None = None,
        keepalive: float = 20.0,
        queue_size: int = 4096,
        on_event: Callable[[RelayEvent], None] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("udp", "tcp", "tls", "ws", "wss") or not parts.hostname:
            raise ValueError(f"{url!r}: expected udp://, tcp://, tls://, ws:// or wss://host:port")
        if parts.port is None:
            raise ValueError(f"{url!r}: the port is missing")
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self.ws_path = parts.path or WS_PATH
        self.ssl_context = ssl_context
        if self.scheme in ("tls", "wss") and ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        self.client = RelayClient(
            static_private, now=time.monotonic(), ticket_public=ticket_public, keepalive=keepalive
        )
        self.on_event = on_event
        self.registered = asyncio.Event()
        self.last_error: RelayErrorReceived | None = None
        self._queue: asyncio.Queue[RelayReceived] = asyncio.Queue(queue_size)
        self._pongs: list[asyncio.Future[float]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._write: Callable[[bytes], None] | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._runner: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._closing = False

    @property
    def peer_id(self) -> bytes:
        return self.client.peer_id

    async def start(self) -> None:
        """Connect and begin registering; returns once the first connection is up."""
        loop = asyncio.get_running_loop()
        await self._open(loop)
        self._runner = asyncio.create_task(self._keep_connected())

    async def wait_registered(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self.registered.wait(), timeout)

    def send(self, destination: bytes, payload: bytes) -> bool:
        if not self.client.send(destination, payload):
            return False
        self._flush()
        return True

    def add_ticket(self, ticket: Ticket | bytes) -> None:
        self.client.add_ticket(ticket)
        self._flush()

    async def recv(self) -> RelayReceived:
        return await self._queue.get()

    async def ping(self, timeout: float = 2.0) -> float:
        """The relay's round-trip time, in seconds."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[float] = loop.create_future()
        self._pongs.append(future)
        self.client.ping(loop.time())
        self._flush()
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            with contextlib.suppress(ValueError):
                self._pongs.remove(future)

    async def close(self) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if self._transport is not None:
            self._transport.close()
        await asyncio.sleep(0)

    # plumbing

    async def _open(self, loop: asyncio.AbstractEventLoop) -> None:
        self._lost.clear()
        if self.scheme == "udp":
            datagram, _ = await loop.create_datagram_endpoint(
                lambda: _ClientDatagram(self), remote_addr=(self.host, self.port)
            )
            transport: asyncio.BaseTransport | None = datagram
            self._write = datagram.sendto
        else:
            stream = _ClientStream(self, ws=self.scheme in ("ws", "wss"))
            await loop.create_connection(
                lambda: stream,
                self.host,
                self.port,
                ssl=self.ssl_context if self.scheme in ("tls", "wss") else None,
                server_hostname=self.host if self.scheme in ("tls", "wss") else None,
            )
            await stream.ready
            transport = stream.transport
            self._write = stream.write
        self._transport = transport
        self.client.connect(loop.time())
        self._flush()

    async def _keep_connected(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.RECONNECT_FIRST
        while not self._closing:
            await self._lost.wait()
            self._write = None
            self.registered.clear()
            while not self._closing:
                await asyncio.sleep(delay)
                delay = min(self.RECONNECT_MAX, delay * 2)
                try:
                    await self._open(loop)
                except (OSError, ssl.SSLError, ConnectionError, WireError) as exc:
                    log.debug("relay reconnect failed", extra={"url": self.url, "error": exc})
                    continue
                delay = self.RECONNECT_FIRST
                break

    def _connection_lost(self) -> None:
        if not self._closing:
            self._lost.set()

    def _received(self, frame: bytes) -> None:
        loop = asyncio.get_running_loop()
        self._handle(self.client.receive(frame, loop.time()))
        self._flush()

    def _handle(self, events: list[RelayEvent]) -> None:
        for event in events:
            if isinstance(event, RelayReceived):
                if self._queue.full():
                    self._queue.get_nowait()
                self._queue.put_nowait(event)
                continue
            if isinstance(event, RelayRegistered):
                self.registered.set()
            elif isinstance(event, RelayLost):
                self.registered.clear()
            elif isinstance(event, RelayPong):
                for future in self._pongs:
                    if not future.done():
                        future.set_result(event.rtt)
                self._pongs = []
            elif isinstance(event, RelayErrorReceived):
                self.last_error = event
            if self.on_event is not None:
                self.on_event(event)

    def _flush(self) -> None:
        out = self.client.take_outgoing()
        write = self._write
        if write is not None:
            for frame in out:
                write(frame)
        self._schedule()

    def _schedule(self) -> None:
        if self._closing:
            return
        deadline = self.client.next_timer()
        if self._timer is not None:
            if deadline is not None and self._timer.when() == deadline:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._handle(self.client.on_timer(asyncio.get_running_loop().time()))
        self._flush()


class _ClientDatagram(asyncio.DatagramProtocol):
    def __init__(self, connection: RelayConnection) -> None:
        self.connection = connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _small_receive_buffer(transport, wire.MAX_DATAGRAM)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.connection._received(data)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable while the relay restarts: the client keeps retrying

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection._connection_lost()


class _ClientStream(asyncio.Protocol):
    """A stream to the relay: length-prefixed frames, or a WebSocket (websockets' sans-IO)."""

    def __init__(self, connection: RelayConnection, *, ws: bool) -> None:
        self.connection = connection
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.decoder = wire.StreamDecoder()
        self.ws: Any = None
        if ws:
            from websockets.client import ClientProtocol
            from websockets.uri import parse_uri

            scheme = "wss" if connection.scheme == "wss" else "ws"
            host = f"[{connection.host}]" if ":" in connection.host else connection.host
            uri = parse_uri(f"{scheme}://{host}:{connection.port}{connection.ws_path}")
            self.ws = ClientProtocol(uri, max_size=wire.MAX_FRAME)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.ws is None:
            self.ready.set_result(None)
            return
        self.ws.send_request(self.ws.connect())
        self._ws_flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("the relay closed the connection"))
        self.connection._connection_lost()

    def write(self, frame: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.ws is None:
            self.transport.write(wire.frame_stream(frame))
        else:
            self.ws.send_binary(frame)
            self._ws_flush()

    def data_received(self, data: bytes) -> None:
        if self.ws is None:
            try:
                frames = self.decoder.feed(data)
            except WireError:
                assert self.transport is not None
                self.transport.close()
                return
            for frame in frames:
                self.connection._received(frame)
            return
        from websockets.http11 import Response as WsResponse

        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, WsResponse):
                if event.status_code == 101 and not self.ready.done():
                    self.ready.set_result(None)
                elif not self.ready.done():
                    self.ready.set_exception(
                        ConnectionError(f"WebSocket upgrade refused: {event.status_code}")
                    )
            elif isinstance(event, Frame) and event.opcode is Opcode.BINARY:
                self.connection._received(bytes(event.data))
        self._ws_flush()

    def _ws_flush(self) -> None:
        assert self.transport is not None
        for chunk in self.ws.data_to_send():
            if chunk:
                self.transport.write(chunk)
            elif self.transport.can_write_eof():
                with contextlib.suppress(OSError):
                    self.transport.write_eof()
        if self.ws.close_expected():
            self.transport.close()


__all__ = [
    "HAVE_UVLOOP",
    "WS_PATH",
    "RelayConnection",
    "RelayServer",
    "ServerConfig",
    "new_event_loop",
    "run",
    "udp_socket",
]
