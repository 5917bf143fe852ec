"""asyncio runner for ``transport.netcheck``: one UDP socket, the local facts, the loop.

:func:`run_netcheck` opens one UDP socket (dual-stack when the host allows, so IPv4 and IPv6
servers are asked from the same port), learns the egress address per family with a UDP
``connect()`` to ``6.6.6.6`` / ``2000::6666`` on a *separate* throwaway socket (connect on UDP
only picks a route and a source address; nothing is sent), names the interface that holds it
(netlink via pyroute2), and drives :class:`transport.netcheck.Netcheck` until it is done.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from transport.netcheck import LocalInfo, Netcheck, NetcheckConfig, NetcheckReport
from transport.stun import family_of, unmap_address
from transport.stun_aio import sockaddr_for
from transport.wire import Address

__all__ = [
    "EGRESS_PROBES",
    "egress_address",
    "host_addresses",
    "interface_for_address",
    "local_info",
    "open_socket",
    "resolve",
    "run_netcheck",
]

# Any global unicast destination works: connect() on UDP sends nothing.
EGRESS_PROBES = {4: ("6.6.6.6", 53), 6: ("2000::6666", 53)}


def egress_address(family: int) -> str | None:
    """The source address the kernel would use towards the internet, or None (no route)."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    try:
        with socket.socket(af, socket.SOCK_DGRAM) as probe:
            probe.connect(EGRESS_PROBES[family])
            return unmap_address(probe.getsockname()[:2])[0]
    except OSError:
        return None


def _netlink_addresses() -> list[tuple[str, int]]:
    """(address, interface index) for every address of this host; empty if netlink fails."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _query_netlink()
    # pyroute2's synchronous API runs its own loop: not from a thread that runs one already.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_query_netlink).result(timeout=10)


def _query_netlink() -> list[tuple[str, int]]:
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            out = []
            for msg in ipr.get_addr():
                address = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
                if address:
                    out.append((str(address), int(msg["index"])))
            return out
    except Exception:  # no netlink here (not Linux, sandbox): the facts are optional
        return []


def interface_for_address(ip: str) -> str | None:
    """The name of the interface holding ``ip`` (``socket.if_indextoname`` of its index)."""
    wanted = unmap_address((ip, 0))[0]
    for address, index in _netlink_addresses():
        try:
            if unmap_address((address, 0))[0] == wanted:
                return socket.if_indextoname(index)
        except (ValueError, OSError):
            continue
    return None


def host_addresses() -> frozenset[str]:
    """Every address of this host (a reflexive address among them means no NAT)."""
    out = set()
    for address, _ in _netlink_addresses():
        with contextlib.suppress(ValueError):
            out.add(unmap_address((address, 0))[0])
    return frozenset(out)


def open_socket(bind: Address | None = None) -> socket.socket:
    """A non-blocking UDP socket: on ``bind`` if given, else dual-stack ``[::]:0`` when the
    host has IPv6, else ``0.0.0.0:0``."""
    if bind is not None:
        af = socket.AF_INET6 if family_of(bind[0]) == 6 else socket.AF_INET
        sock = socket.socket(af, socket.SOCK_DGRAM)
        try:
            if af == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(bind)
        except OSError:
            sock.close()
            raise
    else:
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        except OSError:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("0.0.0.0", 0))  # noqa: S104 - a client socket: any local address
        else:
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind(("::", 0))
            except OSError:
                sock.close()
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind(("0.0.0.0", 0))  # noqa: S104
    sock.setblocking(False)
    return sock


def _socket_families(sock: socket.socket) -> frozenset[int]:
    if sock.family == socket.AF_INET:
        return frozenset({4})
    bound = unmap_address(sock.getsockname()[:2])[0]
    if bound not in ("::",):
        return frozenset({family_of(bound)})  # bound to one address: that family only
    v6only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    return frozenset({6}) if v6only else frozenset({4, 6})


def local_info(sock: socket.socket) -> LocalInfo:
    """The facts about our side of ``sock`` that the core needs (see :class:`LocalInfo`)."""
    host, port = unmap_address(sock.getsockname()[:2])
    families = _socket_families(sock)
    v4, v6 = egress_address(4), egress_address(6)  # reported even if this socket can't use it
    addresses = set(host_addresses())
    if host not in ("0.0.0.0", "::"):  # noqa: S104
        addresses.add(host)
    return LocalInfo(
        port=port,
        ipv4=v4,
        ipv6=v6,
        interface_v4=interface_for_address(v4) if v4 else None,
        interface_v6=interface_for_address(v6) if v6 else None,
        addresses=frozenset(addresses),
        families=families,
    )


async def resolve(host: str, port: int) -> list[Address]:
    """Every UDP address of ``host`` (an IP literal comes back as itself)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError:
        return []
    return list(dict.fromkeys(unmap_address((str(i[4][0]), int(i[4][1]))) for i in infos))


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, check: Netcheck, wake: asyncio.Event) -> None:
        self.check = check
        self.wake = wake

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        loop = asyncio.get_running_loop()
        try:
            source = unmap_address((addr[0], addr[1]))
        except ValueError:
            return
        if self.check.receive(data, source, loop.time()):
            self.wake.set()

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable from a dead server: its transaction times out


async def run_netcheck(
    servers: Sequence[Address],
    relays: Mapping[str, Address] | Sequence[tuple[str, Address]] = (),
    *,
    config: NetcheckConfig | None = None,
    bind: Address | None = None,
    local: LocalInfo | None = None,
) -> NetcheckReport:
    """Run a NAT check against ``servers`` and ``relays`` (host names are resolved, every
    address of a name is a target) from a fresh UDP socket, and report.

    ``bind`` pins the socket (tests bind 127.0.0.1); ``local`` overrides the discovered facts.
    """
    loop = asyncio.get_running_loop()
    server_addrs: list[Address] = []
    for host, port in servers:
        server_addrs += await resolve(host, port)
    relay_items = list(relays.items()) if isinstance(relays, Mapping) else list(relays)
    relay_addrs: list[tuple[str, Address]] = []
    for name, (host, port) in relay_items:
        relay_addrs += [(name, a) for a in await resolve(host, port)]
    sock = open_socket(bind)
    wake = asyncio.Event()
    try:
        info = local if local is not None else await loop.run_in_executor(None, local_info, sock)
        check = Netcheck(server_addrs, relay_addrs, local=info, now=loop.time(), config=config)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(check, wake), sock=sock
        )
    except BaseException:
        sock.close()
        raise
    try:
        while not check.done:
            for data, dest in check.datagrams_to_send(loop.time()):
                transport.sendto(data, sockaddr_for(sock.family, dest))
            timer = check.next_timer()
            if timer is None:
                break
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), max(0.0, timer - loop.time()))
        return check.report(loop.time())
    finally:
        transport.close()
