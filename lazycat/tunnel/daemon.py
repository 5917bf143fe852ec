"""transportd: the box's tunnel daemon, wired to the console's database and channel layer.

The engine is ``transport.peer.Peer`` driven by ``transport.peer_aio.PeerDriver`` (one UDP socket
on LAZYCAT_TUNNEL_LISTEN, registered at every relay of LAZYCAT_RELAYS; a relay that has not
registered us over UDP 5 s after start is reached over TCP/TLS/WebSocket instead,
LAZYCAT_RELAY_FALLBACK). It also keeps a UDP port mapping on the router (PCP, NAT-PMP, UPnP:
LAZYCAT_PORTMAP). This module only translates, in both directions (docs/live-state.md and
docs/negotiation.md are the contracts):

::

    database (the truth)  --load_approved / load_device-->  AllowList (key -> overlay address)
    channel layer group "transportd":                        |  Peer(is_allowed=allow-list)
      device.changed --> re-read that device --> DeviceChange --> allow / forget + close its
                                                 sessions / PAIR_STATE to a waiting XK session
      punch.start    --> set_remote_candidates + schedule_start (the simultaneous start)
    Peer events:
      CandidatesChanged --> publish_box_candidates (the cache; the negotiation reads them)
      Connected (IK), a CONTROL config request, names changed --> the config frame
      PairingRequested --> answer_pairing() (do_request_pairing, idempotent) --> PAIR_STATE
      PathChanged      --> do_report_path(PathReport)          at once
      counters         --> do_report_path(PathReport)          every COUNTER_INTERVAL, if moved
      Disconnected     --> do_report_path(offline)
      PacketReceived   --> TUN lzc0, only if its source is the sender's own overlay address
    TUN lzc0 packet    --> the device owning its destination overlay address

A channel-layer message is a hint to re-read the database, never the state itself: on start,
after every reconnect to Redis, and every ``resync_interval`` the whole allow-list is reloaded,
so a message lost while Redis was away changes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import logging
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv6Address, IPv6Network
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings

from lazycat.core import keys as box_keys
from lazycat.core.live import TRANSPORTD_GROUP
from lazycat.tunnel.services import ServiceExposure
from transport import addressing, negotiation, wire
from transport.bundle import Relay
from transport.paths import Candidate, CandidateKind, Direct, ViaRelay
from transport.peer import (
    CandidatesChanged,
    Connected,
    Disconnected,
    FrameReceived,
    PacketReceived,
    PairingRequested,
    PathChanged,
    Peer,
    PeerEvent,
)
from transport.peer_aio import Gatherer, PeerDriver, gather
from transport.session import Keys
from transport.tun import Tun, TunError

log = logging.getLogger("lazycat.transportd")

UP_LINE = "transportd is up"
TUN_NAME = "lzc0"
COUNTER_INTERVAL = 5.0  # seconds between counter reports of one connected device
FALLBACK_AFTER = 5.0  # seconds a relay has to register us over UDP before we try a stream
MAX_HELD_PATHS = 1024  # paths of unapproved keys kept for when they are approved
RESYNC_INTERVAL = 300.0  # a full reload of the allow-list even without any message
BACKOFF_FIRST, BACKOFF_MAX = 0.25, 10.0  # reconnecting to the channel layer

APPROVED, REJECTED, PENDING = "approved", "rejected", "pending"


# --- the database side (sync: run through sync_to_async) ----------------------------------------


@dataclass(frozen=True)
class DeviceRow:
    """What transportd needs of one device."""

    key: bytes
    status: str
    address: IPv6Address | None
    note: str = ""


def _row(device: Any) -> DeviceRow:
    address = IPv6Address(device.overlay_address) if device.overlay_address else None
    return DeviceRow(device.key, str(device.status), address, device.decision_note)


def load_approved() -> dict[bytes, IPv6Address]:
    """Every approved device's key and overlay address."""
    from lazycat.devices.models import Device, DeviceStatus

    out: dict[bytes, IPv6Address] = {}
    approved = Device.objects.filter(status=DeviceStatus.APPROVED, overlay_address__isnull=False)
    for key, address in approved.values_list("public_key", "overlay_address"):
        out[bytes(key)] = IPv6Address(address)
    return out


