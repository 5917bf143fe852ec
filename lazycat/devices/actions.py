"""Every write to devices and pairing codes.

Each ``do_*`` function owns its transaction, writes the audit log, and publishes live updates
(to open consoles and to the tunnel daemon) only after the transaction commits.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import secrets
import socket
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from django.conf import settings
from django.contrib.auth.models import User
from django.core.cache import cache
from django.db import transaction
from django.utils import timezone

from lazycat import overlay
from lazycat.core import audit, keys
from lazycat.core.live import after_commit, send_to_device, send_to_transportd
from lazycat.core.models import Box
from lazycat.devices import push
from lazycat.devices.models import Device, DeviceStatus, PairingCode, PathEvent, PathKind
from transport import addressing, names, wire
from transport.bundle import PairingBundle
from transport.tickets import PAIRING_TICKET_MAX_LIFETIME

log = logging.getLogger(__name__)

SECRET_BYTES = 16  # 128 bits: a code that can be brute-forced by no one, online or off


class DecisionError(Exception):
    """A decision that does not apply to the device's current state."""


# --- pairing codes ------------------------------------------------------------------------------


def do_create_pairing_code(box: Box, by: User) -> tuple[PairingCode, PairingBundle]:
    """A new one-time code. The secret is returned once, in the bundle, and stored only hashed."""
    secret = secrets.token_bytes(SECRET_BYTES)
    expires_at = timezone.now() + timedelta(seconds=settings.LAZYCAT_PAIRING_TTL)
    with transaction.atomic():
        code = PairingCode.objects.create(
            secret_hash=PairingCode.hash_secret(secret), expires_at=expires_at, created_by=by
        )
        audit.record(
            "pairing.code_created",
            actor=by,
            target=code,
            after={"expires_at": expires_at.isoformat()},
        )
    return code, PairingBundle(
        box=box.name,
        box_key=box.key,
        relays=settings.LAZYCAT_RELAYS,
        secret=secret,
        expires_at=int(expires_at.timestamp()),
        ticket=_pairing_ticket(box, expires_at),
        lan=box_lan_addresses(),
    )


def box_lan_addresses() -> tuple[tuple[str, int], ...]:
    """Where devices on the box's own network reach the tunnel: the address of
    LAZYCAT_TUNNEL_LISTEN when it names one, else the address this host would use to reach the
    internet (a UDP ``connect()`` to 6.6.6.6, which sends nothing), with the tunnel's port.
    None when that is a loopback address (no other device could use it) or there is no route."""
    host, port = settings.LAZYCAT_TUNNEL_LISTEN
    try:
        bound = ipaddress.ip_address(host)
    except ValueError:
        return ()
    if bound.is_unspecified:  # every interface ([::] takes IPv4 too): the LAN's IPv4 address
        found = _egress_ipv4()
        if found is None:
            return ()
        bound = found
    if bound.is_loopback or bound.is_link_local or bound.is_unspecified:
        return ()
    return ((str(bound), port),)


def _egress_ipv4() -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("6.6.6.6", 53))  # a UDP connect() only picks a route: nothing is sent
            return ipaddress.ip_address(probe.getsockname()[0])
        except OSError:
            return None


def _pairing_ticket(box: Box, code_expires_at: datetime) -> bytes:
    """A ticket letting any device reach the box through its relays until the code expires,
    capped at the hour a pairing ticket may live (it is readable by anyone who sees the code)."""
    now = int(time.time())
    expires = min(int(code_expires_at.timestamp()), now + PAIRING_TICKET_MAX_LIFETIME)
    ticket_key = keys.load_or_create_ticket_key(settings.LAZYCAT_TICKET_KEY_FILE)
    return ticket_key.issue(wire.peer_id(box.key), wire.ANY_CLIENT, expires, now_wall=now).encode()


DEVICE_TICKET_LIFETIME = 30 * 86400  # renewed at every connection; a lost device's lapses


def device_ticket(box: Box, device: Device, now: int | None = None) -> bytes:
    """A ticket letting this device (and no other) reach the box through its relays: sent
    at approval and on every connection, so a device that comes back within 30 days never
    needs its pairing ticket again. It ends with the approval if that expires sooner."""
    now = int(time.time()) if now is None else now
    expires = now + DEVICE_TICKET_LIFETIME
    if device.approval_expires_at is not None:
        expires = min(expires, int(device.approval_expires_at.timestamp()))
    ticket_key = keys.load_or_create_ticket_key(settings.LAZYCAT_TICKET_KEY_FILE)
    return ticket_key.issue(
        wire.peer_id(box.key), wire.peer_id(device.key), max(expires, now + 1), now_wall=now
    ).encode()


