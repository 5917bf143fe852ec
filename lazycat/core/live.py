"""Live updates: the channel-layer groups and the messages that travel through them.

Three kinds of group, one per audience:

``CONSOLE_GROUP``  every open console page (the browser socket, ``ConsoleConsumer``).
    ``{"type": "console.fragment", "html": "<…hx-swap-oob…>"}`` — rendered once by the sender,
    swapped into every page by htmx's ws extension (out-of-band swaps by element id).

``TRANSPORTD_GROUP``  the box's tunnel daemon (transportd, ``lazycat/tunnel``), which acts on them:
    ``{"type": "device.changed", "public_key": "<base64>", "status": "...", "address": "..."}``
    ``{"type": "service.changed", "uid": "...", "deleted": bool}``
    ``{"type": "punch.start", "public_key": "<base64>", "candidates": [...], "delay": s}``

``device-<id>``  one approved device's control socket, open inside the tunnel
    (``DeviceControlConsumer``): ``{"type": "control.send", "message": {...}}`` is sent to the
    device as it is; ``{"type": "control.close"}`` closes the socket (revoked, expired).

Writes publish only after their transaction commits (``transaction.on_commit``), so a listener
never sees a state the database then rolls back. The reverse direction — the daemon reporting a
device's path — is a service function, ``lazycat.devices.actions.do_report_path``.
"""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

log = logging.getLogger(__name__)

CONSOLE_GROUP = "console"
TRANSPORTD_GROUP = "transportd"


def _group_send(group: str, message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:  # pragma: no cover - settings always configure one
        return
    try:
        async_to_sync(layer.group_send)(group, message)
    except Exception:
        # A missed push must not undo a committed decision; pages resynchronise on reconnect.
        log.exception("live update to %s failed", group)


def send_to_consoles(html: str) -> None:
    _group_send(CONSOLE_GROUP, {"type": "console.fragment", "html": html})


def send_to_transportd(message: dict[str, Any]) -> None:
    _group_send(TRANSPORTD_GROUP, message)


def device_group(device_id: int) -> str:
    """The group of one device's control socket (``DeviceControlConsumer``)."""
    return f"device-{device_id}"


def send_to_device(device_id: int, message: dict[str, Any]) -> None:
    _group_send(device_group(device_id), message)


def after_commit(func: Any, *args: Any) -> None:
    """Run func(*args) once the current transaction commits (at once outside a transaction)."""
    transaction.on_commit(lambda: func(*args), robust=True)