def load_device(key: bytes) -> DeviceRow | None:
    from lazycat.devices.models import Device

    device = Device.objects.filter(public_key=key).first()
    return None if device is None else _row(device)


def answer_pairing(
    key: bytes, secret: bytes, facts: dict[str, Any], source: str
) -> wire.PairStateFrame:
    """What to tell a device that asked to pair. Idempotent: the session layer repeats a request
    on retries and rekeys, and a repeat (same code, already recorded for this key) is answered
    from the database instead of being refused as a used code."""
    from lazycat.devices.actions import DeviceFacts, do_request_pairing
    from lazycat.devices.models import DeviceStatus, PairingCode

    device = load_device(key)
    if device is not None and device.status == DeviceStatus.APPROVED:
        return wire.PairStateFrame(wire.PairState.APPROVED, device.address)
    repeat = (
        device is not None
        and PairingCode.objects.filter(
            secret_hash=PairingCode.hash_secret(secret), used_by__public_key=key
        ).exists()
    )
    if repeat and device is not None:
        if device.status == DeviceStatus.PENDING:
            return wire.PairStateFrame(wire.PairState.PENDING, None, "waiting for the owner")
        if device.status == DeviceStatus.REJECTED:
            return wire.PairStateFrame(wire.PairState.REJECTED, None, device.note)
    try:
        device_facts = DeviceFacts(**{k: facts[k] for k in DeviceFacts.LIMITS if k in facts})
    except TypeError:  # no name
        device_facts = DeviceFacts(name="")
    outcome = do_request_pairing(secret, key, device_facts, source)
    if outcome.refusal is not None:
        return wire.PairStateFrame(wire.PairState.REFUSED, None, outcome.refusal.value)
    return wire.PairStateFrame(wire.PairState.PENDING, None, "waiting for the owner")


def load_config(key: bytes) -> bytes | None:
    """The ``config`` control frame's body for an approved device (None: not approved)."""
    import json

    from lazycat.devices.actions import DecisionError, device_config
    from lazycat.devices.models import Device

    device = Device.objects.filter(public_key=key).first()
    if device is None:
        return None
    try:
        return json.dumps(device_config(device), separators=(",", ":")).encode()
    except DecisionError:
        return None


def publish_candidates(candidates: list[Candidate], port_mapping: str) -> None:
    from lazycat.devices.negotiation import publish_box_candidates

    publish_box_candidates(candidates, port_mapping)


def parse_punch(message: dict[str, Any]) -> tuple[bytes, list[Candidate], float] | None:
    """A ``punch.start`` message: the device's key, its candidates, the delay; None if bad."""
    try:
        key = base64.b64decode(message.get("public_key", ""), validate=True)
        candidates = negotiation.candidates_from_json(message.get("candidates"))
        delay = float(message.get("delay", 0.0))
    except (binascii.Error, ValueError, TypeError):
        return None
    if len(key) != 32 or not 0 <= delay <= negotiation.START_MAX * 10:
        return None
    return key, candidates, delay


def report_path(key: bytes, link: Link, cause: str = "") -> None:
    from lazycat.devices.actions import PathReport, do_report_path
    from lazycat.devices.models import PathKind

    do_report_path(
        key,
        PathReport(
            path=PathKind(link.kind),
            endpoint=link.endpoint,
            relay=link.relay,
            rtt_ms=link.rtt_ms,
            rx_bytes=link.rx_bytes,
            tx_bytes=link.tx_bytes,
            last_handshake=link.last_handshake,
            cause=cause or link.cause,
        ),
    )


# --- the translation pieces (no I/O) ------------------------------------------------------------


