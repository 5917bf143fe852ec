"""The userspace forwarder: carries device flows to services the kernel cannot NAT66 to (an
IPv4-only target, or a loopback one), keeping the destination port the device chose.

nftables TPROXY (``transport.exposure``) hands every allowed TCP/UDP packet from ``lzc0`` to a
service address to the sockets here, without rewriting it; the fwmark plus ``local ::/0`` in a
policy table deliver it locally although the service address is not a local address::

    device [D]:p -> [S]:22  --TPROXY-->  listener [::]:tproxy_port   (IPV6_TRANSPARENT)
      accept(): getsockname() == ([S], 22)  (the original destination, not our port)
      connect((target, 22)) --> splice both ways; replies leave from [S]:22, so the device
      sees one ordinary connection to the service address

TCP: the device's handshake completes at the box before the target is asked (a userspace proxy
cannot do otherwise), so a target that refuses or does not answer in ``connect_timeout`` ends the
device's connection with a RST (``SO_LINGER`` {1, 0} then close, RFC 9293 sec. 3.10.7.1 "abort"):
the device sees a reset, not a hang. A RST from either side is passed on the same way; a FIN is
passed on as a half-close (``write_eof``) and the other direction keeps flowing.

UDP: the first datagram of a flow arrives on the listening socket; ``IPV6_RECVORIGDSTADDR``
gives its original destination ([S], port). The flow then gets two sockets: one connected to
(target, port), and one *transparent* socket bound to ([S], port) and connected to the device
(``IPV6_TRANSPARENT`` + ``SO_REUSEADDR``: many flows share ([S], port)). Replies leave from it,
so they carry the service's address and port; and because it is connected, TPROXY's "established
socket" lookup delivers the device's later datagrams straight to it. Flows idle for
``udp_idle`` seconds are closed; at most ``max_udp_flows`` exist (the least recently used goes).

It runs in its own thread with its own event loop (uvloop when installed), so copying bytes never
delays transportd's data path; the public methods are thread-safe and wait for the loop.
Needs CAP_NET_ADMIN (transparent sockets) and CAP_NET_BIND_SERVICE (UDP reply sockets bound to
service ports below 1024).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import socket
import struct
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Any, TypeVar, cast

from transport.exposure import Exposure, ExposureError

__all__ = ["Forwarder"]

log = logging.getLogger("lazycat.forwarder")

try:  # pragma: no cover - both branches are exercised depending on the machine
    import uvloop

    _new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
except ImportError:  # pragma: no cover
    _new_loop = asyncio.new_event_loop

# linux/in6.h; Python's socket module does not name them.
IPV6_TRANSPARENT = 75
IPV6_RECVORIGDSTADDR = 74
IPV6_ORIGDSTADDR = IPV6_RECVORIGDSTADDR  # the cmsg type carries the same number
SOL_IPV6 = socket.IPPROTO_IPV6

CONNECT_TIMEOUT = 5.0  # seconds the target has to accept before the device gets a RST
UDP_IDLE = 60.0
MAX_UDP_FLOWS = 4096
UDP_READ_BURST = 64  # datagrams read per wakeup before yielding to the loop
UDP_MAX = 65535
CALL_TIMEOUT = 10.0  # how long a thread-safe call waits for the loop
ACCEPT_BACKOFF = 0.1  # seconds between accept() attempts after repeated failures
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_LINGER_RESET = struct.pack("ii", 1, 0)
# sockaddr_in6: family (host order, unused), port, flowinfo, address, scope id
_SOCKADDR_IN6 = struct.Struct("!HHI16sI")

T = TypeVar("T")
Pair = tuple[IPv6Address, IPv6Address]  # (service address, device address)


def _reset(sock: Any) -> None:
    """Close with a RST instead of a FIN (SO_LINGER on, timeout 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def _family(target: IPv4Address | IPv6Address) -> socket.AddressFamily:
    return socket.AF_INET if isinstance(target, IPv4Address) else socket.AF_INET6


def _transparent(kind: socket.SocketKind) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, kind)
    try:
        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except OSError:
        sock.close()
        raise
    return sock


