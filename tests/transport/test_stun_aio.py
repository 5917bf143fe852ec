"""transport.stun_aio on real loopback sockets (127.0.0.1, 127.0.0.2, ::1)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from transport import stun, stun_aio
from transport.stun import ChangeRequest, Class, Message, Padding, decode, encode


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


async def test_loopback_plain_server_answers_with_our_address(udp4: socket.socket) -> None:
    async with await stun_aio.serve(("127.0.0.1", 0)) as server:
        [address] = server.addresses
        result = await stun_aio.binding_result(udp4, address, timeout=2)
        assert result.mapped == udp4.getsockname()
        assert result.source == address
        assert result.other_address is None and result.software == "lazycat"
        assert server.requests == 1 and server.replies == 1


async def test_loopback_rfc5780_server_listens_on_four_sockets(udp4: socket.socket) -> None:
    async with await stun_aio.serve(("127.0.0.1", 0), other=("127.0.0.2", 0)) as server:
        (p_ip, p_port), other = server.primary, server.other
        assert other is not None and other[0] == "127.0.0.2" and other[1] != p_port
        assert sorted(server.addresses) == sorted(
            [(ip, port) for ip in ("127.0.0.1", "127.0.0.2") for port in (p_port, other[1])]
        )
        plain = await stun_aio.binding_result(udp4, server.primary, timeout=2)
        assert plain.other_address == other and plain.response_origin == server.primary
        both = await stun_aio.binding_result(
            udp4, server.primary, timeout=2, change_ip=True, change_port=True
        )
        assert both.source == other and both.mapped == udp4.getsockname()
        port_only = await stun_aio.binding_result(udp4, server.primary, timeout=2, change_port=True)
        assert port_only.source == (p_ip, other[1])
        ip_only = await stun_aio.binding_result(udp4, server.primary, timeout=2, change_ip=True)
        assert ip_only.source == (other[0], p_port)


async def test_loopback_binding_through_an_existing_transport_passes_other_datagrams_on() -> None:
    loop = asyncio.get_running_loop()
    received: list[bytes] = []

    class App(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            received.append(data)

    transport, app = await loop.create_datagram_endpoint(App, local_addr=("127.0.0.1", 0))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        async with await stun_aio.serve(("127.0.0.1", 0)) as server:
            ours = transport.get_extra_info("sockname")
            task = asyncio.create_task(stun_aio.binding(transport, server.addresses[0], 2))
            await asyncio.sleep(0)
            peer.sendto(b"\x05not stun", ours)
            assert await task == ours
            assert transport.get_protocol() is app  # put back
            for _ in range(100):
                if received:
                    break
                await asyncio.sleep(0.01)
            assert received == [b"\x05not stun"]
    finally:
        peer.close()
        transport.close()


async def test_loopback_server_never_answers_a_bare_request(udp4: socket.socket) -> None:
    async with await stun_aio.serve(("127.0.0.1", 0)) as server:
        with pytest.raises(TimeoutError):
            await stun_aio.binding(udp4, server.addresses[0], timeout=0.3, pad_to=0, rto=0.1)
        assert server.requests >= 1 and server.replies == 0


async def test_loopback_error_answer_raises_binding_failed(udp4: socket.socket) -> None:
    # A plain server does not know CHANGE-REQUEST: 420 Unknown Attribute.
    async with await stun_aio.serve(("127.0.0.1", 0)) as server:
        with pytest.raises(stun_aio.BindingFailed, match="420"):
            await stun_aio.binding(udp4, server.addresses[0], timeout=2, change_ip=True)


async def test_loopback_server_ignores_garbage_and_keeps_serving(udp4: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    async with await stun_aio.serve(("127.0.0.1", 0)) as server:
        address = server.addresses[0]
        indication = encode(Message(Class.INDICATION, bytes(12), (Padding(100),)))
        for junk in (b"", b"\x00\x01", bytes(200), indication):
            await loop.sock_sendto(udp4, junk, address)
        assert await stun_aio.binding(udp4, address, timeout=2) == udp4.getsockname()
        assert server.replies == 1


async def test_loopback_raw_exchange_matches_the_codec(udp4: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    async with await stun_aio.serve(("127.0.0.1", 0), other=("127.0.0.2", 0)) as server:
        request = encode(
            Message(
                Class.REQUEST, stun.new_transaction_id(), (ChangeRequest(True, False), Padding(100))
            )
        )
        await loop.sock_sendto(udp4, request, server.primary)
        data, source = await asyncio.wait_for(loop.sock_recvfrom(udp4, 2048), 2)
        assert len(data) <= len(request)
        assert source == ("127.0.0.2", server.primary[1])
        assert decode(data).mapped_address == udp4.getsockname()


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this host")
async def test_loopback_ipv6_and_dual_stack() -> None:
    async with await stun_aio.serve(("::1", 0), ("127.0.0.1", 0)) as server:
        v6_server = next(a for a in server.addresses if a[0] == "::1")
        v4_server = next(a for a in server.addresses if a[0] == "127.0.0.1")
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", 0))
            port = sock.getsockname()[1]
            assert await stun_aio.binding(sock, v6_server, 2) == ("::1", port)
            # IPv4 from the same dual-stack socket: the server sees plain IPv4.
            assert await stun_aio.binding(sock, v4_server, 2) == ("127.0.0.1", port)
        finally:
            sock.close()


async def test_serve_needs_addresses() -> None:
    with pytest.raises(ValueError):
        await stun_aio.serve()
    with pytest.raises(ValueError):
        await stun_aio.serve(("127.0.0.1", 0), ("127.0.0.3", 0), other=("127.0.0.2", 0))
