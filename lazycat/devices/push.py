"""Rendered fragments pushed to every open console after a change commits.

Each fragment is the same partial template the page itself includes, marked ``hx-swap-oob`` so
htmx's ws extension swaps it in by element id. A fragment is rendered once per change, not once
per browser.
"""

from __future__ import annotations

from datetime import timedelta

from django.template.loader import render_to_string
from django.utils import timezone

from lazycat.core.live import send_to_consoles
from lazycat.core.models import Box, BoxNetcheck
from lazycat.devices.models import Device, direct_share

TIMELINE_LENGTH = 50


def inbox_changed() -> None:
    pending = list(Device.objects.pending())
    send_to_consoles(render_to_string("devices/_inbox.html", {"pending": pending, "oob": True}))


def device_changed(device_id: int, fresh: bool = False) -> None:
    """The device's list row, its state panel and its timeline: whichever the page shows.

    `fresh` marks a device that has just joined the list (approved): a list page that does not
    show it yet appends its row (static/js/console.js); other rows are only ever replaced."""
    device = Device.objects.filter(pk=device_id).first()
    if device is None:
        return
    box = Box.get()
    context = {
        "device": device,
        "box_fqdn": box.fqdn if box else "",
        "events": device.path_events.all()[:TIMELINE_LENGTH],
        "direct_share": direct_share(device, timezone.now(), timedelta(hours=24)),
        "relay_reasons": device.relay_reasons(BoxNetcheck.objects.latest_run()),
        "oob": True,
        "fresh": fresh,
    }
    send_to_consoles(render_to_string("devices/_push.html", context))
