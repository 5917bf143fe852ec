"""asyncio adapter for ``transport.stun``: a small STUN server and a one-shot Binding client.

The protocol logic lives in :class:`transport.stun.StunResponder` and
:class:`transport.stun.BindingTransaction`; this module only owns sockets and the loop.

* :func:`serve` binds one UDP socket per address (or, with ``other``, the four sockets of an
  RFC 5780 server: both IPs x both ports) and answers from whichever socket the responder picks.
  The relay can use it as is, or feed :meth:`StunResponder.handle` from its own sockets.
* :func:`binding` asks a server for our reflexive address, from a raw non-blocking socket or
  from an existing :class:`asyncio.DatagramTransport` (its protocol is wrapped for the duration
  and gets every datagram that is not the answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from types import TracebackType
from typing import Any

from transport.stun import (
    DEFAULT_REQUEST_SIZE,
    DEFAULT_SOFTWARE,
    BindingResult,
    BindingTransaction,
    StunResponder,
    family_of,
    format_address,
    unmap_address,
)
from transport.wire import Address

__all__ = ["BindingFailed", "StunServer", "binding", "binding_result", "serve", "sockaddr_for"]

_BIND_RETRIES = 20  # choosing free ports for an RFC 5780 server can race with other processes


class BindingFailed(Exception):
    """The server answered with an error, or with an answer we cannot use."""


def sockaddr_for(sock_family: int, addr: Address) -> Address:
    """``addr`` as a socket of that family wants it: IPv4 on a dual-stack IPv6 socket becomes
    ``::ffff:a.b.c.d``."""
    if sock_family == socket.AF_INET6 and family_of(addr[0]) == 4:
        return (f"::ffff:{addr[0]}", addr[1])
    return addr


class _ServerProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: StunServer, local: Address) -> None:
        self.server = server
        self.local = local

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.server.datagram_received(data, (addr[0], addr[1]), self.local)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors from clients that went away: nothing to do


class StunServer:
    """Running sockets around one :class:`StunResponder`. Close with :meth:`close` or use as
    ``async with``."""

    def __init__(self, responder: StunResponder, loop: asyncio.AbstractEventLoop) -> None:
        self.responder = responder
        self._loop = loop
        self._transports: dict[Address, tuple[asyncio.DatagramTransport, int]] = {}
        self.requests = 0
        self.replies = 0

    @property
    def addresses(self) -> list[Address]:
        return list(self._transports)

    @property
    def primary(self) -> Address:
        return self.responder.primary or next(iter(self._transports))

    @property
    def other(self) -> Address | None:
        return self.responder.other

    def datagram_received(self, data: bytes, source: Address, local: Address) -> None:
        self.requests += 1
        for reply, destination, sender in self.responder.handle(
            data, source, local, self._loop.time()
        ):
            entry = self._transports.get(sender)
            if entry is None:
                continue
            transport, family = entry
            self.replies += 1
            transport.sendto(reply, sockaddr_for(family, destination))

    async def _bind(self, address: Address) -> Address:
        family = socket.AF_INET6 if family_of(address[0]) == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        local = unmap_address(sock.getsockname()[:2])
        transport, _ = await self._loop.create_datagram_endpoint(
            lambda: _ServerProtocol(self, local), sock=sock
        )
        self._transports[local] = (transport, family)
        return local

    def close(self) -> None:
        for transport, _ in self._transports.values():
            transport.close()
        self._transports.clear()

    async def __aenter__(self) -> StunServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def serve(
    *addresses: Address,
    other: Address | None = None,
    software: str | None = DEFAULT_SOFTWARE,
    rate: float = 20.0,
    burst: float = 40.0,
) -> StunServer:
    """Start answering STUN on ``addresses`` (port 0 picks a free port).

    With ``other`` (an address differing in IP and port, port 0 allowed) exactly one primary
    address is given and the server is an RFC 5780 one on four sockets:
    (primary IP, primary port), (primary IP, other port), (other IP, primary port),
    (other IP, other port).
    """
    loop = asyncio.get_running_loop()
    if other is None:
        if not addresses:
            raise ValueError("serve() needs at least one address")
        server = StunServer(StunResponder(software=software, rate=rate, burst=burst), loop)
        try:
            for address in addresses:
                await server._bind(address)
        except BaseException:
            server.close()
            raise
        return server
    if len(addresses) != 1:
        raise ValueError("an RFC 5780 server has exactly one primary address besides 'other'")
    primary = unmap_address(addresses[0])
    other = unmap_address(other)
    retries = _BIND_RETRIES if primary[1] == 0 or other[1] == 0 else 1
    for attempt in range(retries):
        server = StunServer(StunResponder(software=software, rate=rate, burst=burst), loop)
        try:
            p = await server._bind(primary)
            o_port_first = await server._bind((primary[0], other[1]))
            await server._bind((other[0], p[1]))
            await server._bind((other[0], o_port_first[1]))
        except OSError:
            server.close()
            if attempt == retries - 1:
                raise
            continue
        server.responder = StunResponder(
            software=software,
            primary=p,
            other=(other[0], o_port_first[1]),
            rate=rate,
            burst=burst,
        )
        return server
    raise AssertionError("unreachable")  # pragma: no cover


# --- client -------------------------------------------------------------------------------------


class _Tap(asyncio.DatagramProtocol):
    """Stands in for a transport's protocol while a transaction runs: answers go to the
    transaction, everything else to the protocol it replaced."""

    def __init__(
        self,
        inner: asyncio.BaseProtocol,
        consume: Callable[[bytes, Address], bool],
    ) -> None:
        self.inner = inner
        self.consume = consume

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if not self.consume(data, (addr[0], addr[1])) and isinstance(
            self.inner, asyncio.DatagramProtocol
        ):
            self.inner.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        if isinstance(self.inner, asyncio.DatagramProtocol):
            self.inner.error_received(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)


async def binding_result(
    sock_or_transport: socket.socket | asyncio.DatagramTransport,
    server: Address,
    timeout: float = 3.0,
    *,
    pad_to: int = DEFAULT_REQUEST_SIZE,
    change_ip: bool = False,
    change_port: bool = False,
    rto: float = 0.5,
) -> BindingResult:
    """Run one Binding transaction to ``server`` (an IP literal) and return what it learned.

    Raises :class:`TimeoutError` when nothing usable came back within ``timeout`` seconds and
    :class:`BindingFailed` on an error response.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + timeout
    tx = BindingTransaction(
        server,
        start,
        rto=rto,
        pad_to=pad_to,
        change_ip=change_ip,
        change_port=change_port,
    )
    wake = asyncio.Event()

    def consume(data: bytes, source: Address) -> bool:
        try:
            source = unmap_address(source)
        except ValueError:
            return False
        taken = tx.receive(data, source, loop.time())
        if taken:
            wake.set()
        return taken

    if isinstance(sock_or_transport, socket.socket):
        sock = sock_or_transport
        sock.setblocking(False)  # the loop's sock_* methods require it
        family = sock.family

        async def send(data: bytes, dest: Address) -> None:
            await loop.sock_sendto(sock, data, sockaddr_for(family, dest))

        async def wait(seconds: float) -> None:
            with contextlib.suppress(TimeoutError):
                data, addr = await asyncio.wait_for(loop.sock_recvfrom(sock, 65535), seconds)
                consume(data, (addr[0], addr[1]))

        return await _drive(tx, loop, deadline, send, wait)

    transport = sock_or_transport
    family = transport.get_extra_info("socket").family
    inner = transport.get_protocol()
    transport.set_protocol(_Tap(inner, consume))
    try:

        async def send_t(data: bytes, dest: Address) -> None:
            transport.sendto(data, sockaddr_for(family, dest))

        async def wait_t(seconds: float) -> None:
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), seconds)

        return await _drive(tx, loop, deadline, send_t, wait_t)
    finally:
        transport.set_protocol(inner)


async def _drive(
    tx: BindingTransaction,
    loop: asyncio.AbstractEventLoop,
    deadline: float,
    send: Callable[[bytes, Address], Any],
    wait: Callable[[float], Any],
) -> BindingResult:
    while not tx.done:
        now = loop.time()
        if now >= deadline:
            break
        for data, dest in tx.datagrams_to_send(now):
            await send(data, dest)
        if tx.done:
            break
        wake_at = min(tx.next_timer() or deadline, deadline)
        await wait(max(0.0, wake_at - loop.time()))
    if tx.result is not None:
        return tx.result
    if tx.error is not None and tx.error_code is not None:
        raise BindingFailed(tx.error)
    if tx.error is not None and not tx.error.startswith("timeout"):
        raise BindingFailed(tx.error)
    raise TimeoutError(f"no STUN answer from {format_address(tx.server)}")


async def binding(
    sock_or_transport: socket.socket | asyncio.DatagramTransport,
    server: Address,
    timeout: float = 3.0,
    **options: Any,
) -> Address:
    """Our reflexive address as ``server`` sees it (see :func:`binding_result`)."""
    return (await binding_result(sock_or_transport, server, timeout, **options)).mapped
