"""The relay on real loopback sockets: UDP, TCP, TLS and WebSocket, restarts, HTTP, the CLI."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID

from transport import stun
from transport.relay import RelayConfig, RelayReceived
from transport.relay_aio import RelayConnection, RelayServer, ServerConfig
from transport.tickets import TicketKey
from transport.wire import ANY_CLIENT

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = ("127.0.0.1", 0)


def make_cert(directory: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (and localhost), written as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lazycat test relay")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "relay.crt", directory / "relay.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def new_static() -> bytes:
    return X25519PrivateKey.generate().private_bytes_raw()


@pytest.fixture
def cert(tmp_path: Path) -> tuple[str, str]:
    return make_cert(tmp_path)


@pytest.fixture
async def server(cert: tuple[str, str]) -> AsyncIterator[RelayServer]:
    config = ServerConfig(
        udp=[LOOPBACK],
        tcp=[LOOPBACK],
        tls=[LOOPBACK],
        tls_cert=cert[0],
        tls_key=cert[1],
        region="test",
    )
    relay = RelayServer(config)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


def url(relay: RelayServer, scheme: str) -> str:
    kind = {"udp": "udp", "tcp": "tcp", "ws": "tcp", "tls": "tls", "wss": "tls"}[scheme]
    host, port = relay.addresses[kind][0]
    return f"{scheme}://{host}:{port}" + ("/relay" if scheme in ("ws", "wss") else "")


class Pair:
    """A box and a device, each with its own connection to the relay."""

    def __init__(
        self, box_url: str, device_url: str, ctx: ssl.SSLContext | None, keepalive: float = 20.0
    ) -> None:
        self.ticket_key = TicketKey.generate()
        self.box = RelayConnection(
            box_url,
            new_static(),
            ticket_public=self.ticket_key.public_bytes(),
            ssl_context=ctx if box_url.startswith(("tls", "wss")) else None,
            keepalive=keepalive,
        )
        self.device = RelayConnection(
            device_url,
            new_static(),
            ssl_context=ctx if device_url.startswith(("tls", "wss")) else None,
            keepalive=keepalive,
        )

    async def __aenter__(self) -> Pair:
        await self.box.start()
        await self.device.start()
        await self.box.wait_registered()
        await self.device.wait_registered()
        wall = int(time.time())
        ticket = self.ticket_key.issue(
            self.box.peer_id, self.device.peer_id, wall + 600, now_wall=wall
        )
        self.device.add_ticket(ticket)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.box.close()
        await self.device.close()

    async def round_trip(self, tag: bytes) -> None:
        assert self.device.send(self.box.peer_id, b"from device " + tag)
        got = await asyncio.wait_for(self.box.recv(), 3)
        assert got == RelayReceived(self.device.peer_id, b"from device " + tag)
        assert self.box.send(self.device.peer_id, b"from box " + tag)
        got = await asyncio.wait_for(self.device.recv(), 3)
        assert got == RelayReceived(self.box.peer_id, b"from box " + tag)


def client_context(cert: tuple[str, str]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cert[0])


@pytest.mark.parametrize(
    ("box_scheme", "device_scheme"),
    [
        ("udp", "udp"),
        ("tcp", "tcp"),
        ("ws", "ws"),
        ("tls", "tls"),
        ("wss", "wss"),
        ("udp", "wss"),  # a box on UDP, a device behind a UDP-blocking network
    ],
)
async def test_box_and_device_exchange_payloads(
    server: RelayServer, cert: tuple[str, str], box_scheme: str, device_scheme: str
) -> None:
    async with Pair(url(server, box_scheme), url(server, device_scheme), client_context(cert)) as p:
        for i in range(3):
            await p.round_trip(str(i).encode())
        payload = os.urandom(1400)
        p.device.send(p.box.peer_id, payload)
        assert (await asyncio.wait_for(p.box.recv(), 3)).payload == payload
        rtt = await p.device.ping()
        assert 0 <= rtt < 1
    assert server.core.stats.forwarded >= 7


async def test_device_without_ticket_is_not_forwarded(server: RelayServer) -> None:
    box = RelayConnection(
        url(server, "udp"), new_static(), ticket_public=TicketKey.generate().public_bytes()
    )
    device = RelayConnection(url(server, "tcp"), new_static())
    await box.start()
    await device.start()
    try:
        await box.wait_registered()
        await device.wait_registered()
        device.send(box.peer_id, b"let me in")
        await asyncio.wait_for(_until(lambda: device.last_error is not None), 3)
        assert device.last_error is not None and device.last_error.code.name == "NO_TICKET"
        assert box._queue.empty()
    finally:
        await box.close()
        await device.close()


async def _until(condition: object, step: float = 0.02) -> None:
    assert callable(condition)
    while not condition():
        await asyncio.sleep(step)


async def test_clients_register_again_after_a_relay_restart(cert: tuple[str, str]) -> None:
    config = ServerConfig(udp=[LOOPBACK], tcp=[LOOPBACK])
    first = RelayServer(config)
    await first.start()
    udp, tcp = first.addresses["udp"][0], first.addresses["tcp"][0]
    box_url, device_url = f"udp://{udp[0]}:{udp[1]}", f"tcp://{tcp[0]}:{tcp[1]}"
    again = RelayServer(ServerConfig(udp=[udp], tcp=[tcp]))
    try:
        async with Pair(box_url, device_url, None, keepalive=0.2) as p:
            await p.round_trip(b"before")
            await first.stop()
            await asyncio.sleep(0.3)
            await again.start()  # the same ports, no memory of anyone
            await asyncio.wait_for(
                _until(lambda: again.core.peer_count == 2 and p.device.registered.is_set()), 10
            )
            await p.round_trip(b"after")  # the device presented its ticket again by itself
    finally:
        await first.stop()
        await again.stop()


async def _http(address: tuple[str, int], path: str, headers: str = "") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: relay\r\n{headers}\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 3)
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_healthz_and_metrics(server: RelayServer) -> None:
    address = server.addresses["tcp"][0]
    status, body = await _http(address, "/healthz")
    assert (status, body) == (200, "ok region=test\n")
    async with Pair(url(server, "udp"), url(server, "ws"), None) as p:
        await p.round_trip(b"m")
    status, body = await _http(address, "/metrics")
    assert status == 200
    assert "lazycat_relay_forwarded_frames_total 2.0" in body
    assert "lazycat_relay_registrations_total 2.0" in body
    assert 'lazycat_relay_build_info{loop="' in body and 'region="test"' in body
    status, _ = await _http(address, "/nope")
    assert status == 404


async def test_metrics_key_is_required_when_set() -> None:
    relay = RelayServer(ServerConfig(tcp=[LOOPBACK], metrics_key="s3cret"))
    await relay.start()
    try:
        address = relay.addresses["tcp"][0]
        assert (await _http(address, "/metrics"))[0] == 401
        wrong = "Authorization: Bearer nope\r\n"
        assert (await _http(address, "/metrics", wrong))[0] == 401
        status, body = await _http(address, "/metrics", "Authorization: Bearer s3cret\r\n")
        assert status == 200 and "lazycat_relay_peers 0.0" in body
    finally:
        await relay.stop()


async def test_stun_binding_on_the_relay_port(server: RelayServer) -> None:
    host, port = server.addresses["udp"][0]
    loop = asyncio.get_running_loop()
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    class Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            answers.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(Proto, remote_addr=(host, port))
    try:
        transaction = stun.new_transaction_id()
        request = stun.encode(stun.Message(stun.Class.REQUEST, transaction, (stun.Padding(40),)))
        transport.sendto(request)
        raw = await asyncio.wait_for(answers.get(), 3)
        assert len(raw) <= len(request)  # never an amplifier
        answer = stun.decode(raw)
        assert answer.transaction_id == transaction
        mapped = answer.find(stun.XorMappedAddress)
        assert mapped is not None
        assert mapped.address == transport.get_extra_info("sockname")[:2]
    finally:
        transport.close()


async def test_connection_cap_closes_extra_streams() -> None:
    relay = RelayServer(ServerConfig(tcp=[LOOPBACK], max_connections=1))
    await relay.start()
    try:
        address = relay.addresses["tcp"][0]
        _, first = await asyncio.open_connection(*address)
        await asyncio.wait_for(_until(lambda: len(relay.streams) == 1), 3)
        reader, second = await asyncio.open_connection(*address)
        assert await asyncio.wait_for(reader.read(), 3) == b""  # closed at once
        assert relay.core.stats.drops["max_connections"] == 1
        first.close()
        second.close()
    finally:
        await relay.stop()


async def test_stream_that_never_registers_is_closed() -> None:
    relay = RelayServer(ServerConfig(tcp=[LOOPBACK], register_timeout=0.2))
    relay.TICK = 0.1
    await relay.start()
    try:
        reader, writer = await asyncio.open_connection(*relay.addresses["tcp"][0])
        writer.write(b"\x00\x09\x27" + bytes(8))  # a PING, and then nothing
        assert await asyncio.wait_for(reader.read(), 3) == b"\x00\x09\x26\x02registe"
        writer.close()
        assert relay.core.stats.drops["stream_never_registered"] == 1
    finally:
        await relay.stop()


async def test_pairing_ticket_over_tls(server: RelayServer, cert: tuple[str, str]) -> None:
    ticket_key = TicketKey.generate()
    box = RelayConnection(
        url(server, "tls"),
        new_static(),
        ticket_public=ticket_key.public_bytes(),
        ssl_context=client_context(cert),
    )
    newcomer = RelayConnection(url(server, "udp"), new_static())
    await box.start()
    await newcomer.start()
    try:
        await box.wait_registered()
        await newcomer.wait_registered()
        wall = int(time.time())
        newcomer.add_ticket(ticket_key.issue(box.peer_id, ANY_CLIENT, wall + 300, now_wall=wall))
        newcomer.send(box.peer_id, b"pair me")
        assert (await asyncio.wait_for(box.recv(), 3)).payload == b"pair me"
    finally:
        await box.close()
        await newcomer.close()


# --- the command line ---------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "transport.relay_cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_cli_explains_a_bad_flag() -> None:
    proc = _cli("--udp", "localhost:3478")
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 2
    assert "--udp 'localhost:3478': 'localhost' is not an IP address" in err


def test_cli_explains_an_unreadable_certificate(tmp_path: Path) -> None:
    proc = _cli("--tls", "127.0.0.1:0", "--tls-cert", str(tmp_path / "no.crt"), "--tls-key", "x")
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 2
    assert "cannot read --tls-cert" in err and "No such file" in err


async def test_cli_serves_and_stops_cleanly_on_sigterm() -> None:
    proc = _cli("--udp", "127.0.0.1:0", "--region", "lab", "--log-level", "info")
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert 'msg="relay listening"' in line and "region=lab" in line
        udp = line.split("udp=")[1].split()[0]
        box_key = TicketKey.generate()
        box = RelayConnection(f"udp://{udp}", new_static(), ticket_public=box_key.public_bytes())
        await box.start()
        try:
            await box.wait_registered()
        finally:
            await box.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(asyncio.to_thread(proc.communicate), 30)
        assert proc.returncode == 0
        assert 'msg="relay stopping"' in out and "registrations=1" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_config_limits_reach_the_core() -> None:
    config = ServerConfig(tcp=[LOOPBACK], relay=RelayConfig(max_frame=20_000))
    with pytest.raises(ValueError, match="max_frame"):
        RelayServer(config)
