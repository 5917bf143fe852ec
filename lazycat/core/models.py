"""The box itself (one row) and the audit log every decision lands in."""

from __future__ import annotations

import base64
import hashlib
from ipaddress import IPv6Address, IPv6Network
from typing import Any

from django.conf import settings
from django.db import models

from transport import addressing, names
from transport.explain import NatFacts, describe_nat


def key_fingerprint(public_key: bytes) -> str:
    """A short, stable, human-comparable fingerprint of a public key (never the key itself).

    SHA-256 of the key, first 80 bits in base32, grouped by four: enough to compare by eye on
    two screens, too short to be mistaken for the key.
    """
    digest = hashlib.sha256(public_key).digest()[:10]
    text = base64.b32encode(digest).decode().rstrip("=").lower()
    return "-".join(text[i : i + 4] for i in range(0, len(text), 4))


class Box(models.Model):
    """The single box this installation is. Created by the setup page; there is never a second."""

    name = models.CharField(max_length=63, unique=True)
    public_key = models.BinaryField(max_length=32)
    accept_without_code = models.BooleanField(
        default=False,
        help_text="Record pairing requests that carry no valid code as pending (off by default).",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "box"

    def __str__(self) -> str:
        return self.fqdn

    @classmethod
    def get(cls) -> Box | None:
        return cls.objects.order_by("pk").first()

    @property
    def key(self) -> bytes:
        return bytes(self.public_key)

    @property
    def fqdn(self) -> str:
        return names.box_fqdn(self.name)

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.key)

    @property
    def prefix(self) -> IPv6Network:
        return addressing.box_prefix(self.key)

    @property
    def address(self) -> IPv6Address:
        return addressing.box_address(self.prefix)


class AuditEvent(models.Model):
    """Who did what, when, to what, and how it looked before and after. Append-only."""

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    # Kept beside the FK so the log still reads right after a user is deleted, and so devices
    # and the system can act too ("device alice-phone", "system").
    actor_label = models.CharField(max_length=150)
    action = models.CharField(max_length=64, db_index=True)
    target_type = models.CharField(max_length=32, blank=True)
    target_id = models.CharField(max_length=64, blank=True)
    target_label = models.CharField(max_length=200, blank=True)
    source = models.CharField(max_length=64, blank=True, help_text="Where the request came from.")
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    detail = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["-at", "-pk"]
        indexes = [models.Index(fields=["target_type", "target_id"])]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor_label} {self.action} {self.target_label}"

    @property
    def changes(self) -> list[tuple[str, Any, Any]]:
        """(field, before, after) for every field that differs, for the audit page."""
        before, after = self.before or {}, self.after or {}
        keys = sorted(set(before) | set(after))
        return [(k, before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)]


class BoxNetcheckQuerySet(models.QuerySet["BoxNetcheck"]):
    def latest_run(self) -> BoxNetcheck | None:
        """The newest run (one indexed query, whatever the history's length)."""
        return self.order_by("-at", "-pk").first()


class BoxNetcheck(models.Model):
    """One run of the box's own network check (transport.netcheck), newest kept a while.

    The columns the console shows are copied out of the report so that the dashboard reads
    one row; the whole report stays in `report` for debugging.
    """

    at = models.DateTimeField(db_index=True)
    report = models.JSONField(help_text="NetcheckReport.to_json()")
    nat_type = models.CharField(max_length=16)
    udp = models.BooleanField(default=True)
    ipv6 = models.BooleanField(default=False)
    reflexive = models.CharField(max_length=64, blank=True)
    # "ip:port" the box's router forwards to the box (PCP / NAT-PMP / UPnP). The tunnel daemon
    # fills it once it holds a mapping; "": no mapping known.
    port_mapping = models.CharField(max_length=64, blank=True)
    # [{"name": ..., "rtt_ms": float | None}], in the order the relays are configured.
    relay_latencies = models.JSONField(default=list)
    summary = models.TextField(blank=True)

    objects = BoxNetcheckQuerySet.as_manager()

    class Meta:
        ordering = ["-at", "-pk"]
        verbose_name = "box network check"

    def __str__(self) -> str:
        return f"netcheck {self.at:%Y-%m-%d %H:%M:%S} {self.nat_type}"

    @property
    def nat_description(self) -> str:
        return describe_nat(self.nat_type)

    def nat_facts(self) -> NatFacts:
        return NatFacts.from_report(self.report, port_mapping=bool(self.port_mapping))