def box_records(box: Box, device: Device) -> dict[str, list[str]]:
    """The names the box tells ``device`` (``docs/addressing.md``): the box itself, every
    approved device with a label, and the services ``device`` may reach — a service it may not
    reach is not even named to it."""
    from django.db.models import Q

    from lazycat.services.models import Service

    box_address = addressing.box_address(addressing.box_prefix(box.key))
    records = {names.box_fqdn(box.name): [str(box_address)]}
    approved = Device.objects.filter(status=DeviceStatus.APPROVED, overlay_address__isnull=False)
    for label, address in approved.exclude(label=None).values_list("label", "overlay_address"):
        records[names.host_fqdn(str(label), box.name)] = [str(ipaddress.IPv6Address(address))]
    reachable = Service.objects.filter(Q(access_all=True) | Q(allowed_devices=device)).distinct()
    for name, address in reachable.values_list("name", "overlay_address"):
        records[names.host_fqdn(name, box.name)] = [str(ipaddress.IPv6Address(address))]
    return records


def device_config(device: Device) -> dict[str, object]:
    """The ``config`` control message for an approved device: names and a fresh ticket."""
    from transport import negotiation

    box = Box.get()
    if box is None or device.status != DeviceStatus.APPROVED:
        raise DecisionError("only an approved device of a set-up box gets a configuration")
    return negotiation.config_message(
        negotiation.Config(
            box_records(box, device), device_ticket(box, device), settings.LAZYCAT_CONTROL_PORT
        )
    )


def do_cancel_pairing_code(code: PairingCode, by: User) -> None:
    with transaction.atomic():
        if not code.is_usable():
            return
        code.cancelled = True
        code.save(update_fields=["cancelled"])
        audit.record("pairing.code_cancelled", actor=by, target=code)


def do_expire_pairing_codes(now: datetime | None = None) -> int:
    """Drop codes that can no longer be used: a day after they expired (the audit log keeps
    the history; the row only exists to be matched while it is valid)."""
    now = now or timezone.now()
    deleted, _ = PairingCode.objects.filter(expires_at__lt=now - timedelta(days=1)).delete()
    return deleted


# --- pairing requests ---------------------------------------------------------------------------


class Refusal(StrEnum):
    """Why a pairing request was refused. The value is what the client shows its user."""

    RATE_LIMITED = "too many pairing attempts from this address; wait a minute and try again"
    NO_CODE = "this box only accepts devices with a pairing code; ask the owner for one"
    UNKNOWN_CODE = "this pairing code is not known to the box; ask the owner for a new one"
    EXPIRED_CODE = "this pairing code has expired; ask the owner for a new one"
    USED_CODE = "this pairing code was already used; ask the owner for a new one"
    BAD_KEY = "the device key is not a valid X25519 public key"
    BAD_FACTS = "the device information is not valid"
    NOT_SET_UP = "the box is not set up yet"
    ALREADY_APPROVED = "this device is already approved"


@dataclass(frozen=True)
class DeviceFacts:
    """What a device says about itself when it asks to pair. Untrusted input."""

    name: str
    os: str = ""
    model: str = ""
    client_version: str = ""

    LIMITS = {"name": 100, "os": 64, "model": 100, "client_version": 32}

    def cleaned(self) -> DeviceFacts:
        """Printable, trimmed, length-limited copies; raises ValueError naming the bad field."""
        out = {}
        for field, limit in self.LIMITS.items():
            raw = getattr(self, field)
            if not isinstance(raw, str):
                raise ValueError(f"{field} must be text")
            text = "".join(c for c in raw if unicodedata.category(c)[0] != "C").strip()
            if len(text) > limit:
                raise ValueError(f"{field} is longer than {limit} characters")
            out[field] = text
        if not out["name"]:
            raise ValueError("name is empty")
        return DeviceFacts(**out)


@dataclass(frozen=True)
class PairingOutcome:
    device: Device | None
    refusal: Refusal | None = None
    detail: str = ""

    @property
    def accepted(self) -> bool:
        return self.refusal is None


