"""Rendered fragments about the box itself, pushed to every open console after a change commits.

Same pattern as ``lazycat.devices.push``: the partial the page includes, marked
``hx-swap-oob``, rendered once per change.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.template.loader import render_to_string

from lazycat.core.live import send_to_consoles
from lazycat.core.models import BoxNetcheck


def netcheck_context() -> dict[str, Any]:
    """What the dashboard's network card shows: the latest run only (one query)."""
    return {"netcheck": BoxNetcheck.objects.latest_run(), "relays": settings.LAZYCAT_RELAYS}


def netcheck_changed() -> None:
    """The dashboard card, then the state panel of every relayed device: their reasons are
    computed from the box's latest run."""
    from lazycat.devices import push as device_push
    from lazycat.devices.models import Device, DeviceStatus, PathKind

    send_to_consoles(render_to_string("core/_netcheck.html", {**netcheck_context(), "oob": True}))
    relayed = Device.objects.filter(status=DeviceStatus.APPROVED, path=PathKind.RELAY)
    for pk in relayed.values_list("pk", flat=True):
        device_push.device_changed(pk)
