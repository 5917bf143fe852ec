"""Which devices are using each service right now, as the tunnel daemon sees it.

transportd knows the open flows through its forwarding; whenever the set changes (at most about
once a second) it calls :func:`report_usage` from one of its threads with the whole picture::

    {"<service overlay address>": ["<device overlay address>", ...], ...}

The picture lives in the Django cache (Redis, shared by every process) under ``USAGE_KEY``,
not in the database: it is a live view, rebuilt by the daemon, not history. The daemon should
report ``{}`` when it starts, so a picture left by a previous run does not linger. Each call
pushes the rows of the services whose set of devices changed to every open console.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from ipaddress import ip_address

from django.core.cache import cache

from lazycat.devices.models import Device
from lazycat.services import push
from lazycat.services.models import Service

log = logging.getLogger(__name__)

USAGE_KEY = "services:usage"

Usage = dict[str, list[str]]


def _canonical(address: str) -> str | None:
    try:
        return str(ip_address(address))
    except ValueError:
        log.warning("usage report names %r, which is not an address; ignored", address)
        return None


def _normalise(usage: Mapping[str, Iterable[str]]) -> Usage:
    clean: Usage = {}
    for service, devices in usage.items():
        key = _canonical(service)
        users = sorted({a for a in (_canonical(d) for d in devices) if a is not None})
        if key is not None and users:
            clean[key] = users
    return clean


def current_usage() -> Usage:
    """The last picture reported: service address → sorted device addresses (no empty lists)."""
    found = cache.get(USAGE_KEY)
    return found if isinstance(found, dict) else {}


def report_usage(usage: Mapping[str, Iterable[str]]) -> None:
    """Record which devices use which service and update the rows that changed, live.

    Called by transportd from a thread (no event loop), so it is plain synchronous code."""
    new = _normalise(usage)
    old = current_usage()
    cache.set(USAGE_KEY, new, timeout=None)
    changed = {
        address for address in new.keys() | old.keys() if new.get(address) != old.get(address)
    }
    if not changed:
        return
    ids = list(Service.objects.filter(overlay_address__in=changed).values_list("pk", flat=True))
    if ids:
        push.services_changed(ids)


def device_names(usage: Usage) -> dict[str, str]:
    """Device address → the device's name, for every device in `usage` (one query)."""
    addresses = {a for devices in usage.values() for a in devices}
    if not addresses:
        return {}
    rows = Device.objects.filter(overlay_address__in=addresses).values_list(
        "overlay_address", "name"
    )
    return {str(address): name for address, name in rows}


def annotate_usage(services: Iterable[Service]) -> None:
    """Set ``service.in_use_by`` (device names, sorted) on each service, for the templates.
    An address that is no known device (revoked and deleted since) is shown as the address."""
    usage = current_usage()
    names = device_names(usage)
    for service in services:
        users = usage.get(str(service.overlay_address), [])
        service.in_use_by = tuple(sorted(names.get(a, a) for a in users))