def _rate_limited(source: str) -> bool:
    """A fixed one-minute window per source address, counted in the shared cache (Redis), so
    every process that accepts pairing requests shares one budget."""
    key = f"pairing-rate:{source}:{int(timezone.now().timestamp()) // 60}"
    cache.add(key, 0, timeout=120)
    try:
        return cache.incr(key) > settings.LAZYCAT_PAIRING_RATE
    except ValueError:  # the key expired between add and incr: count this as the first
        cache.set(key, 1, timeout=120)
        return False


def _valid_public_key(key: bytes) -> bool:
    # X25519 accepts any 32 bytes, but the all-zero and other low-order points give a shared
    # secret of zero; refusing the all-zero key catches the common "empty key" bug.
    return isinstance(key, bytes) and len(key) == 32 and key != bytes(32)


def do_request_pairing(
    secret: bytes | None, public_key: bytes, facts: DeviceFacts, source: str
) -> PairingOutcome:
    """A device asks to pair. The tunnel calls this once the pairing handshake has proven the
    device holds `public_key`. Records a pending device, or refuses with a reason; audits both."""

    def refuse(reason: Refusal, detail: str = "") -> PairingOutcome:
        audit.record(
            "pairing.refused",
            actor_label=f"device {facts.name[:40]!r}" if isinstance(facts.name, str) else "device",
            source=source,
            detail=f"{reason.name}: {detail}" if detail else reason.name,
        )
        log.info("pairing refused", extra={"reason": reason.name, "source": source})
        return PairingOutcome(None, reason, detail)

    if _rate_limited(source):
        # Not audited row by row: a flood must not become a flood of rows. One row per window.
        if cache.add(f"pairing-rate-logged:{source}", 1, timeout=60):
            return refuse(Refusal.RATE_LIMITED)
        return PairingOutcome(None, Refusal.RATE_LIMITED)
    box = Box.get()
    if box is None:
        return refuse(Refusal.NOT_SET_UP)
    if not _valid_public_key(public_key):
        return refuse(Refusal.BAD_KEY)
    try:
        facts = facts.cleaned()
    except ValueError as exc:
        return refuse(Refusal.BAD_FACTS, str(exc))

    with transaction.atomic():
        code: PairingCode | None = None
        if secret is not None:
            code = (
                PairingCode.objects.select_for_update()
                .filter(secret_hash=PairingCode.hash_secret(secret))
                .first()
            )
            if code is None:
                refusal: Refusal | None = Refusal.UNKNOWN_CODE
            elif code.used_at or code.cancelled:
                refusal = Refusal.USED_CODE
            elif code.expires_at <= timezone.now():
                refusal = Refusal.EXPIRED_CODE
            else:
                refusal = None
            if refusal is not None and not box.accept_without_code:
                return refuse(refusal)
            if refusal is not None:
                code = None  # recorded as a request without a (valid) code
        elif not box.accept_without_code:
            return refuse(Refusal.NO_CODE)

        device = Device.objects.select_for_update().filter(public_key=public_key).first()
        if device is not None and device.status == DeviceStatus.APPROVED:
            return refuse(Refusal.ALREADY_APPROVED)
        before = device.audit_state() if device else None
        if device is None:
            device = Device(public_key=public_key)
        device.name, device.os, device.model = facts.name, facts.os, facts.model
        device.client_version = facts.client_version
        device.status = DeviceStatus.PENDING
        device.requested_at = timezone.now()
        device.source = source[:64]
        device.via_code = code is not None
        device.decided_at = device.decided_by = None
        device.decision_note = ""
        device.save()
        if code is not None:
            code.used_at = timezone.now()
            code.used_by = device
            code.save(update_fields=["used_at", "used_by"])
        audit.record(
            "device.requested",
            actor_label=f"device {device.fingerprint}",
            target=device,
            before=before,
            after=device.audit_state()
            | {"os": device.os, "model": device.model, "via_code": device.via_code},
            source=source,
        )
        after_commit(push.inbox_changed)
    log.info("pairing requested", extra={"device": device.pk, "source": source})
    return PairingOutcome(device)


# --- decisions ----------------------------------------------------------------------------------


