"""transportd against the real pieces: the test database, the session's Redis channel layer, a
real relay on 127.0.0.1, the daemon in this process (``Transportd.start``/``close``: the object
``run()`` drives), and the real client code (``run_pair``, a ``Peer`` for IK). Loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import AsyncIterator
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

import pytest
import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import override_settings

from lazycat.devices import actions
from lazycat.devices.models import Device, DeviceStatus
from lazycat.tunnel.daemon import (
    AllowList,
    Transportd,
    packet_destination,
    packet_source_ok,
    parse_device_changed,
)
from transport import wire
from transport.bundle import Relay
from transport.client_cli import UserError, device_facts, run_pair
from transport.client_config import ClientConfig
from transport.paths import Candidate, CandidateKind, Direct
from transport.peer import Connected, Peer
from transport.peer_aio import PeerDriver, Subscription
from transport.relay_aio import RelayServer, ServerConfig
from transport.session import Keys

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]


def loopback(port: int) -> list[Candidate]:
    return [Candidate(CandidateKind.LAN, Direct("127.0.0.1", port))]


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    server = RelayServer(ServerConfig(udp=[("127.0.0.1", 0)]))
    await server.start()
    host, port = server.addresses["udp"][0]
    try:
        yield Relay("r1", host, port)
    finally:
        await server.stop()


@pytest.fixture
async def daemon(box: Any, relay: Relay) -> AsyncIterator[Transportd]:
    with override_settings(LAZYCAT_RELAYS=[relay], LAZYCAT_TUNNEL_LISTEN=("127.0.0.1", 0)):
        transportd = Transportd.from_settings(
            gatherer=loopback, poll_interval=0, tun=False, resync_interval=3600
        )
        await transportd.start()
        try:
            await asyncio.wait_for(transportd.layer_up.wait(), 10)
            yield transportd
        finally:
            await transportd.close()


async def make_code(box: Any, owner: Any) -> str:
    _, bundle = await sync_to_async(actions.do_create_pairing_code)(box, owner)
    assert bundle.lan == ()  # the tunnel listens on loopback: no LAN address to offer
    return bundle.to_text()


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)


async def device_row(key: bytes) -> Device | None:
    return await sync_to_async(Device.objects.filter(public_key=key).first)()


async def start_pairing(
    code: str, tmp_path: Path, name: str
) -> tuple[bytes, io.StringIO, asyncio.Task[Any]]:
    config = ClientConfig(tmp_path / name)
    key = config.load_or_create_key().public
    out = io.StringIO()
    task = asyncio.create_task(run_pair(code, config, timeout=30, gatherer=None, out=out))
    return key, out, task


async def pending_device(key: bytes, out: io.StringIO, task: asyncio.Task[Any]) -> Device:
    async def shown() -> bool:
        if task.done():
            task.result()  # raises what the client raised
        return "the box has the request" in out.getvalue()

    await wait_until(shown, 15, "the client hears PENDING")
    device = await device_row(key)
    assert device is not None and device.status == DeviceStatus.PENDING
    return device


@contextlib.asynccontextmanager
async def device_dialing(daemon: Transportd, keys: Keys) -> AsyncIterator[Subscription]:
    """A device with ``keys`` opening an IK session to the box (directly, on loopback); yields
    its events."""
    loop = asyncio.get_running_loop()
    driver = PeerDriver(Peer(keys, now=loop.time()), bind=("127.0.0.1", 0), gatherer=None)
    await driver.start()
    events = driver.subscribe()
    try:
        box_key = daemon.peer.keys.public
        driver.set_remote_candidates(box_key, loopback(daemon.driver.port))  # type: ignore[union-attr]
        driver.connect(box_key)
        yield events
    finally:
        events.close()
        await driver.close()


async def ik_connects(daemon: Transportd, keys: Keys, timeout: float) -> bool:
    """Whether a device with ``keys`` completes an IK handshake with the box (directly)."""
    async with device_dialing(daemon, keys) as events:
        with contextlib.suppress(TimeoutError):
            await events.wait_for(lambda e: isinstance(e, Connected), timeout)
            return True
        return False


async def test_pairing_approval_reaches_the_client_within_a_second_and_revoke_cuts_it(
    daemon: Transportd, box: Any, owner: Any, tmp_path: Path
) -> None:
    code = await make_code(box, owner)
    key, out, task = await start_pairing(code, tmp_path, "phone")
    try:
        device = await pending_device(key, out, task)
        facts = device_facts()
        assert (device.name, device.os, device.model, device.client_version) == (
            facts["name"],
            facts["os"],
            facts["model"],
            facts["client_version"],
        )
        assert key in daemon.waiting and key not in daemon.allowed

        started = time.monotonic()
        approved = await sync_to_async(actions.do_approve_device)(device, owner)
        paired = await asyncio.wait_for(task, 5)
        latency = time.monotonic() - started
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    print(f"approval -> client APPROVED: {latency * 1000:.1f} ms")
    assert latency < 1.0
    assert paired.address == IPv6Address(approved.overlay_address)
    assert daemon.allowed.addresses[key] == paired.address

    # The approved device connects with IK; a stranger's IK handshake gets no answer.
    device_keys = ClientConfig(tmp_path / "phone").load_key()
    assert await ik_connects(daemon, device_keys, 5)
    assert not await ik_connects(daemon, Keys.generate(), 2)

    # Revoked: out of the allow-list and its session closed at once; it cannot come back.
    session = daemon.peer.session(key)
    assert session is not None and session.established and not session.closed
    started = time.monotonic()
    await sync_to_async(actions.do_revoke_device)(approved, owner)

    async def cut() -> bool:
        return session.closed and key not in daemon.allowed

    await wait_until(cut, 1.0, "the revoked device's session is closed")
    print(f"revoke -> session closed: {(time.monotonic() - started) * 1000:.1f} ms")
    assert not await ik_connects(daemon, device_keys, 2)


async def test_a_rejected_device_hears_the_note(
    daemon: Transportd, box: Any, owner: Any, tmp_path: Path
) -> None:
    code = await make_code(box, owner)
    key, out, task = await start_pairing(code, tmp_path, "laptop")
    try:
        device = await pending_device(key, out, task)
        await sync_to_async(actions.do_reject_device)(device, owner, "not mine")
        with pytest.raises(UserError, match="rejected this device: not mine"):
            await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    assert key not in daemon.allowed and key not in daemon.waiting


async def test_a_used_code_is_refused_with_the_human_message(
    daemon: Transportd, box: Any, owner: Any, tmp_path: Path
) -> None:
    code = await make_code(box, owner)
    key, out, task = await start_pairing(code, tmp_path, "first")
    try:
        await pending_device(key, out, task)
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    other = ClientConfig(tmp_path / "second")
    with pytest.raises(UserError, match=actions.Refusal.USED_CODE.value):
        await asyncio.wait_for(
            run_pair(code, other, timeout=10, gatherer=None, out=io.StringIO()), 15
        )


async def test_the_allow_list_is_resynchronised_after_the_channel_layer_fails(
    daemon: Transportd, box: Any, tmp_path: Path
) -> None:
    # Approved behind the daemon's back (no message): only a resynchronisation can find it.
    keys = Keys.generate()
    address = IPv6Address(int(box.prefix.network_address) + 0x1234)
    await sync_to_async(Device.objects.create)(
        public_key=keys.public,
        name="Sideloaded",
        status=DeviceStatus.APPROVED,
        overlay_address=str(address),
    )
    assert keys.public not in daemon.allowed
    errors = daemon.stats["layer_errors"]
    # Every client connection of the test Redis is cut (the daemon's blocking receive too).
    client = redis.Redis(unix_socket_path=str(settings.REDIS_SOCKET))
    try:
        client.client_kill_filter(_type="normal", skipme=True)
    finally:
        client.close()

    async def resynced() -> bool:
        return daemon.stats["layer_errors"] > errors and keys.public in daemon.allowed

    await wait_until(resynced, 15, "the daemon reconnects and reloads the approved devices")
    assert daemon.allowed.addresses[keys.public] == address
    assert await ik_connects(daemon, keys, 5)
    # ... and it still hears messages afterwards (it joined the group again).
    await sync_to_async(Device.objects.filter(public_key=keys.public).update)(
        status=DeviceStatus.REVOKED
    )
    from lazycat.core.live import send_to_transportd

    await sync_to_async(send_to_transportd)(
        {
            "type": "device.changed",
            "public_key": __import__("base64").b64encode(keys.public).decode(),
        }
    )

    async def gone() -> bool:
        return keys.public not in daemon.allowed

    await wait_until(gone, 5, "a message after the reconnect is acted on")


# --- the translation pieces -----------------------------------------------------------------------


def test_parse_device_changed() -> None:
    key = bytes(range(32))
    import base64

    good = {"type": "device.changed", "public_key": base64.b64encode(key).decode()}
    assert parse_device_changed(good) == key
    assert parse_device_changed({**good, "public_key": "!!"}) is None
    assert parse_device_changed({**good, "public_key": base64.b64encode(b"short").decode()}) is None
    assert parse_device_changed({"type": "service.changed", "uid": "x"}) is None


def test_allow_list_replace_and_reverse_lookup() -> None:
    allow = AllowList()
    a, b = bytes([1]) * 32, bytes([2]) * 32
    one, two = IPv6Address("fc03:1136:3800::10"), IPv6Address("fc03:1136:3800::20")
    assert allow.replace({a: one}) == ({a}, set())
    assert allow.replace({a: two, b: one}) == ({a, b}, set())
    assert allow.key_for(two.packed) == a and allow.key_for(one.packed) == b
    assert allow.replace({b: one}) == (set(), {a})
    assert allow.key_for(two.packed) is None and not allow.is_allowed(a)


def _ipv6(src: IPv6Address, dst: IPv6Address) -> bytes:
    return bytes([0x60]) + bytes(7) + src.packed + dst.packed


def test_cryptokey_routing() -> None:
    mine, other = IPv6Address("fc03:1136:3800::10"), IPv6Address("fc03:1136:3800::20")
    box = IPv6Address("fc03:1136:3800::1")
    assert packet_source_ok(_ipv6(mine, box), mine)
    assert not packet_source_ok(_ipv6(other, box), mine)  # spoofed source
    assert not packet_source_ok(_ipv6(mine, box), None)  # not approved
    assert not packet_source_ok(bytes([0x45]) + bytes(39), mine)  # IPv4
    assert not packet_source_ok(_ipv6(mine, box)[:30], mine)  # truncated
    assert packet_destination(_ipv6(box, mine)) == mine.packed
    assert packet_destination(b"\x45" + bytes(39)) is None


async def test_a_relay_that_does_not_answer_over_udp_is_reached_over_tcp(box: Any) -> None:
    """The box's network blocks UDP: the relay listens only on TCP here. transportd falls back
    to a stream on the same host:port and registers there; the relay's name stays the same."""
    import socket

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    server = RelayServer(ServerConfig(tcp=[("127.0.0.1", port)]))
    await server.start()
    relay = Relay("r1", "127.0.0.1", port)  # UDP to this port goes nowhere
    try:
        with override_settings(LAZYCAT_RELAYS=[relay], LAZYCAT_TUNNEL_LISTEN=("127.0.0.1", 0)):
            transportd = Transportd.from_settings(
                gatherer=loopback, poll_interval=0, tun=False, fallback_after=0.5
            )
            await transportd.start()
            try:
                assert transportd.driver is not None
                assert not transportd.driver.relay_registered("r1")

                async def registered() -> bool:
                    assert transportd.driver is not None
                    return transportd.driver.relay_registered("r1")

                await wait_until(registered, 10, "registration over TCP")
                assert server.core.box_count == 1  # the relay knows the box, over TCP
                assert server.core.peer_handle(wire.peer_id(transportd.peer.keys.public))
            finally:
                await transportd.close()
    finally:
        await server.stop()


