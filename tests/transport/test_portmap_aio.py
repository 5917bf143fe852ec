"""The asyncio adapter against small fake routers on loopback: a PCP / NAT-PMP responder, an SSDP
responder and an HTTP server for the IGD description and SOAP, all on 127.0.0.1 at random ports.
Nothing here leaves loopback: the gateway is injected and SSDP is never sent to the multicast
group."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast

import pytest

from transport.portmap import (
    MappingAcquired,
    MappingFailed,
    MappingLost,
    MappingRenewed,
    Method,
    PortMapEvent,
)
from transport.portmap_aio import PortMapClient, parse_proc_net_route

LOOPBACK = "127.0.0.1"
PUBLIC = bytes([203, 0, 113, 9])  # what the fake router claims as its public address
PORT = 41641


# --- fake routers -------------------------------------------------------------------------------


@dataclass
class FakeGateway(asyncio.DatagramProtocol):
    """Answers PCP MAP (unless ``natpmp_only``) and NAT-PMP, laid out by hand from the RFCs."""

    natpmp_only: bool = False
    requests: list[bytes] = field(default_factory=list)
    transport: asyncio.DatagramTransport | None = None
    epoch: int = 1000

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (Python 3.11's selector transport does not subclass DatagramTransport.)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.requests.append(data)
        if data[:1] == b"\x02" and len(data) == 60:
            if self.natpmp_only:  # RFC 6887 §9: "unsupported version", NAT-PMP style
                reply = bytes([0, 128 + data[1], 0, 1]) + self.epoch.to_bytes(4, "big")
            else:
                lifetime = int.from_bytes(data[4:8], "big")
                nonce, iport, eport = data[24:36], data[40:42], data[42:44]
                reply = (
                    bytes([2, 0x81, 0, 0])
                    + lifetime.to_bytes(4, "big")
                    + self.epoch.to_bytes(4, "big")
                    + bytes(12)
                    + nonce
                    + bytes([17, 0, 0, 0])
                    + iport
                    + eport
                    + bytes(10)
                    + b"\xff\xff"
                    + PUBLIC
                )
        elif data == b"\x00\x00":
            reply = bytes([0, 128, 0, 0]) + self.epoch.to_bytes(4, "big") + PUBLIC
        elif data[:2] == b"\x00\x01" and len(data) == 12:
            _, _, _, iport, eport, lifetime = struct.unpack("!BBHHHI", data)
            reply = struct.pack("!BBHIHHI", 0, 129, 0, self.epoch, iport, eport or iport, lifetime)
        else:
            return
        self.transport.sendto(reply, addr)


@dataclass
class FakeSsdp(asyncio.DatagramProtocol):
    http_port: int = 0
    searches: list[bytes] = field(default_factory=list)
    transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (Python 3.11's selector transport does not subclass DatagramTransport.)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.searches.append(data)
        if data.startswith(b"M-SEARCH") and b"InternetGatewayDevice:1" in data:
            self.transport.sendto(
                b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nEXT:\r\n"
                b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
                b"LOCATION: http://127.0.0.1:%d/desc.xml\r\n\r\n" % self.http_port,
                addr,
            )


DESCRIPTION = b"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><device>
<deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:2</deviceType>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANDevice:2</deviceType>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:2</deviceType>
<serviceList><service>
<serviceType>urn:schemas-upnp-org:service:WANIPConnection:2</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
<controlURL>/ctl/IPConn</controlURL><eventSubURL>/evt/IPConn</eventSubURL><SCPDURL>/IP.xml</SCPDURL>
</service></serviceList></device></deviceList></device></deviceList></device></root>"""