class _Half(asyncio.Protocol):
    """One side of a spliced TCP connection; what it reads goes to the other side."""

    def __init__(self, conn: _TcpConn, name: str) -> None:
        self.conn = conn
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.other: _Half | None = None
        self.pending: list[bytes] = []  # read before the other side existed
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.conn.bytes[self.name] += len(data)
        other = self.other
        if other is None or other.transport is None:
            self.pending.append(data)
            return
        other.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        other = self.other
        if (
            other is not None
            and other.transport is not None
            and not self.pending
            and other.transport.can_write_eof()
        ):
            other.transport.write_eof()
        self.conn.maybe_done()
        return True  # keep the other direction open (half-close)

    def pause_writing(self) -> None:
        # Our write buffer is full: stop reading the side that fills it.
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.lost(self, exc)

    def flush(self) -> None:
        """Hand over what was read before the other side was ready."""
        assert self.other is not None and self.other.transport is not None
        for data in self.pending:
            self.other.transport.write(data)
        self.pending.clear()
        if self.eof and self.other.transport.can_write_eof():
            self.other.transport.write_eof()


@dataclass(eq=False)
class _TcpConn:
    owner: _State
    service: IPv6Address
    device: IPv6Address
    port: int
    device_half: _Half | None = None
    target_half: _Half | None = None
    closed: bool = False
    bytes: dict[str, int] = field(default_factory=lambda: {"device": 0, "target": 0})

    def halves(self) -> list[_Half]:
        return [h for h in (self.device_half, self.target_half) if h is not None]

    def reset(self) -> None:
        """Abort both sides with a RST."""
        if self.closed:
            return
        self.closed = True
        for half in self.halves():
            if half.transport is not None:
                _reset(half.transport.get_extra_info("socket"))
                half.transport.abort()
        self.owner.tcp_done(self)

    def maybe_done(self) -> None:
        halves = self.halves()
        if len(halves) == 2 and all(h.eof for h in halves):
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for half in self.halves():
            if half.transport is not None:
                half.transport.close()  # FIN after the buffered bytes
        self.owner.tcp_done(self)

    def lost(self, half: _Half, exc: Exception | None) -> None:
        if self.closed:
            return
        if exc is not None or not half.eof:
            self.reset()  # a RST (or an error) on one side becomes a RST on the other
        else:
            self.close()


class _UdpFlow:
    """One device's UDP flow to (service, port): a socket to the target, one back to the device."""

    def __init__(
        self,
        owner: _State,
        key: tuple[IPv6Address, int, IPv6Address, int],
        target: IPv4Address | IPv6Address,
        now: float,
    ) -> None:
        self.owner = owner
        self.key = key
        self.device, self.device_port, self.service, self.port = key
        self.last = now
        self.up = socket.socket(_family(target), socket.SOCK_DGRAM)
        self.down: socket.socket | None = None
        try:
            self.up.setblocking(False)
            self.up.connect((str(target), self.port))
            self.down = _transparent(socket.SOCK_DGRAM)
            self.down.setblocking(False)
            self.down.bind((str(self.service), self.port))
            self.down.connect((str(self.device), self.device_port))
        except OSError:
            self.close_sockets()
            raise
        loop = owner.loop
        loop.add_reader(self.up.fileno(), self._from_target)
        loop.add_reader(self.down.fileno(), self._from_device)

    def to_target(self, data: bytes, now: float) -> None:
        self.last = now
        try:
            self.up.send(data)
            self.owner.counters["udp_up"] += 1
        except OSError:  # full queue, or an ICMP error from an earlier datagram
            self.owner.counters["udp_dropped"] += 1

    def _from_device(self) -> None:
        assert self.down is not None
        for _ in range(UDP_READ_BURST):
            try:
                data = self.down.recv(UDP_MAX)
            except BlockingIOError:
                return
            except OSError:
                continue  # ICMP error from the device side; nothing to pass on
            self.to_target(data, self.owner.loop.time())

    def _from_target(self) -> None:
        assert self.down is not None
        for _ in range(UDP_READ_BURST):
            try:
                data = self.up.recv(UDP_MAX)
            except BlockingIOError:
                return
            except OSError:  # e.g. ECONNREFUSED: the target's port is closed
                self.owner.counters["udp_target_errors"] += 1
                continue
            self.last = self.owner.loop.time()
            try:
                self.down.send(data)
                self.owner.counters["udp_down"] += 1
            except OSError:
                self.owner.counters["udp_dropped"] += 1

    def close_sockets(self) -> None:
        loop = self.owner.loop
        for sock in (self.up, self.down):
            if sock is None:
                continue
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(sock.fileno())
            sock.close()


