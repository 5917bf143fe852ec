"""A real channel-layer member of a group, for tests that check what a write publishes."""

from __future__ import annotations

import asyncio
from typing import Any

from asgiref.sync import async_to_sync
from channels import DEFAULT_CHANNEL_LAYER
from channels.layers import channel_layers


class Listener:
    """Joins `group` on the real (Redis) channel layer; `messages()` drains what arrived.

    Make a new Listener before each write you check: the layer's receive buffer belongs to one
    event loop, and each async_to_sync call runs a new one. Each Listener has a layer instance
    of its own (same Redis, same settings) rather than the process-wide one: channels_redis
    ties a layer's receive state to the loop that last received, so a receive another test left
    pending on the shared instance could break this one's."""

    def __init__(self, group: str) -> None:
        self.layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
        self.channel = async_to_sync(self.layer.new_channel)()
        async_to_sync(self.layer.group_add)(group, self.channel)

    def messages(self, timeout: float = 1.0) -> list[dict[str, Any]]:
        async def drain() -> list[dict[str, Any]]:
            got, wait = [], timeout
            while True:
                try:
                    got.append(await asyncio.wait_for(self.layer.receive(self.channel), wait))
                except TimeoutError:
                    return got
                wait = 0.2  # after the first message, only wait for stragglers

        return async_to_sync(drain)()