async def test_a_new_service_reaches_connected_devices_in_their_config_within_a_second(
    daemon: Transportd, box: Any, owner: Any, tmp_path: Path
) -> None:
    """Pairing hands the device its configuration; a service added later reaches the connected
    device as a new configuration frame, through the channel layer's service.changed."""
    import json

    from lazycat.services.actions import do_save_service
    from lazycat.services.forms import ServiceForm
    from transport import negotiation
    from transport.peer import FrameReceived

    code = await make_code(box, owner)
    key, out, task = await start_pairing(code, tmp_path, "phone")
    try:
        device = await pending_device(key, out, task)
        await sync_to_async(actions.do_approve_device)(device, owner)
        paired = await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    assert any(name.startswith(box.name) for name in paired.records)  # the config behind it
    assert paired.tickets and wire.Ticket.decode(paired.tickets[0]).client == wire.peer_id(key)

    keys = ClientConfig(tmp_path / "phone").load_key()
    async with device_dialing(daemon, keys) as events:
        await events.wait_for(lambda e: isinstance(e, Connected), 5)

        def config_with(name: str) -> Any:
            def match(event: Any) -> bool:
                if not (isinstance(event, FrameReceived) and isinstance(event.frame, wire.Control)):
                    return False
                message = negotiation.parse_box_message(json.loads(event.frame.data))
                return isinstance(message, negotiation.Config) and name in message.records

            return match

        await events.wait_for(config_with(f"{box.name}.heiyu.space"), 5)  # on connecting

        def add_service() -> None:
            data = {"kind": "dev-app", "name": "photos", "target": "192.168.1.20"}
            form = ServiceForm(data=data | {"ports": "tcp 80", "access_all": "on"})
            assert form.is_valid(), form.errors
            do_save_service(form, owner)

        started = time.monotonic()
        await sync_to_async(add_service)()
        await events.wait_for(config_with(f"photos.{box.name}.heiyu.space"), 5)
        assert time.monotonic() - started < 1.0