@dataclass
class FakeIgd:
    """The HTTP side: description and SOAP. The first AddPortMapping conflicts (718)."""

    actions: list[tuple[str, bytes]] = field(default_factory=list)
    conflicts: int = 1

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length)
            status, reply = self.answer(head, body)
            # Chunked on purpose: the client must cope.
            writer.write(
                b"HTTP/1.1 %d X\r\nContent-Type: text/xml\r\nTransfer-Encoding: chunked\r\n\r\n"
                % status
                + b"%x\r\n%s\r\n0\r\n\r\n" % (len(reply), reply)
            )
            await writer.drain()
        finally:
            writer.close()

    def answer(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        if head.startswith(b"GET /desc.xml "):
            return 200, DESCRIPTION
        action = ""
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"soapaction:"):
                action = line.decode().split("#")[1].strip('"')
        self.actions.append((action, body))
        envelope = (
            b'<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
            b"<s:Body>%s</s:Body></s:Envelope>"
        )
        if action == "AddPortMapping" and self.conflicts > 0:
            self.conflicts -= 1
            fault = (
                b"<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring>"
                b'<detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>718'
                b"</errorCode><errorDescription>ConflictInMappingEntry</errorDescription>"
                b"</UPnPError></detail></s:Fault>"
            )
            return 500, envelope % fault
        out = b"<NewExternalIPAddress>203.0.113.9</NewExternalIPAddress>"
        inner = out if action == "GetExternalIPAddress" else b""
        ns = b"urn:schemas-upnp-org:service:WANIPConnection:2"
        response = b'<u:%sResponse xmlns:u="%s">%s</u:%sResponse>' % (
            action.encode(),
            ns,
            inner,
            action.encode(),
        )
        return 200, envelope % response


@dataclass
class Routers:
    gateway: FakeGateway
    gateway_port: int
    ssdp: FakeSsdp
    ssdp_port: int
    igd: FakeIgd
    closed_port: int  # a UDP port nothing listens on: ICMP port unreachable


@pytest.fixture
async def routers() -> AsyncIterator[Routers]:
    loop = asyncio.get_running_loop()
    gateway = FakeGateway()
    gw_transport, _ = await loop.create_datagram_endpoint(lambda: gateway, local_addr=(LOOPBACK, 0))
    ssdp = FakeSsdp()
    ssdp_transport, _ = await loop.create_datagram_endpoint(lambda: ssdp, local_addr=(LOOPBACK, 0))
    igd = FakeIgd()
    server = await asyncio.start_server(igd.handle, LOOPBACK, 0)
    ssdp.http_port = server.sockets[0].getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((LOOPBACK, 0))
        closed_port = probe.getsockname()[1]
    try:
        yield Routers(
            gateway,
            gw_transport.get_extra_info("sockname")[1],
            ssdp,
            ssdp_transport.get_extra_info("sockname")[1],
            igd,
            closed_port,
        )
    finally:
        gw_transport.close()
        ssdp_transport.close()
        server.close()
        await server.wait_closed()


async def next_event(client: PortMapClient, timeout: float = 5.0) -> PortMapEvent:
    return await asyncio.wait_for(client.events.get(), timeout)


def client_for(r: Routers, **options: object) -> PortMapClient:
    return PortMapClient(
        PORT,
        gateway=LOOPBACK,
        local_ip=LOOPBACK,
        pcp_port=r.gateway_port,
        ssdp_port=r.ssdp_port,
        **options,  # type: ignore[arg-type]
    )


# --- the tests ----------------------------------------------------------------------------------


async def test_pcp_acquire_renew_delete_on_loopback(routers: Routers) -> None:
    client = client_for(routers, lifetime=2)
    await client.start()
    try:
        acquired = await next_event(client)
        assert acquired == MappingAcquired(Method.PCP, "203.0.113.9", PORT, 2)
        renewed = await next_event(client, timeout=3.0)  # due after 1 s: half the lifetime
        assert renewed == MappingRenewed(Method.PCP, 2)
    finally:
        await client.aclose()
    assert await next_event(client) == MappingLost(Method.PCP, "deleted on shutdown")
    maps = [r for r in routers.gateway.requests if r[:2] == b"\x02\x01"]
    assert len(maps) == 3
    assert [int.from_bytes(r[4:8], "big") for r in maps] == [2, 2, 0]  # ..., then delete
    assert len({r[24:36] for r in maps}) == 1  # one nonce throughout


