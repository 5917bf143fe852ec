"""The device control socket: a WebSocket each connected device opens *inside the tunnel*, to
``ws://[<box overlay address>]:<LAZYCAT_CONTROL_PORT>/control/`` (``docs/negotiation.md``).

Authentication is the tunnel itself, never anything the device says:

- the connection must have arrived at the box's overlay address, which only the TUN ``lzc0``
  holds (``scope["server"]``);
- its source must be an approved device's overlay address. transportd writes a device's packet
  to the TUN only when its source is the address bound to *that device's* Noise session
  (``packet_source_ok``), and the box's replies to that address are routed into that device's
  session — so a TCP connection from a device address can only be completed by that device.
  A host on the LAN forging the source never sees the SYN-ACK.

Messages are JSON (``transport/negotiation.py``); each is rate limited per socket, since a
device could otherwise make the box run negotiations in a loop.
"""

from __future__ import annotations

import json
import logging
import time
from ipaddress import IPv6Address, ip_address
from typing import Any

from asgiref.sync import sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from lazycat.core.live import device_group
from lazycat.core.models import Box
from lazycat.devices.models import Device, DeviceStatus
from transport import addressing
from transport import negotiation as neg
from transport.ratelimit import TokenBucket

log = logging.getLogger(__name__)

CLOSE_NOT_A_DEVICE = 4403  # not from an approved device through the tunnel
CLOSE_REVOKED = 4410  # the device was revoked or its approval expired
RATE, BURST = 2.0, 10  # control messages per second a device may send, and its burst


def _host(address: Any) -> IPv6Address | None:
    if not address:
        return None
    try:
        parsed = ip_address(str(address[0]).split("%", 1)[0])
    except (ValueError, IndexError, TypeError):
        return None
    if parsed.version == 4:
        return None
    if parsed.ipv4_mapped is not None:
        return None
    return parsed


def authenticate(server: Any, client: Any) -> Device | None:
    """The approved device a connection from ``client`` to ``server`` came from, or None."""
    box = Box.get()
    here, there = _host(server), _host(client)
    if box is None or here is None or there is None:
        return None
    if here != addressing.box_address(addressing.box_prefix(box.key)):
        return None
    return Device.objects.filter(status=DeviceStatus.APPROVED, overlay_address=str(there)).first()


class DeviceControlConsumer(AsyncWebsocketConsumer):
    """One connected device. Joins ``device-<id>``; hands hellos to the negotiation."""

    device_id: int | None = None

    async def connect(self) -> None:
        scope = self.scope
        device = await sync_to_async(authenticate)(scope.get("server"), scope.get("client"))
        if device is None:
            log.warning(
                "control socket refused: not an approved device through the tunnel",
                extra={"client": str((self.scope.get("client") or ["?"])[0])[:64]},
            )
            await self.close(code=CLOSE_NOT_A_DEVICE)
            return
        self.device_id = device.pk
        self.bucket = TokenBucket(RATE, BURST, time.monotonic())
        await self.channel_layer.group_add(device_group(device.pk), self.channel_name)
        await self.accept()
        log.info("control socket open", extra={"device": device.pk})

    async def disconnect(self, code: int) -> None:
        if self.device_id is not None:
            await self.channel_layer.group_discard(device_group(self.device_id), self.channel_name)
            log.info("control socket closed", extra={"device": self.device_id, "code": code})

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.device_id is None:
            return
        if not self.bucket.take(time.monotonic()):
            await self._send({"type": "error", "error": "too many messages: slow down"})
            return
        raw = text_data if text_data is not None else (bytes_data or b"").decode(errors="replace")
        try:
            if len(raw) > neg.MAX_MESSAGE:
                raise neg.NegotiationError(f"a control message is at most {neg.MAX_MESSAGE} bytes")
            try:
                data = json.loads(raw)
            except ValueError:
                raise neg.NegotiationError("not JSON") from None
            message = neg.parse_client_message(data)
        except neg.NegotiationError as exc:
            await self._send({"type": "error", "error": str(exc)})
            return
        await sync_to_async(handle)(self.device_id, message)

    # --- from the channel layer ----------------------------------------------------------------

    async def control_send(self, event: dict[str, Any]) -> None:
        await self._send(event["message"])

    async def control_close(self, event: dict[str, Any]) -> None:
        await self.close(code=CLOSE_REVOKED)

    async def _send(self, message: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(message, separators=(",", ":")))


def handle(device_id: int, message: neg.ClientMessage) -> None:
    """Act on one message of an authenticated device (sync: the database and Celery)."""
    from lazycat.devices import actions, negotiation, tasks

    device = Device.objects.filter(pk=device_id, status=DeviceStatus.APPROVED).first()
    if device is None:
        return
    if isinstance(message, neg.Hello):
        generation = negotiation.do_record_candidates(device, message)
        if generation is not None:
            tasks.negotiate.delay(device_id, generation)
    elif isinstance(message, neg.NetcheckMessage):
        try:
            actions.do_record_device_netcheck(device, message.report)
        except actions.NetcheckRejected as exc:
            log.info("netcheck report refused", extra={"device": device_id, "error": str(exc)})
