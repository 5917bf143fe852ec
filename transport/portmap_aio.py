"""asyncio around :class:`transport.portmap.PortMapper`: the sockets, HTTP and the clock.

Nothing here decides anything; the mapper does. This module

- finds the **default gateway** (pyroute2's routing table; ``/proc/net/route`` as a fallback)
  and the box's own address towards it (a UDP ``connect()``, which sends nothing);
- talks PCP and NAT-PMP over one UDP socket **connected** to the gateway's port 5351, so an ICMP
  port unreachable comes back as an error and the mapper can skip to UPnP at once;
- sends SSDP ``M-SEARCH`` from a second UDP socket: always unicast to the gateway's port 1900
  (``ssdp_port``), and to the multicast group 239.255.255.250:1900 **only** when the caller names
  the interface address to send it from (``ssdp_multicast_interface``). Nothing here multicasts
  on its own;
- runs the mapper's HTTP exchanges (device description, SOAP) over asyncio streams with the
  deadline the mapper set, reading no more than the mapper will parse.

``python -m transport.portmap_aio --port 41641`` maps a port and prints each event as a JSON line
until interrupted (SIGINT/SIGTERM or end of standard input), then deletes the mapping: a tool
for owners checking their router, and what the namespace test runs. uvloop is used when
installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from ipaddress import IPv4Address, ip_address
from typing import Any

from transport.portmap import (
    CLOSE_TIMEOUT,
    MAX_HTTP,
    PCP_PORT,
    SSDP_MULTICAST,
    Addr,
    HttpRequest,
    MappingAcquired,
    MappingFailed,
    MappingLost,
    MappingRenewed,
    Method,
    PortMapError,
    PortMapEvent,
    PortMapper,
    parse_http_response,
)

try:  # pragma: no cover - depends on the machine
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed, else asyncio's."""
    if uvloop is not None:
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


# --- where is the router ------------------------------------------------------------------------


def parse_proc_net_route(text: str) -> str | None:
    """The IPv4 default gateway from ``/proc/net/route`` text (lowest metric wins), or None.
    Addresses there are hex in host byte order (little-endian on the machines we run on)."""
    best: tuple[int, str] | None = None
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            destination, gateway = int(fields[1], 16), int(fields[2], 16)
            flags, metric, mask = int(fields[3], 16), int(fields[6]), int(fields[7], 16)
        except ValueError:
            continue
        up, has_gateway = flags & 0x1, flags & 0x2  # RTF_UP, RTF_GATEWAY
        if destination or mask or not (up and has_gateway) or not gateway:
            continue
        address = str(IPv4Address(gateway.to_bytes(4, "little")))
        if best is None or metric < best[0]:
            best = (metric, address)
    return best[1] if best else None


def default_gateway() -> str | None:
    """The IPv4 default gateway of this network namespace, or None."""
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            routes = ipr.get_default_routes(family=socket.AF_INET)
            candidates = []
            for route in routes:
                gateway = route.get("RTA_GATEWAY")
                if gateway:
                    candidates.append((route.get("RTA_PRIORITY") or 0, str(gateway)))
            if candidates:
                return min(candidates)[1]
    except Exception:  # noqa: S110 - netlink unavailable (no pyroute2, odd sandbox): fall back
        pass
    try:
        with open("/proc/net/route", encoding="ascii") as f:
            return parse_proc_net_route(f.read())
    except OSError:
        return None


