"""What the box exposes to approved devices: store apps, developer apps and developer VMs."""

from __future__ import annotations

import uuid
from datetime import timedelta

from django.db import models
from django.utils import timezone

from lazycat.devices.models import Device
from transport.ports import PortPolicy


class ServiceKind(models.TextChoices):
    STORE_APP = "store-app", "Store app"
    DEV_APP = "dev-app", "Developer app"
    VM = "vm", "Developer VM"


class CheckState(models.TextChoices):
    """The last reachability check (lazycat.services.reachability); "" until the first one."""

    NEVER = "", "not checked"
    CHECKING = "checking", "checking…"
    OK = "ok", "reachable"
    PROBLEM = "problem", "problem"
    UNCONFIRMED = "unconfirmed", "unconfirmed"


# A check that has not reported after this long is shown as stuck (is the Celery worker up?).
CHECK_STUCK_AFTER = timedelta(seconds=60)


class Service(models.Model):
    # A stable id chosen at creation: the overlay address derives from it, so renaming a
    # service keeps its address (docs/addressing.md).
    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    kind = models.CharField(max_length=16, choices=ServiceKind.choices)
    # The DNS label: <name>.<box>.heiyu.space. Shares a namespace with device labels.
    name = models.CharField(max_length=63, unique=True)
    target = models.GenericIPAddressField(help_text="IPv4 or IPv6 address on the box's LAN.")
    # Canonical text of the port policy (transport.ports); parsed with PortPolicy.parse.
    ports = models.CharField(max_length=1000, default="all")
    exclude_ports = models.CharField(max_length=1000, blank=True)
    access_all = models.BooleanField(
        default=True, help_text="Every approved device may reach it; otherwise only those chosen."
    )
    allowed_devices = models.ManyToManyField(Device, blank=True, related_name="services")
    overlay_address = models.GenericIPAddressField(protocol="IPv6", unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    # The last reachability check: kept on the row so the list page stays one query. Written
    # with queryset updates (lazycat.services.actions), never through save(), so a check does
    # not count as an edit (updated_at) and cannot overwrite a concurrent edit.
    check_state = models.CharField(
        max_length=16, choices=CheckState.choices, default=CheckState.NEVER, blank=True
    )
    check_summary = models.CharField(max_length=500, blank=True)
    check_details = models.JSONField(default=dict, blank=True)
    check_started_at = models.DateTimeField(null=True, blank=True)
    checked_at = models.DateTimeField(null=True, blank=True)

    # Device names using it right now, set by lazycat.services.live.annotate_usage for display.
    in_use_by: tuple[str, ...] = ()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def check_stuck(self) -> bool:
        """Still "checking" long after it started: the result will not come on its own."""
        return (
            self.check_state == CheckState.CHECKING
            and self.check_started_at is not None
            and timezone.now() - self.check_started_at > CHECK_STUCK_AFTER
        )

    @property
    def check_subject(self) -> str:
        """What should be running at the target, for the check's advice."""
        return "the VM" if self.kind == ServiceKind.VM else "the app"

    @property
    def policy(self) -> PortPolicy:
        return PortPolicy.parse(self.ports, self.exclude_ports)

    def audit_state(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "name": self.name,
            "target": self.target,
            "ports": self.ports,
            "exclude_ports": self.exclude_ports,
            "access_all": self.access_all,
            "allowed_devices": sorted(d.label or d.name for d in self.allowed_devices.all())
            if self.pk
            else [],
            "overlay_address": self.overlay_address,
        }