def _notify_transportd(device: Device) -> None:
    send_to_transportd(
        {
            "type": "device.changed",
            "public_key": base64.b64encode(device.key).decode(),
            "status": device.status,
            "address": device.overlay_address,
        }
    )
    if device.status != DeviceStatus.APPROVED:
        # transportd closes its session; the control socket would only notice at its timeout
        send_to_device(device.pk, {"type": "control.close"})


def _decide(
    device: Device,
    by: User,
    action: str,
    allowed_from: set[str],
    apply: Callable[[Device], None],
    joins_list: bool = False,
) -> Device:
    """Common frame of every decision: lock, check the state, apply, audit, publish."""
    with transaction.atomic():
        locked = Device.objects.select_for_update().get(pk=device.pk)
        if locked.status not in allowed_from:
            raise DecisionError(
                f"{locked.name} is {locked.get_status_display().lower()}, so it cannot be {action}."
            )
        before = locked.audit_state()
        apply(locked)
        locked.decided_at = timezone.now()
        locked.decided_by = by
        locked.save()
        audit.record(
            f"device.{action}", actor=by, target=locked, before=before, after=locked.audit_state()
        )
        after_commit(push.device_changed, locked.pk, joins_list)
        after_commit(_notify_transportd, locked)
    log.info(f"device {action}", extra={"device": locked.pk, "by": by.get_username()})
    return locked


def do_approve_device(device: Device, by: User, expires_at: datetime | None = None) -> Device:
    """Approve a pending device: give it a DNS label and its overlay address, tell the tunnel."""
    if expires_at is not None and expires_at <= timezone.now():
        raise DecisionError("The approval expiry must be in the future.")
    box = Box.get()
    if box is None:
        raise DecisionError("The box is not set up.")

    def apply(d: Device) -> None:
        d.status = DeviceStatus.APPROVED
        d.approval_expires_at = expires_at
        d.decision_note = ""
        if not d.label:
            d.label = names.unique_label(names.label_from_text(d.name), overlay.taken_labels(d))
        if not d.overlay_address:
            d.overlay_address = str(
                addressing.device_address(box.key, d.key, taken=overlay.taken_addresses())
            )

    device = _decide(device, by, "approved", {DeviceStatus.PENDING}, apply, joins_list=True)
    after_commit(push.inbox_changed)
    return device


def do_reject_device(device: Device, by: User, note: str = "") -> Device:
    def apply(d: Device) -> None:
        d.status = DeviceStatus.REJECTED
        d.decision_note = note[:500]

    device = _decide(device, by, "rejected", {DeviceStatus.PENDING}, apply)
    after_commit(push.inbox_changed)
    return device


def do_revoke_device(device: Device, by: User, note: str = "") -> Device:
    """Withdraw an approval: the tunnel ends the device's session at once. The device keeps its
    address and label so a later re-approval gives it the same ones."""

    def apply(d: Device) -> None:
        d.status = DeviceStatus.REVOKED
        d.decision_note = note[:500]

    return _decide(device, by, "revoked", {DeviceStatus.APPROVED, DeviceStatus.EXPIRED}, apply)


def do_rename_device(device: Device, by: User, name: str) -> Device:
    """A new display name, and a new DNS label derived from it."""
    try:
        cleaned = DeviceFacts(name=name).cleaned().name
    except ValueError as exc:
        raise DecisionError(f"The name is not valid: {exc}.") from None

    def apply(d: Device) -> None:
        d.name = cleaned
        if d.label:
            d.label = names.unique_label(names.label_from_text(cleaned), overlay.taken_labels(d))

    every_state = {s.value for s in DeviceStatus}
    return _decide(device, by, "renamed", every_state, apply)


def do_expire_approvals(now: datetime | None = None) -> int:
    """Approvals with an expiry that has passed end like a revocation (periodic job)."""
    now = now or timezone.now()
    count = 0
    for device in Device.objects.filter(status=DeviceStatus.APPROVED, approval_expires_at__lte=now):
        with transaction.atomic():
            before = device.audit_state()
            device.status = DeviceStatus.EXPIRED
            device.save(update_fields=["status"])
            audit.record("device.expired", target=device, before=before, after=device.audit_state())
            after_commit(push.device_changed, device.pk)
            after_commit(_notify_transportd, device)
        count += 1
    return count


# --- what the tunnel reports --------------------------------------------------------------------


