"""Devices, the pairing codes that admit them, and the timeline of their tunnel paths."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone

from lazycat.core.models import BoxNetcheck, key_fingerprint
from transport.explain import BOX_PORT, NatFacts, Reason, explain_relay


class DeviceStatus(models.TextChoices):
    PENDING = "pending", "Pending approval"
    APPROVED = "approved", "Approved"
    REJECTED = "rejected", "Rejected"
    REVOKED = "revoked", "Revoked"
    EXPIRED = "expired", "Approval expired"


class PathKind(models.TextChoices):
    """How the tunnel to a device currently flows. The tunnel daemon reports these."""

    OFFLINE = "offline", "offline"
    RELAY = "relay", "relay"
    DIRECT_V6 = "direct-v6", "direct-v6"
    DIRECT_V4 = "direct-v4", "direct-v4"
    DIRECT_PORTMAPPED = "direct-portmapped", "direct (port-mapped)"
    LAN = "lan", "LAN"

    @property
    def colour(self) -> str:
        """The status dot: blue is direct (any kind), yellow is relayed, grey is offline."""
        if self is PathKind.OFFLINE:
            return "grey"
        if self is PathKind.RELAY:
            return "yellow"
        return "blue"

    @property
    def is_direct(self) -> bool:
        return self.colour == "blue"


class DeviceQuerySet(models.QuerySet["Device"]):
    def pending(self) -> DeviceQuerySet:
        return self.filter(status=DeviceStatus.PENDING).order_by("requested_at")

    def listed(self) -> DeviceQuerySet:
        """Everything the device list shows: approved first, then the rest, newest first."""
        return self.exclude(status=DeviceStatus.PENDING).order_by("status", "name", "pk")


class Device(models.Model):
    name = models.CharField(max_length=100)
    # The DNS label: <label>.<box>.heiyu.space. Unique across devices and services.
    label = models.CharField(max_length=63, unique=True, null=True, blank=True)
    os = models.CharField(max_length=64, blank=True)
    model = models.CharField(max_length=100, blank=True)
    client_version = models.CharField(max_length=32, blank=True)
    public_key = models.BinaryField(max_length=32, unique=True)
    status = models.CharField(
        max_length=16, choices=DeviceStatus.choices, default=DeviceStatus.PENDING, db_index=True
    )
    requested_at = models.DateTimeField(default=timezone.now)
    source = models.CharField(max_length=64, blank=True, help_text="Where the request came from.")
    via_code = models.BooleanField(default=True, help_text="The request carried a valid code.")
    decided_at = models.DateTimeField(null=True, blank=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decision_note = models.CharField(max_length=500, blank=True)
    approval_expires_at = models.DateTimeField(null=True, blank=True)
    overlay_address = models.GenericIPAddressField(protocol="IPv6", unique=True, null=True)

    # Live tunnel state, written by do_report_path. Kept on the row (not a separate table) so
    # the device list is one query.
    path = models.CharField(max_length=20, choices=PathKind.choices, default=PathKind.OFFLINE)
    endpoint = models.CharField(max_length=64, blank=True)
    relay = models.CharField(max_length=64, blank=True)
    rtt_ms = models.FloatField(null=True, blank=True)
    rx_bytes = models.BigIntegerField(default=0)
    tx_bytes = models.BigIntegerField(default=0)
    last_handshake = models.DateTimeField(null=True, blank=True)
    connected_since = models.DateTimeField(null=True, blank=True)
    path_cause = models.CharField(max_length=200, blank=True)

    # The device's own netcheck (NetcheckReport.to_json()), as it last reported it, and its NAT
    # type copied out for lists. None / "": never reported. Written by do_record_device_netcheck.
    netcheck = models.JSONField(null=True, blank=True)
    nat_type = models.CharField(max_length=16, blank=True)
    netcheck_at = models.DateTimeField(null=True, blank=True)

    objects = DeviceQuerySet.as_manager()

    class Meta:
        ordering = ["name", "pk"]

    def __str__(self) -> str:
        return self.name

    @property
    def key(self) -> bytes:
        return bytes(self.public_key)

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.key)

    @property
    def path_kind(self) -> PathKind:
        return PathKind(self.path)

    @property
    def path_label(self) -> str:
        if self.path == PathKind.RELAY and self.relay:
            return f"relay {self.relay}"
        return str(self.path_kind.label)

    def relay_reasons(self, box_check: BoxNetcheck | None) -> list[Reason]:
        """Why this device is relayed, from the box's latest netcheck and the device's own;
        [] unless it is on the relay now (or when nothing measured explains it)."""
        if self.path != PathKind.RELAY:
            return []
        box = box_check.nat_facts() if box_check is not None else NatFacts.not_measured()
        # The tunnel's UDP port, for "forward UDP port N to the box".
        listen = getattr(settings, "LAZYCAT_TUNNEL_LISTEN", ("", BOX_PORT))
        return explain_relay(box, NatFacts.from_report(self.netcheck), box_port=listen[1])

    @property
    def is_approved(self) -> bool:
        return self.status == DeviceStatus.APPROVED

    def audit_state(self) -> dict[str, object]:
        """The fields the audit log records before and after a decision."""
        return {
            "name": self.name,
            "status": self.status,
            "label": self.label,
            "overlay_address": self.overlay_address,
            "approval_expires_at": (
                self.approval_expires_at.isoformat() if self.approval_expires_at else None
            ),
            "note": self.decision_note,
        }


class PairingCode(models.Model):
    """A one-time pairing secret. Only its SHA-256 is stored: a 128-bit random secret needs no
    slow hash, and a leaked database row must not let anyone pair."""

    secret_hash = models.BinaryField(max_length=32, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(db_index=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    used_at = models.DateTimeField(null=True, blank=True)
    used_by = models.ForeignKey(
        Device, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    cancelled = models.BooleanField(default=False)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"pairing code #{self.pk}"

    @staticmethod
    def hash_secret(secret: bytes) -> bytes:
        return hashlib.sha256(b"lazycat pairing secret\x00" + secret).digest()

    def is_usable(self, now: datetime | None = None) -> bool:
        now = now or timezone.now()
        return not self.used_at and not self.cancelled and self.expires_at > now


class PathEvent(models.Model):
    """One change of a device's path, with its cause: the device page's timeline."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="path_events")
    at = models.DateTimeField(default=timezone.now)
    path = models.CharField(max_length=20, choices=PathKind.choices)
    endpoint = models.CharField(max_length=64, blank=True)
    relay = models.CharField(max_length=64, blank=True)
    cause = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-at", "-pk"]
        indexes = [models.Index(fields=["device", "at"])]

    def __str__(self) -> str:
        return f"{self.device_id} {self.path} at {self.at:%H:%M:%S}"

    @property
    def path_kind(self) -> PathKind:
        return PathKind(self.path)


def direct_share(device: Device, now: datetime, window: timedelta) -> float | None:
    """Fraction of `window` (ending now) the device spent on a direct path, or None if it was
    never seen in the window. Offline time counts as neither: the share is of connected time."""
    start = now - window
    events = list(
        device.path_events.filter(at__gte=start).order_by("at", "pk").values_list("at", "path")
    )
    before = (
        device.path_events.filter(at__lt=start)
        .order_by("-at", "-pk")
        .values_list("path", flat=True)
    ).first()
    timeline = [(start, before)] if before else []
    timeline += events
    if not timeline:
        return None
    direct = connected = 0.0
    for (at, path), nxt in zip(timeline, [*timeline[1:], (now, None)], strict=True):
        span = (nxt[0] - at).total_seconds()
        if path is None or path == PathKind.OFFLINE:
            continue
        connected += span
        if PathKind(path).is_direct:
            direct += span
    return direct / connected if connected > 0 else None