def parse_device_changed(message: dict[str, Any]) -> bytes | None:
    """The device key a ``device.changed`` message is about, or None for a malformed one."""
    if message.get("type") != "device.changed":
        return None
    try:
        key = base64.b64decode(str(message.get("public_key", "")), validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) == 32 else None


class AllowList:
    """The approved devices: key -> overlay address, and the reverse for the TUN."""

    def __init__(self) -> None:
        self.addresses: dict[bytes, IPv6Address] = {}
        self.keys: dict[bytes, bytes] = {}  # packed overlay address -> key

    def __contains__(self, key: object) -> bool:
        return key in self.addresses

    def __len__(self) -> int:
        return len(self.addresses)

    def is_allowed(self, key: bytes) -> bool:
        return key in self.addresses

    def allow(self, key: bytes, address: IPv6Address) -> None:
        old = self.addresses.get(key)
        if old is not None and self.keys.get(old.packed) == key:
            del self.keys[old.packed]  # its old address (unless another device has it now)
        self.addresses[key] = address
        self.keys[address.packed] = key

    def forget(self, key: bytes) -> bool:
        address = self.addresses.pop(key, None)
        if address is None:
            return False
        if self.keys.get(address.packed) == key:
            del self.keys[address.packed]
        return True

    def replace(self, approved: dict[bytes, IPv6Address]) -> tuple[set[bytes], set[bytes]]:
        """Make the list ``approved``; returns (added or changed, removed)."""
        removed = set(self.addresses) - set(approved)
        added = {k for k, a in approved.items() if self.addresses.get(k) != a}
        for key in removed:
            self.forget(key)
        for key in added:
            self.allow(key, approved[key])
        return added, removed

    def key_for(self, destination: bytes) -> bytes | None:
        return self.keys.get(destination)


def packet_source_ok(packet: bytes, address: IPv6Address | None) -> bool:
    """Cryptokey routing: a device may only send IPv6 packets from its own overlay address."""
    return (
        address is not None
        and len(packet) >= 40
        and packet[0] >> 4 == 6
        and packet[8:24] == address.packed
    )


def packet_destination(packet: bytes) -> bytes | None:
    """The packed IPv6 destination of a packet read from the TUN, or None if it is not IPv6."""
    if len(packet) < 40 or packet[0] >> 4 != 6:
        return None
    return packet[24:40]


@dataclass
class Link:
    """One connected device's path and counters, as last reported (or to report)."""

    kind: str = "offline"
    endpoint: str = ""
    relay: str = ""
    rtt_ms: float | None = None
    cause: str = ""
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_handshake: datetime | None = None
    reported: tuple[int, int, datetime | None] = field(default=(0, 0, None))

    def moved(self) -> bool:
        return (self.rx_bytes, self.tx_bytes, self.last_handshake) != self.reported

    def mark_reported(self) -> None:
        self.reported = (self.rx_bytes, self.tx_bytes, self.last_handshake)


# --- the daemon ----------------------------------------------------------------------------------