def local_address_towards(ip: str, port: int = PCP_PORT) -> str:
    """The source address the kernel picks for ``ip``: a UDP connect() sends nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((ip, port))
        return str(sock.getsockname()[0])


# --- the adapter --------------------------------------------------------------------------------


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, owner: PortMapClient, *, gateway_socket: bool) -> None:
        self.owner = owner
        self.gateway_socket = gateway_socket

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.owner._on_datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        # On a connected UDP socket Linux reports ICMP port unreachable as ECONNREFUSED.
        if self.gateway_socket and isinstance(exc, ConnectionRefusedError):
            self.owner._on_unreachable()


class PortMapClient:
    """Keeps one UDP port mapping on the router while running.

    ``gateway``/``local_ip`` default to the default route's gateway and our address towards it.
    Tests point ``pcp_port``/``ssdp_port`` at fake routers on loopback, or pass
    ``description_url`` to skip SSDP. Events go to ``on_event`` and to :attr:`events`.
    Other keyword arguments go to :class:`~transport.portmap.PortMapper`.
    """

    def __init__(
        self,
        internal_port: int,
        *,
        gateway: str | None = None,
        local_ip: str | None = None,
        pcp_port: int = PCP_PORT,
        ssdp_port: int = SSDP_MULTICAST[1],
        ssdp_multicast_interface: str | None = None,
        on_event: Callable[[PortMapEvent], None] | None = None,
        **mapper_options: Any,
    ) -> None:
        self.internal_port = internal_port
        self.gateway = gateway
        self.local_ip = local_ip
        self.pcp_port = pcp_port
        self.ssdp_port = ssdp_port
        self.ssdp_multicast_interface = ssdp_multicast_interface
        self.on_event = on_event
        self.mapper_options = mapper_options
        self.events: asyncio.Queue[PortMapEvent] = asyncio.Queue()
        self.mapper: PortMapper | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gw: asyncio.DatagramTransport | None = None
        self._ssdp: asyncio.DatagramTransport | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._http_tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        if self.gateway is None:
            self.gateway = await loop.run_in_executor(None, default_gateway)
            if self.gateway is None:
                raise OSError("no IPv4 default gateway: nothing to ask for a port mapping")
        if self.local_ip is None:
            self.local_ip = local_address_towards(self.gateway, self.pcp_port)
        ssdp_addrs: list[Addr] = [(self.gateway, self.ssdp_port)]
        if self.ssdp_multicast_interface is not None:
            ssdp_addrs.append(SSDP_MULTICAST)
        self.mapper = PortMapper(
            self.gateway,
            self.local_ip,
            self.internal_port,
            pcp_port=self.pcp_port,
            ssdp_addrs=ssdp_addrs,
            **self.mapper_options,
        )
        gw, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(self, gateway_socket=True),
            local_addr=(self.local_ip, 0),
            remote_addr=(self.gateway, self.pcp_port),
        )
        self._gw = gw
        ssdp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if self.ssdp_multicast_interface is not None:
                iface = socket.inet_aton(str(ip_address(self.ssdp_multicast_interface)))
                ssdp_sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, iface)
                # UDA 1.1 §1.1.2: TTL 2 by default; the router is one hop away.
                ssdp_sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
            ssdp_sock.bind((self.local_ip, 0))
            ssdp_sock.setblocking(False)
            ssdp, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(self, gateway_socket=False), sock=ssdp_sock
            )
        except BaseException:
            ssdp_sock.close()
            gw.close()
            raise
        self._ssdp = ssdp
        self.mapper.start(loop.time())
        self._task = asyncio.create_task(self._run(), name="portmap")

    async def aclose(self, timeout: float = CLOSE_TIMEOUT + 1.0) -> None:
        """Delete the mapping (waiting up to ``timeout`` for the router) and close everything."""
        if self.mapper is not None and self._loop is not None:
            self.mapper.close(self._loop.time())
            self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        for task in list(self._http_tasks):
            task.cancel()
        for task in list(self._http_tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for transport in (self._gw, self._ssdp):
            if transport is not None:
                transport.close()

    def refresh(self) -> None:
        """Renew now (after a network change), or retry at once after a failure."""
        if self.mapper is not None and self._loop is not None:
            self.mapper.refresh(self._loop.time())
            self._wake.set()

    # --- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self.mapper is not None and self._loop is not None
        mapper, loop = self.mapper, self._loop
        while True:
            self._flush()
            if mapper.closed:
                return
            deadline = mapper.next_timer()
            self._wake.clear()
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            mapper.handle_timer(loop.time())

    def _flush(self) -> None:
        assert self.mapper is not None
        for data, addr in self.mapper.datagrams_to_send():
            try:
                if self._gw is not None and addr == self.mapper.pcp_addr:
                    self._gw.sendto(data)
                elif self._ssdp is not None and addr in self.mapper.ssdp_addrs:
                    self._ssdp.sendto(data, addr)
            except OSError:
                pass  # the mapper's retransmissions and timeouts cover a lost datagram
        for request in self.mapper.http_requests_to_send():
            task = asyncio.create_task(self._http(request))
            self._http_tasks.add(task)
            task.add_done_callback(self._http_tasks.discard)
        for event in self.mapper.events():
            self.events.put_nowait(event)
            if self.on_event is not None:
                self.on_event(event)

    def _on_datagram(self, data: bytes, addr: Addr) -> None:
        if self.mapper is not None and self._loop is not None:
            self.mapper.receive_datagram(data, addr, self._loop.time())
            self._wake.set()

    def _on_unreachable(self) -> None:
        if self.mapper is not None and self._loop is not None:
            self.mapper.port_unreachable(self._loop.time())
            self._wake.set()

    async def _http(self, request: HttpRequest) -> None:
        assert self.mapper is not None and self._loop is not None
        loop = self._loop
        try:
            data = await asyncio.wait_for(
                self._exchange(request), max(0.0, request.deadline - loop.time())
            )
        except (OSError, TimeoutError) as exc:
            self.mapper.http_failed(request.request_id, str(exc) or type(exc).__name__, loop.time())
        else:
            self.mapper.http_response(request.request_id, data, loop.time())
        self._wake.set()

    async def _exchange(self, request: HttpRequest) -> bytes:
        reader, writer = await asyncio.open_connection(request.host, request.port)
        try:
            writer.write(request.data)
            await writer.drain()
            buf = bytearray()
            while len(buf) <= MAX_HTTP:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                buf += chunk
                try:
                    if parse_http_response(bytes(buf), eof=False) is not None:
                        break
                except PortMapError:
                    break  # the mapper parses again and says what is wrong
            return bytes(buf)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


# --- command line -------------------------------------------------------------------------------


def event_json(event: PortMapEvent) -> dict[str, Any]:
    if isinstance(event, MappingAcquired):
        return {
            "event": "acquired",
            "protocol": str(event.protocol),
            "external_ip": event.external_ip,
            "external_port": event.external_port,
            "lifetime": event.lifetime,
            "behind_another_nat": event.behind_another_nat,
        }
    if isinstance(event, MappingRenewed):
        return {"event": "renewed", "protocol": str(event.protocol), "lifetime": event.lifetime}
    if isinstance(event, MappingLost):
        return {"event": "lost", "protocol": str(event.protocol), "reason": event.reason}
    assert isinstance(event, MappingFailed)
    return {
        "event": "failed",
        "summary": event.summary,
        "advice": event.advice,
        "reasons": event.reasons,
        "retry_in": event.retry_in,
    }


async def _main(args: argparse.Namespace) -> int:
    def emit(event: PortMapEvent) -> None:
        print(json.dumps(event_json(event)), flush=True)

    options: dict[str, Any] = {"lifetime": args.lifetime}
    if args.methods:
        options["methods"] = [Method(m) for m in args.methods.split(",")]
    if args.description_url:
        options["description_url"] = args.description_url
    client = PortMapClient(
        args.port,
        gateway=args.gateway,
        pcp_port=args.pcp_port,
        ssdp_port=args.ssdp_port,
        ssdp_multicast_interface=args.multicast_interface,
        on_event=emit,
        **options,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if args.stdin:
        # Stop when standard input closes: the parent's end of a pipe going away.
        fd = sys.stdin.fileno()
        loop.add_reader(fd, lambda: None if os.read(fd, 1024) else stop.set())
    await client.start()
    assert client.mapper is not None
    print(
        json.dumps({"event": "started", "gateway": client.gateway, "local_ip": client.local_ip}),
        flush=True,
    )
    if args.refresh_after:
        loop.call_later(args.refresh_after, client.refresh)
    await stop.wait()
    await client.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transport.portmap_aio",
        description="Ask the router for a UDP port mapping, print events as JSON lines, "
        "delete the mapping on exit.",
    )
    parser.add_argument("--port", type=int, required=True, help="the internal UDP port to map")
    parser.add_argument("--lifetime", type=int, default=7200, help="seconds to ask for")
    parser.add_argument("--gateway", help="the router's address (default: the default gateway)")
    parser.add_argument("--pcp-port", type=int, default=PCP_PORT)
    parser.add_argument("--ssdp-port", type=int, default=SSDP_MULTICAST[1])
    parser.add_argument(
        "--multicast-interface",
        help="also send SSDP to 239.255.255.250 from the interface with this IPv4 address",
    )
    parser.add_argument("--description-url", help="skip SSDP: the IGD description's URL")
    parser.add_argument("--methods", help="comma-separated subset of pcp,nat-pmp,upnp, in order")
    parser.add_argument("--refresh-after", type=float, help="renew early once, after N seconds")
    parser.add_argument("--stdin", action="store_true", help="also stop when stdin closes")
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(_main(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
