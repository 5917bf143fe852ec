"""The browser socket: every open console page listens here for rendered fragments."""

from __future__ import annotations

from typing import Any

from channels.generic.websocket import AsyncWebsocketConsumer
from django.template.loader import render_to_string

from lazycat.core.live import CONSOLE_GROUP
from lazycat.devices.models import Device

# WebSocket close codes in the private range (4000-4999): the page shows "sign in again".
CLOSE_UNAUTHENTICATED = 4401


class ConsoleConsumer(AsyncWebsocketConsumer):
    """Joins CONSOLE_GROUP and forwards each fragment as it is. Origin checking happens in
    the ASGI stack (AllowedHostsOriginValidator); here, only signed-in users are let in."""

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        await self.channel_layer.group_add(CONSOLE_GROUP, self.channel_name)
        await self.accept()
        # A page that was offline for a moment may have missed an approval request.
        await self.send(text_data=await self._inbox())

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(CONSOLE_GROUP, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """The console never sends anything that needs an answer; ignore it."""

    async def console_fragment(self, event: dict[str, Any]) -> None:
        await self.send(text_data=event["html"])

    @staticmethod
    async def _inbox() -> str:
        from asgiref.sync import sync_to_async

        def render() -> str:
            pending = list(Device.objects.pending())
            return render_to_string("devices/_inbox.html", {"pending": pending, "oob": True})

        return await sync_to_async(render)()