class Transportd:
    """See the module docstring. ``start`` / ``close``; :func:`run` is the process around it."""

    def __init__(
        self,
        *,
        listen: tuple[str, int],
        relays: list[Relay],
        tun: bool,
        gatherer: Gatherer | None = gather,
        poll_interval: float = 5.0,
        resync_interval: float = RESYNC_INTERVAL,
        counter_interval: float = COUNTER_INTERVAL,
        portmap: bool = False,
        relay_fallback: str = "tcp",
        fallback_after: float = FALLBACK_AFTER,
        forwarding: bool = False,
    ) -> None:
        self.listen = listen
        self.want_portmap = portmap
        self.relay_fallback = relay_fallback  # "tcp", "tls", "ws", "wss" or "off"
        self.fallback_after = fallback_after
        self.port_mapping: Direct | None = None  # what the router forwards to us, if anything
        self.portmapper: Any = None
        self.relays = relays
        self.want_tun = tun
        self.gatherer = gatherer
        self.poll_interval = poll_interval
        self.resync_interval = resync_interval
        self.counter_interval = counter_interval
        self.allowed = AllowList()
        self.waiting: set[bytes] = set()  # keys whose XK session waits for the owner's decision
        self.links: dict[bytes, Link] = {}
        self.held_paths: dict[bytes, PathChanged] = {}  # paths of devices not approved (yet)
        self.stats: dict[str, int] = {"spoofed": 0, "no_route": 0, "layer_errors": 0}
        self.driver: PeerDriver | None = None
        self.tun: Tun | None = None
        self.want_forwarding = forwarding
        self.services: ServiceExposure | None = None
        self.layer_up = asyncio.Event()  # joined the group and resynchronised
        self._tasks: list[asyncio.Task[None]] = []
        self._channel: str | None = None
        self._closing = False
        self._events: Any = None

    @classmethod
    def from_settings(cls, **overrides: Any) -> Transportd:
        options: dict[str, Any] = {
            "listen": settings.LAZYCAT_TUNNEL_LISTEN,
            "relays": list(settings.LAZYCAT_RELAYS),
            "tun": settings.LAZYCAT_TUNNEL_TUN,
            "portmap": settings.LAZYCAT_PORTMAP,
            "relay_fallback": settings.LAZYCAT_RELAY_FALLBACK,
            "forwarding": settings.LAZYCAT_FORWARDING,
        }
        options.update(overrides)
        return cls(**options)

    @property
    def peer(self) -> Peer:
        assert self.driver is not None, "start() first"
        return self.driver.peer

    # --- life -------------------------------------------------------------------------------

    async def start(self) -> None:
        private, public = box_keys.load_or_create(settings.LAZYCAT_BOX_KEY_FILE)
        ticket_key = box_keys.load_or_create_ticket_key(settings.LAZYCAT_TICKET_KEY_FILE)
        self.allowed.replace(await sync_to_async(load_approved)())
        loop = asyncio.get_running_loop()
        peer = Peer(
            Keys.from_private(private),
            now=loop.time(),
            is_allowed=self.allowed.is_allowed,
            allow_pairing=True,
            ticket_public=ticket_key.public_bytes(),
        )
        self.driver = PeerDriver(
            peer,
            bind=self.listen,
            gatherer=self._gather if self.gatherer is not None else None,
            poll_interval=self.poll_interval,
            on_packet=self._from_device,
        )
        await self.driver.start()
        self._events = self.driver.subscribe(4096)
        for relay in self.relays:
            try:
                await self.driver.add_relay(relay.name, (relay.host, relay.port))
            except OSError as exc:
                log.warning("relay skipped", extra={"relay": relay.name, "error": str(exc)})
        if self.want_tun:
            await self._open_tun(public)
        if self.tun is not None and self.want_forwarding:
            await self._start_services()
        if self.want_portmap:
            await self._start_portmap()
        await self._publish_candidates()
        self._tasks = [
            loop.create_task(self._consume(), name="transportd-events"),
            loop.create_task(self._listen(), name="transportd-layer"),
            loop.create_task(self._counters(), name="transportd-counters"),
        ]
        if self.relay_fallback != "off" and self.relays:
            self._tasks.append(loop.create_task(self._fallback(), name="transportd-fallback"))
        log.info(
            UP_LINE,
            extra={
                "listen": f"{self.driver.local_address[0]}:{self.driver.port}",
                "relays": ",".join(r.name for r in self.relays) or "-",
                "approved": len(self.allowed),
                "tun": self.tun.name if self.tun is not None else "off",
            },
        )

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # channels_redis may swallow a cancellation inside receive(); _listen then sees
            # _closing. Bounded anyway: a task that still does not end is left to the loop.
            _, stuck = await asyncio.wait(self._tasks, timeout=5)
            for task in stuck:
                log.warning("task did not stop", extra={"task": task.get_name()})
        self._tasks = []
        await self._leave_group()
        if self.portmapper is not None:
            with contextlib.suppress(Exception):
                await self.portmapper.aclose()  # deletes the mapping on the router
            self.portmapper = None
        if self.driver is not None:
            await self.driver.close()
        if self.services is not None:
            await self.services.close()
            self.services = None
        if self.tun is not None:
            self.tun.close()
            self.tun = None

    async def _open_tun(self, public: bytes) -> None:
        prefix: IPv6Network = addressing.box_prefix(public)
        try:
            tun = Tun.open(TUN_NAME)
        except TunError as exc:
            reason = "no CAP_NET_ADMIN" if exc.errno in (errno.EPERM, errno.EACCES) else str(exc)
            log.warning(
                "running without TUN: pairing and paths work, traffic does not",
                extra={"reason": reason},
            )
            return
        try:
            # pyroute2's synchronous IPRoute runs an event loop of its own, which it cannot do
            # inside ours: configure in a thread (as lazycat-client up does)
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: tun.configure([addressing.box_address(prefix)], routes=[prefix])
            )
        except (TunError, OSError) as exc:
            tun.close()
            log.warning("running without TUN", extra={"reason": str(exc)})
            return
        tun.start(self._from_tun)
        self.tun = tun

    async def _start_services(self) -> None:
        """Forwarding to the box's services (docs/forwarding.md). A failure (no CAP_NET_ADMIN,
        no nft) is logged and retried on every change and resync; the tunnel works meanwhile."""
        from transport.exposure_linux import KernelExposure

        kernel = KernelExposure(
            tun=TUN_NAME,
            tproxy_port=settings.LAZYCAT_FORWARDER_PORT,
            # the sysctls' values before we changed them: restored even after a crash
            state_file=settings.DATA_DIR / "forwarding-sysctls.json",
        )
        self.services = ServiceExposure(kernel)
        await self.services.start()

    async def _refresh_services(self, why: str) -> None:
        if self.services is not None:
            await self.services.refresh(why)

    # --- candidates and the router's port mapping ------------------------------------------------

    def _gather(self, port: int) -> list[Candidate]:
        assert self.gatherer is not None
        found = self.gatherer(port)
        if self.port_mapping is not None:
            found.append(Candidate(CandidateKind.PORTMAPPED, self.port_mapping, priority=1))
        return found

    async def _start_portmap(self) -> None:
        from transport.portmap import MappingAcquired, MappingFailed, MappingLost
        from transport.portmap_aio import PortMapClient

        def on_event(event: Any) -> None:
            mapped = self.port_mapping
            if isinstance(event, MappingAcquired):
                mapped = Direct(event.external_ip, event.external_port)
                log.info(
                    "port mapping",
                    extra={"external": str(mapped), "how": event.protocol.value},
                )
            elif isinstance(event, MappingLost):
                mapped = None
                log.info("port mapping lost", extra={"reason": event.reason})
            elif isinstance(event, MappingFailed) and self.port_mapping is None:
                log.info("no port mapping", extra={"retry_in": event.retry_in})
            if mapped != self.port_mapping:
                self.port_mapping = mapped
                asyncio.get_running_loop().create_task(self._refresh_candidates())

        client = PortMapClient(self.driver.port if self.driver else 0, on_event=on_event)
        try:
            await client.start()
        except OSError as exc:
            log.info("no port mapping", extra={"reason": str(exc)})
            return
        self.portmapper = client

    async def _fallback(self) -> None:
        """A relay that has not registered us over UDP by now is reached over a stream: the
        box's network blocks UDP (or that relay's port). Checked once, after start."""
        await asyncio.sleep(self.fallback_after)
        assert self.driver is not None
        for relay in self.relays:
            if self.driver.relay_registered(relay.name):
                continue
            url = f"{self.relay_fallback}://{relay.endpoint}"
            log.warning(
                "relay does not answer over UDP: using a stream",
                extra={"relay": relay.name, "url": url},
            )
            self.driver.use_stream(relay.name, url)

    async def _refresh_candidates(self) -> None:
        if self.driver is not None:
            await self.driver.refresh_candidates()

    async def _publish_candidates(self) -> None:
        if self.driver is None:
            return
        mapping = str(self.port_mapping) if self.port_mapping is not None else ""
        try:
            await sync_to_async(publish_candidates)(self.peer.local_candidates(), mapping)
        except Exception as exc:  # Redis away: the next change or resync publishes again
            log.warning("candidates not published", extra={"error": str(exc)})

    def punch(self, key: bytes, candidates: list[Candidate], delay: float) -> None:
        """The negotiation's simultaneous start with an approved device."""
        if self.driver is None or key not in self.allowed:
            return
        self.driver.set_remote_candidates(key, candidates)
        self.driver.schedule_start(key, delay)
        log.info(
            "simultaneous start",
            extra={"device": key[:4].hex(), "candidates": len(candidates), "delay": delay},
        )

    async def send_config(self, key: bytes, pattern: wire.Pattern = wire.Pattern.IK) -> None:
        """The device's names and a fresh ticket, on the control channel of its session."""
        if self.driver is None:
            return
        body = await sync_to_async(load_config)(key)
        if body is not None:
            self.driver.send_frame(
                key, wire.Control(negotiation.CONFIG_CHANNEL, body), pattern=pattern
            )

    async def _configs_changed(self) -> None:
        """Names changed: every connected device gets its configuration again."""
        for key in list(self.links):
            if key in self.allowed:
                await self.send_config(key)

    # --- the channel layer --------------------------------------------------------------------

    async def _listen(self) -> None:
        from channels.layers import get_channel_layer

        delay = BACKOFF_FIRST
        while not self._closing:
            try:
                layer = get_channel_layer()
                assert layer is not None
                self._channel = await layer.new_channel("transportd.")
                await layer.group_add(TRANSPORTD_GROUP, self._channel)
                await self.resync("joined the channel layer")  # after joining: nothing is lost
                self.layer_up.set()
                delay = BACKOFF_FIRST
                refresh = asyncio.get_running_loop().time() + self.resync_interval
                while True:
                    left = refresh - asyncio.get_running_loop().time()
                    if left <= 0:
                        # keeps the group membership from expiring, and catches lost messages
                        await layer.group_add(TRANSPORTD_GROUP, self._channel)
                        await self.resync("periodic")
                        await self._publish_candidates()
                        refresh = asyncio.get_running_loop().time() + self.resync_interval
                        continue
                    try:
                        async with asyncio.timeout(left):
                            message = await layer.receive(self._channel)
                    except TimeoutError:
                        continue
                    await self.on_message(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                current = asyncio.current_task()
                if self._closing or (current is not None and current.cancelling()):
                    return  # a cancellation the channel layer turned into an error
                self.layer_up.clear()
                self.stats["layer_errors"] += 1
                log.warning(
                    "channel layer lost; reconnecting",
                    extra={"error": f"{type(exc).__name__}: {exc}", "retry_in": delay},
                )
                await asyncio.sleep(delay)
                delay = min(BACKOFF_MAX, delay * 2)

    async def _leave_group(self) -> None:
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        if layer is None or self._channel is None:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await layer.group_discard(TRANSPORTD_GROUP, self._channel)

    async def on_message(self, message: dict[str, Any]) -> None:
        if message.get("type") == "punch.start":
            punch = parse_punch(message)
            if punch is None:
                log.warning("bad punch.start message ignored")
            else:
                self.punch(*punch)
            return
        if message.get("type") == "service.changed":
            # its name may be new, renamed, gone or now (not) reachable for some device: every
            # connected device gets its configuration again, and forwarding follows
            await self._refresh_services("service.changed")
            await self._configs_changed()
            return
        key = parse_device_changed(message)
        if key is None:
            return
        row = await sync_to_async(load_device)(key)
        was_waiting = key in self.waiting
        self.apply(key, row)
        if was_waiting and key in self.allowed:
            await self.send_config(key, wire.Pattern.XK)  # right behind the approval
        await self._refresh_services("device.changed")
        await self._configs_changed()

    async def resync(self, why: str) -> None:
        """Make the allow-list the database's approved devices."""
        approved = await sync_to_async(load_approved)()
        added, removed = self.allowed.replace(approved)
        for key in removed:
            self._cut(key)
        for key in added:
            self._report_held(key)
        for key in added & self.waiting:
            self._answer(key, wire.PairStateFrame(wire.PairState.APPROVED, approved[key]))
        await self._refresh_services(why)
        log.info(
            "allow-list synchronised",
            extra={
                "why": why,
                "approved": len(approved),
                "added": len(added),
                "removed": len(removed),
            },
        )

    def apply(self, key: bytes, row: DeviceRow | None) -> None:
        """A device changed (its current row, or None if it was deleted): act on it."""
        if row is not None and row.status == APPROVED and row.address is not None:
            self.allowed.allow(key, row.address)
            self._report_held(key)
            if key in self.waiting:
                self._answer(key, wire.PairStateFrame(wire.PairState.APPROVED, row.address))
            return
        if row is not None and row.status == PENDING:
            return  # renamed while pending: nothing for the tunnel
        self._cut(key)
        if row is not None and row.status == REJECTED and key in self.waiting:
            self._answer(key, wire.PairStateFrame(wire.PairState.REJECTED, None, row.note))

    def _report_held(self, key: bytes) -> None:
        """Just approved: report the path it has been on since before the approval."""
        event = self.held_paths.pop(key, None)
        if event is not None:
            asyncio.get_running_loop().create_task(self.on_event(event))

    def _answer(self, key: bytes, frame: wire.PairStateFrame) -> None:
        if self.driver is None:
            return
        self.driver.send_frame(key, frame, pattern=wire.Pattern.XK)
        if frame.state is not wire.PairState.PENDING:
            self.waiting.discard(key)
        log.info(
            "pairing answered",
            extra={"device": key[:4].hex(), "state": frame.state.name.lower()},
        )

    def _cut(self, key: bytes) -> None:
        """Not (or no longer) approved: out of the allow-list, its sessions closed at once."""
        forgotten = self.allowed.forget(key)
        closed = 0
        if self.driver is not None:
            session = self.peer.session(key, wire.Pattern.IK)
            if session is not None and not session.closed:
                session.close()  # its keys are gone: the next datagram is dropped
                closed += 1
            self.driver.flush()
        self.links.pop(key, None)
        if forgotten or closed:
            log.info("device cut off", extra={"device": key[:4].hex(), "closed": closed})

    # --- peer events --------------------------------------------------------------------------

    async def _consume(self) -> None:
        while True:
            event = await self._events.get()
            try:
                await self.on_event(event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event failed", extra={"event": type(event).__name__})

    async def on_event(self, event: PeerEvent) -> None:
        if isinstance(event, PairingRequested):
            await self._on_pairing(event)
        elif isinstance(event, Connected) and event.pattern is wire.Pattern.IK:
            link = self.links.setdefault(event.peer_key, Link())
            link.last_handshake = datetime.now(UTC)
            await self.send_config(event.peer_key)
        elif isinstance(event, CandidatesChanged):
            await self._publish_candidates()
        elif isinstance(event, FrameReceived):
            frame = event.frame
            if (
                isinstance(frame, wire.Control)
                and frame.channel == negotiation.CONFIG_CHANNEL
                and event.pattern is wire.Pattern.IK
                and event.peer_key in self.allowed
            ):
                await self.send_config(event.peer_key)  # the device asked again
        elif isinstance(event, PathChanged):
            if event.peer_key not in self.allowed:
                # a device still pairing: its path is reported if the owner approves it (the
                # path may not change again for hours, e.g. relayed behind a symmetric NAT)
                self.held_paths[event.peer_key] = event
                while len(self.held_paths) > MAX_HELD_PATHS:
                    self.held_paths.pop(next(iter(self.held_paths)))
                return
            self.held_paths.pop(event.peer_key, None)
            log.info(
                "path changed",
                extra={
                    "device": event.peer_key[:4].hex(),
                    "kind": event.kind,
                    "cause": event.cause,
                },
            )
            link = self.links.setdefault(event.peer_key, Link())
            link.kind, link.endpoint, link.relay = event.kind, event.endpoint, event.relay
            link.rtt_ms, link.cause = event.rtt_ms, event.cause
            link.mark_reported()
            await sync_to_async(report_path)(event.peer_key, link)
        elif isinstance(event, Disconnected):
            self.held_paths.pop(event.peer_key, None)
            gone = self.links.pop(event.peer_key, None)
            if gone is not None:
                gone.kind, gone.endpoint, gone.relay, gone.rtt_ms = "offline", "", "", None
                await sync_to_async(report_path)(event.peer_key, gone, event.reason)

    async def _on_pairing(self, event: PairingRequested) -> None:
        frame = await sync_to_async(answer_pairing)(
            event.peer_key, event.secret, event.facts, self._source(event.peer_key)
        )
        if frame.state is wire.PairState.PENDING:
            self.waiting.add(event.peer_key)
        elif frame.state is wire.PairState.APPROVED and frame.address is not None:
            self.allowed.allow(event.peer_key, frame.address)
            self._report_held(event.peer_key)
        self._answer(event.peer_key, frame)

    def _source(self, key: bytes) -> str:
        """Where a pairing request came from, for the rate limit and the audit log: the
        device's address, or ``relay:<name>`` (a relay hides it)."""
        session = self.peer.session(key, wire.Pattern.XK)
        if session is not None and session.address is not None:
            return str(session.address[0])[:64]
        pm = self.peer.path(key)
        primary = pm.primary if pm is not None else None
        if isinstance(primary, ViaRelay):
            return f"relay:{primary.relay}"[:64]
        return "unknown"

    async def _counters(self) -> None:
        while True:
            await asyncio.sleep(self.counter_interval)
            now = asyncio.get_running_loop().time()
            for key, link in list(self.links.items()):
                session = self.peer.session(key)
                age = session.keys_age(now) if session is not None else None
                if age is not None:
                    link.last_handshake = datetime.fromtimestamp(time.time() - age, UTC)
                if link.kind == "offline" or not link.moved():
                    continue
                link.mark_reported()
                await sync_to_async(report_path)(key, link)

    # --- packets ------------------------------------------------------------------------------

    def _from_device(self, event: PacketReceived) -> None:
        packet = event.packet
        if not packet_source_ok(packet, self.allowed.addresses.get(event.peer_key)):
            self.stats["spoofed"] += 1
            return
        link = self.links.get(event.peer_key)
        if link is not None:
            link.rx_bytes += len(packet)
        if self.tun is not None:
            self.tun.write(packet)

    def _from_tun(self, packet: bytes) -> None:
        destination = packet_destination(packet)
        key = self.allowed.key_for(destination) if destination is not None else None
        if key is None or self.driver is None:
            self.stats["no_route"] += 1
            return
        if self.driver.send_packet(key, packet):
            link = self.links.get(key)
            if link is not None:
                link.tx_bytes += len(packet)


async def run(stop: asyncio.Event | None = None, **overrides: Any) -> None:
    """The process: start, wait for SIGTERM/SIGINT (or ``stop``), close cleanly."""
    loop = asyncio.get_running_loop()
    handlers: list[signal.Signals] = []
    if stop is None:
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
            handlers.append(signum)
    daemon = Transportd.from_settings(**overrides)
    try:
        await daemon.start()
        await stop.wait()
        log.info("transportd stopping")
    finally:
        await daemon.close()
        for signum in handlers:
            loop.remove_signal_handler(signum)
