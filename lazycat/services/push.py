"""Rendered fragments about services, pushed to every open console.

The same partials the pages include (``services/_row.html`` on the list, ``services/_check.html``
on the edit page), marked ``hx-swap-oob`` so htmx's ws extension swaps them in by element id.
One fragment per change, however many services and browsers.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.template.loader import render_to_string

from lazycat.core.live import send_to_consoles
from lazycat.core.models import Box
from lazycat.services.models import Service


def services_changed(service_ids: Iterable[int], fresh: bool = False) -> None:
    """The list rows and edit-page check panels of these services.

    `fresh` marks a service that has just been created: a list page that does not show it yet
    appends its row (static/js/services.js); other rows are only ever replaced."""
    from lazycat.services.live import annotate_usage

    services = list(
        Service.objects.filter(pk__in=list(service_ids)).prefetch_related("allowed_devices")
    )
    if not services:
        return
    annotate_usage(services)
    box = Box.get()
    html = render_to_string(
        "services/_push.html",
        {"services": services, "box": box, "oob": True, "fresh": fresh},
    )
    send_to_consoles(html)


def service_removed(service_id: int) -> None:
    send_to_consoles(render_to_string("services/_removed.html", {"service_id": service_id}))