class _State:
    """Everything that lives on the forwarder's loop; only touched from that thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        connect_timeout: float,
        udp_idle: float,
        max_udp_flows: int,
    ) -> None:
        self.loop = loop
        self.connect_timeout = connect_timeout
        self.udp_idle = udp_idle
        self.max_udp_flows = max_udp_flows
        self.services: dict[IPv6Address, Exposure] = {}
        self.tcp: set[_TcpConn] = set()
        self.udp: dict[tuple[IPv6Address, int, IPv6Address, int], _UdpFlow] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.warned: set[tuple[IPv6Address, int]] = set()  # (service, port) told once
        self.counters: dict[str, int] = {
            "tcp_accepted": 0,
            "tcp_denied": 0,
            "tcp_connect_failed": 0,
            "tcp_reset_by_update": 0,
            "udp_flows_opened": 0,
            "udp_denied": 0,
            "udp_up": 0,
            "udp_down": 0,
            "udp_dropped": 0,
            "udp_target_errors": 0,
            "udp_evicted": 0,
            "udp_reset_by_update": 0,
        }

    # --- access ---------------------------------------------------------------------------

    def allowed(self, service: IPv6Address, device: IPv6Address, proto: str, port: int) -> bool:
        e = self.services.get(service)
        return e is not None and e.allows(device, proto, port)

    def update(self, exposures: Sequence[Exposure]) -> None:
        old = self.services
        self.services = {e.address: e for e in exposures}
        for conn in list(self.tcp):
            was, now = old.get(conn.service), self.services.get(conn.service)
            if (
                now is None
                or was is None
                or now.target != was.target
                or not now.allows(conn.device, "tcp", conn.port)
            ):
                self.counters["tcp_reset_by_update"] += 1
                conn.reset()
        for flow in list(self.udp.values()):
            was, now = old.get(flow.service), self.services.get(flow.service)
            if (
                now is None
                or was is None
                or now.target != was.target
                or not now.allows(flow.device, "udp", flow.port)
            ):
                self.counters["udp_reset_by_update"] += 1
                self.drop_flow(flow)

    # --- TCP -------------------------------------------------------------------------------

    async def accept_loop(self, listener: socket.socket) -> None:
        """Accept until the listener is closed. Any other error is logged and the loop goes on:
        Linux accept(2) passes a new connection's pending network errors through (ENETDOWN,
        EPROTO, EHOSTUNREACH, ECONNABORTED, ...), and running out of descriptors or memory is
        temporary; neither may stop the service for every later device."""
        failures = 0
        while True:
            try:
                conn, _peer = await self.loop.sock_accept(listener)
            except OSError as exc:
                if listener.fileno() == -1:
                    return  # closed: the forwarder is stopping
                failures += 1
                log.warning("forwarder cannot accept: %s", exc)
                if failures > 1 or exc.errno in RESOURCE_ERRNOS:
                    # Repeated or resource errors: do not spin; a lone one is a lost connection.
                    await asyncio.sleep(ACCEPT_BACKOFF)
                continue
            failures = 0
            task = self.loop.create_task(self.handle_tcp(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def handle_tcp(self, sock: socket.socket) -> None:
        try:
            local = sock.getsockname()
            peer = sock.getpeername()
            service, port, device = IPv6Address(local[0]), int(local[1]), IPv6Address(peer[0])
        except (OSError, ValueError):
            sock.close()
            return
        e = self.services.get(service)
        if e is None or not e.allows(device, "tcp", port):
            # nftables already refuses these; this covers the instant between two updates.
            self.counters["tcp_denied"] += 1
            _reset(sock)
            sock.close()
            return
        conn = _TcpConn(self, service, device, port)
        self.tcp.add(conn)
        up = socket.socket(_family(e.target), socket.SOCK_STREAM)
        up.setblocking(False)
        try:
            await asyncio.wait_for(
                self.loop.sock_connect(up, (str(e.target), port)), self.connect_timeout
            )
            if conn.closed:  # revoked while connecting
                raise ConnectionAbortedError
            up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            target_half = _Half(conn, "target")
            device_half = _Half(conn, "device")
            target_half.other, device_half.other = device_half, target_half
            conn.target_half = target_half
            await self.loop.create_connection(lambda: target_half, sock=up)
            conn.device_half = device_half
            await self.loop.connect_accepted_socket(lambda: device_half, sock=sock)
        except (TimeoutError, OSError) as exc:
            if not isinstance(exc, ConnectionAbortedError):
                self.counters["tcp_connect_failed"] += 1
                log.info("forwarder: %s:%d -> %s: %s", service, port, e.target, exc or "timeout")
            if conn.target_half is None or conn.target_half.transport is None:
                up.close()
            if conn.device_half is None or conn.device_half.transport is None:
                _reset(sock)
                sock.close()
            conn.reset()
            return
        if conn.closed:  # revoked during the last await: the halves' transports were made
            for half in conn.halves():
                if half.transport is not None:
                    _reset(half.transport.get_extra_info("socket"))
                    half.transport.abort()
            return
        self.counters["tcp_accepted"] += 1
        target_half.flush()
        device_half.flush()
        conn.maybe_done()

    def tcp_done(self, conn: _TcpConn) -> None:
        self.tcp.discard(conn)

    # --- UDP -------------------------------------------------------------------------------

    def udp_ready(self, listener: socket.socket) -> None:
        space = socket.CMSG_SPACE(_SOCKADDR_IN6.size)
        for _ in range(UDP_READ_BURST):
            try:
                data, ancdata, _flags, peer = listener.recvmsg(UDP_MAX, space)
            except BlockingIOError:
                return
            except OSError:
                continue
            dest = None
            for level, kind, raw in ancdata:
                if level == SOL_IPV6 and kind == IPV6_ORIGDSTADDR and len(raw) >= 24:
                    _fam, dport, _flow, addr, _scope = _SOCKADDR_IN6.unpack_from(raw)
                    dest = (IPv6Address(addr), dport)
            if dest is None:
                continue  # not delivered by TPROXY: someone wrote to our port directly
            self.udp_datagram(IPv6Address(peer[0]), int(peer[1]), dest[0], dest[1], data)

    def udp_datagram(
        self, device: IPv6Address, dport: int, service: IPv6Address, port: int, data: bytes
    ) -> None:
        key = (device, dport, service, port)
        now = self.loop.time()
        flow = self.udp.get(key)
        if flow is None:
            e = self.services.get(service)
            if e is None or not e.allows(device, "udp", port):
                self.counters["udp_denied"] += 1
                return
            if len(self.udp) >= self.max_udp_flows:
                oldest = min(self.udp.values(), key=lambda f: f.last)
                self.counters["udp_evicted"] += 1
                self.drop_flow(oldest)
            try:
                flow = _UdpFlow(self, key, e.target, now)
            except OSError as exc:
                self.counters["udp_dropped"] += 1
                if exc.errno == errno.EACCES and (service, port) not in self.warned:
                    # answering from a port below 1024 needs CAP_NET_BIND_SERVICE: the owner
                    # must hear of it once, not find a device timing out
                    self.warned.add((service, port))
                    log.warning(
                        "forwarder: cannot answer udp from %s:%d: it needs CAP_NET_BIND_SERVICE"
                        " (the systemd unit grants it; see docs/forwarding.md): %s",
                        service,
                        port,
                        exc,
                    )
                else:
                    log.info("forwarder: udp flow to %s:%d: %s", service, port, exc)
                return
            self.udp[key] = flow
            self.counters["udp_flows_opened"] += 1
        flow.to_target(data, now)

    def drop_flow(self, flow: _UdpFlow) -> None:
        if self.udp.get(flow.key) is flow:
            del self.udp[flow.key]
        flow.close_sockets()

    async def sweep(self) -> None:
        """Close idle UDP flows."""
        interval = max(0.05, min(self.udp_idle / 4, 5.0))
        while True:
            await asyncio.sleep(interval)
            limit = self.loop.time() - self.udp_idle
            for flow in [f for f in self.udp.values() if f.last < limit]:
                self.drop_flow(flow)

    # --- reporting -------------------------------------------------------------------------

    def usage(self) -> dict[IPv6Address, set[IPv6Address]]:
        out: dict[IPv6Address, set[IPv6Address]] = {}
        for conn in self.tcp:
            out.setdefault(conn.service, set()).add(conn.device)
        for flow in self.udp.values():
            out.setdefault(flow.service, set()).add(flow.device)
        return out

    def stats(self) -> dict[str, int]:
        return {**self.counters, "tcp_open": len(self.tcp), "udp_flows": len(self.udp)}

    def shutdown(self) -> None:
        for conn in list(self.tcp):
            conn.reset()
        for flow in list(self.udp.values()):
            self.drop_flow(flow)
        for task in list(self.tasks):
            task.cancel()


class Forwarder:
    """The forwarder's thread and loop. ``start()``, then ``update()`` with the services it must
    carry (those for which ``uses_nat66()`` is False); ``close()`` when done."""

    def __init__(
        self,
        port: int,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        udp_idle: float = UDP_IDLE,
        max_udp_flows: int = MAX_UDP_FLOWS,
    ) -> None:
        self.port = port
        self._options = {
            "connect_timeout": connect_timeout,
            "udp_idle": udp_idle,
            "max_udp_flows": max_udp_flows,
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state: _State | None = None
        self._thread: threading.Thread | None = None
        self._sockets: list[socket.socket] = []

    @property
    def running(self) -> bool:
        """True while the thread and its accept loop live (the loop is stopped if the accept
        task ever ends, so this never says True for a forwarder that cannot take connections)."""
        return self._thread is not None and self._thread.is_alive()

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        """The listening sockets, made here (in the caller's thread and network namespace) so a
        failure is an exception for the caller, not a dead thread."""
        made: list[socket.socket] = []
        try:
            tcp = _transparent(socket.SOCK_STREAM)
            made.append(tcp)
            udp = _transparent(socket.SOCK_DGRAM)
            made.append(udp)
            udp.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
            for sock in made:
                sock.setsockopt(SOL_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(("::", self.port))
                sock.setblocking(False)
            tcp.listen(1024)
        except PermissionError as exc:
            for sock in made:
                sock.close()
            raise ExposureError(
                "the forwarder needs CAP_NET_ADMIN for transparent sockets (IPV6_TRANSPARENT): "
                f"grant transportd the capability (AmbientCapabilities=) ({exc})"
            ) from exc
        except OSError as exc:
            for sock in made:
                sock.close()
            raise ExposureError(f"the forwarder cannot listen on [::]:{self.port}: {exc}") from exc
        return tcp, udp

    def start(self) -> None:
        """Listen and start the thread. Idempotent while running; after the thread died (or a
        failed start) it starts afresh. Raises :class:`ExposureError`."""
        if self.running:
            return
        self.close()  # what a dead thread left: its sockets
        tcp, udp = self._bind()
        self._sockets = [tcp, udp]
        loop = _new_loop()
        state = _State(loop, **self._options)  # type: ignore[arg-type]
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.add_reader(udp.fileno(), state.udp_ready, udp)
            accept = loop.create_task(state.accept_loop(tcp))
            sweep = loop.create_task(state.sweep())

            def ended(task: asyncio.Task[None]) -> None:
                # accept_loop only returns when the listener is closed; anything else is a bug.
                # Stop the loop so that ``running`` turns False and the next start() retries.
                if task.cancelled():
                    return
                exc = task.exception()
                log.error("forwarder's accept loop ended: %r; stopping the forwarder", exc)
                loop.stop()

            accept.add_done_callback(ended)
            sweep.add_done_callback(ended)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                state.shutdown()
                accept.cancel()
                sweep.cancel()
                with contextlib.suppress(Exception):
                    loop.run_until_complete(asyncio.sleep(0))
                with contextlib.suppress(Exception):
                    loop.remove_reader(udp.fileno())
                loop.close()

        self._loop, self._state = loop, state
        self._thread = threading.Thread(target=run, name=f"lazycat-forwarder-{self.port}")
        self._thread.daemon = True
        try:
            self._thread.start()
        except RuntimeError as exc:  # "can't start new thread": out of threads or memory
            self._thread = None
            self.close()
            loop.close()
            raise ExposureError(f"the forwarder's thread cannot start: {exc}") from exc
        if not ready.wait(CALL_TIMEOUT):
            self.close()
            raise ExposureError("the forwarder's thread did not start")

    def _call(self, fn: Callable[[_State], T]) -> T:
        if self._loop is None or self._state is None or not self.running:
            raise ExposureError("the forwarder is not running: call start() first")
        state = self._state

        async def job() -> T:
            return fn(state)

        coro: Coroutine[Any, Any, T] = job()
        try:
            future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(
                coro, self._loop
            )
        except RuntimeError as exc:  # the loop closed since the check above
            coro.close()
            raise ExposureError(f"the forwarder stopped: {exc}") from exc
        try:
            return future.result(CALL_TIMEOUT)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise ExposureError(
                f"the forwarder did not answer in {CALL_TIMEOUT} s (its loop is stuck)"
            ) from exc
        except concurrent.futures.CancelledError as exc:  # the loop stopped meanwhile
            raise ExposureError("the forwarder stopped while asked") from exc

    def update(self, exposures: Sequence[Exposure]) -> None:
        """The services to carry from now on; flows of pairs that lost access, of removed
        services and of services whose target changed are reset before this returns."""
        items = list(exposures)
        self._call(lambda s: s.update(items))

    def usage(self) -> dict[IPv6Address, set[IPv6Address]]:
        """Service address -> devices with an open TCP connection or UDP flow to it."""
        return self._call(lambda s: s.usage())

    def stats(self) -> dict[str, int]:
        return self._call(lambda s: s.stats())

    def close(self) -> None:
        """Reset every flow, stop the thread, close the listening sockets. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed as the thread ended
                loop.call_soon_threadsafe(loop.stop)
            thread.join(CALL_TIMEOUT)
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        self._loop = self._state = self._thread = None
