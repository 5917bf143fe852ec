"""The box's one namespace, shared by devices and services: DNS labels under <box>.heiyu.space
and addresses in the box's /64. Allocation checks both kinds before handing one out."""

from __future__ import annotations

from ipaddress import IPv6Address

from lazycat.devices.models import Device
from lazycat.services.models import Service


def taken_addresses() -> set[IPv6Address]:
    rows = [
        *Device.objects.exclude(overlay_address=None).values_list("overlay_address", flat=True),
        *Service.objects.values_list("overlay_address", flat=True),
    ]
    return {IPv6Address(a) for a in rows}


def taken_labels(exclude_device: Device | None = None) -> set[str]:
    devices = Device.objects.exclude(label=None)
    if exclude_device is not None:
        devices = devices.exclude(pk=exclude_device.pk)
    labels = {label for label in devices.values_list("label", flat=True) if label}
    return labels | set(Service.objects.values_list("name", flat=True))