async def test_natpmp_only_router_on_loopback(routers: Routers) -> None:
    routers.gateway.natpmp_only = True
    client = client_for(routers, lifetime=600)
    await client.start()
    try:
        assert await next_event(client) == MappingAcquired(Method.NATPMP, "203.0.113.9", PORT, 600)
    finally:
        await client.aclose()
    assert await next_event(client) == MappingLost(Method.NATPMP, "deleted on shutdown")
    assert routers.gateway.requests[-1] == bytes.fromhex("00010000a2a9000000000000")


async def test_upnp_after_icmp_unreachable_with_conflict_retry(routers: Routers) -> None:
    client = client_for(routers, lifetime=600)
    client.pcp_port = routers.closed_port  # nothing listens: the kernel answers ICMP
    started = asyncio.get_running_loop().time()
    await client.start()
    try:
        acquired = await next_event(client)
        assert isinstance(acquired, MappingAcquired)
        assert acquired.protocol is Method.UPNP and acquired.external_ip == "203.0.113.9"
        assert acquired.external_port != PORT  # 718 on the first port made it pick another
        # ICMP made PCP and NAT-PMP fail at once, well under their 9 s + 3.75 s of timeouts.
        assert asyncio.get_running_loop().time() - started < 2.0
    finally:
        await client.aclose()
    assert await next_event(client) == MappingLost(Method.UPNP, "deleted on shutdown")
    actions = [a for a, _ in routers.igd.actions]
    assert actions == [
        "GetExternalIPAddress",
        "AddPortMapping",
        "AddPortMapping",
        "DeletePortMapping",
    ]
    deleted = routers.igd.actions[-1][1]
    assert b"<NewExternalPort>%d</NewExternalPort>" % acquired.external_port in deleted
    assert all(s.startswith(b"M-SEARCH * HTTP/1.1\r\n") for s in routers.ssdp.searches)


async def test_failure_summary_when_nothing_answers(routers: Routers) -> None:
    loop = asyncio.get_running_loop()
    silent = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=(LOOPBACK, 0))
    silent_port = silent[0].get_extra_info("sockname")[1]
    client = PortMapClient(
        PORT,
        gateway=LOOPBACK,
        local_ip=LOOPBACK,
        pcp_port=silent_port,
        ssdp_port=silent_port,
        pcp_timeouts=(0.05, 0.05),
        natpmp_timeouts=(0.05,),
        ssdp_timeout=0.2,
    )
    await client.start()
    try:
        failed = await next_event(client)
        assert isinstance(failed, MappingFailed)
        assert failed.summary == (
            "no port mapping: the router answered neither PCP nor NAT-PMP, and no UPnP gateway "
            "replied"
        )
        assert failed.advice.endswith(f"forward UDP port {PORT} to 127.0.0.1 by hand")
    finally:
        await client.aclose()
        silent[0].close()
    assert client.mapper is not None and client.mapper.closed


def test_proc_net_route_default_gateway() -> None:
    # /proc/net/route: hex in host byte order; 0101A8C0 is 192.168.1.1 on little-endian.
    text = (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
        "eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
        "eth0\t0000000A\t00000000\t0001\t0\t0\t100\t000000FF\t0\t0\t0\n"
        "tun0\t00000000\t00000000\t0001\t0\t0\t50\t00000000\t0\t0\t0\n"
        "garbage line\n"
    )
    assert parse_proc_net_route(text) == "10.0.0.1"  # lowest metric with a gateway
    assert parse_proc_net_route(text.replace("\t100\t00000000", "\t900\t00000000")) == (
        "192.168.1.1"
    )
    assert parse_proc_net_route("Iface\tDestination\n") is None