@dataclass(frozen=True)
class PathReport:
    """The tunnel daemon's report of one device's path. See docs/live-state.md.

    `path` is a PathKind value; `endpoint` the peer's address:port on that path ("" when
    relayed or offline); `relay` the relay's name when relayed; counters are totals since the
    session started; `cause` says why the path changed ("punched", "direct path silent", …).
    """

    path: PathKind
    endpoint: str = ""
    relay: str = ""
    rtt_ms: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_handshake: datetime | None = None
    cause: str = ""


def do_report_path(public_key: bytes, report: PathReport) -> Device | None:
    """Record what the tunnel says about a device and push it to every console.

    A change of path kind, endpoint or relay appends to the device's timeline; a report that
    only moves the counters updates the row. Reports about unknown or unapproved devices are
    ignored (returns None): the tunnel may be a moment behind a revocation.
    """
    path = PathKind(report.path)
    now = timezone.now()
    with transaction.atomic():
        device = (
            Device.objects.select_for_update()
            .filter(public_key=public_key, status=DeviceStatus.APPROVED)
            .first()
        )
        if device is None:
            return None
        changed = (device.path, device.endpoint, device.relay) != (
            path,
            report.endpoint,
            report.relay,
        )
        was_offline = device.path == PathKind.OFFLINE
        device.path, device.endpoint, device.relay = path, report.endpoint, report.relay
        device.rtt_ms = report.rtt_ms
        device.rx_bytes, device.tx_bytes = report.rx_bytes, report.tx_bytes
        if report.last_handshake:
            device.last_handshake = report.last_handshake
        if path == PathKind.OFFLINE:
            device.connected_since = None
        elif was_offline:
            device.connected_since = now
        if changed:
            device.path_cause = report.cause[:200]
            PathEvent.objects.create(
                device=device,
                at=now,
                path=path,
                endpoint=report.endpoint,
                relay=report.relay,
                cause=report.cause[:200],
            )
        device.save()
        after_commit(push.device_changed, device.pk)
    return device


def do_mark_stale_devices_offline(now: datetime | None = None) -> int:
    """Devices the tunnel has not heard from for LAZYCAT_OFFLINE_AFTER go grey (periodic job):
    the safety net for a daemon that died before it could report."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.LAZYCAT_OFFLINE_AFTER)
    stale = Device.objects.exclude(path=PathKind.OFFLINE).filter(last_handshake__lt=cutoff)
    count = 0
    for device in stale:
        do_report_path(
            device.key,
            PathReport(
                path=PathKind.OFFLINE,
                rx_bytes=device.rx_bytes,
                tx_bytes=device.tx_bytes,
                cause=f"no handshake for {settings.LAZYCAT_OFFLINE_AFTER} s",
            ),
        )
        count += 1
    return count


# --- the device's own network check --------------------------------------------------------------

NETCHECK_MAX_BYTES = 64 * 1024  # a real report is a few KiB; a device must not fill the database


class NetcheckRejected(ValueError):
    """A device's netcheck report that is not a JSON object of sane size."""


def do_record_device_netcheck(device: Device, report_json: dict[str, object]) -> Device:
    """Store the netcheck report a device sent (``NetcheckReport.to_json()``) and its NAT type,
    then push its state panel: the relay reasons on the device page are computed from it.

    The report comes from the device, so it is only checked to be a JSON object of bounded
    size; what it says is read defensively (``transport.explain.NatFacts.from_report``)."""
    import json

    from transport.explain import NatFacts

    if not isinstance(report_json, dict):
        raise NetcheckRejected("a netcheck report is a JSON object")
    try:
        size = len(json.dumps(report_json, allow_nan=False).encode())
    except (TypeError, ValueError) as exc:
        raise NetcheckRejected(f"not plain JSON: {exc}") from None
    if size > NETCHECK_MAX_BYTES:
        raise NetcheckRejected(f"report of {size} bytes; at most {NETCHECK_MAX_BYTES}")
    facts = NatFacts.from_report(report_json)
    with transaction.atomic():
        device.netcheck = report_json
        device.nat_type = str(facts.nat_type)
        device.netcheck_at = timezone.now()
        device.save(update_fields=["netcheck", "nat_type", "netcheck_at"])
        after_commit(push.device_changed, device.pk)
    return device
