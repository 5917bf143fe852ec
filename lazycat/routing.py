"""WebSocket routes (the ASGI stack in lazycat.asgi wraps them in auth and origin checks)."""

from django.urls import path

from lazycat.devices.consumers import ConsoleConsumer

websocket_urlpatterns = [
    path("ws/console/", ConsoleConsumer.as_asgi()),
]
