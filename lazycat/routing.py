"""WebSocket routes. lazycat.asgi wraps the console's in auth and origin checks; the control
port's consumer authenticates devices by the tunnel itself (lazycat.devices.control)."""

from django.urls import path

from lazycat.devices.consumers import ConsoleConsumer
from lazycat.devices.control import DeviceControlConsumer

websocket_urlpatterns = [
    path("ws/console/", ConsoleConsumer.as_asgi()),
]

control_urlpatterns = [
    path("control/", DeviceControlConsumer.as_asgi()),
]
