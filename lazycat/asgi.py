"""The ASGI application Daphne serves.

Two endpoints, one process: the console (LAZYCAT_LISTEN) gets Django for HTTP and the browser
socket; the device control port (LAZYCAT_CONTROL_PORT) gets only the device control socket
(``lazycat.devices.control``), so nothing of the console is reachable there.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lazycat.settings")

# Initialise Django (apps, models) before importing anything that imports consumers or models.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from lazycat.routing import control_urlpatterns, websocket_urlpatterns  # noqa: E402

console = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # Browsers send Origin on WebSocket upgrades and no CSRF token: checking the origin
        # against ALLOWED_HOSTS is what stops another site from opening the console socket.
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)


async def not_found(scope, receive, send):
    """Plain HTTP on the control port: there is nothing to see."""
    await send(
        {
            "type": "http.response.start",
            "status": 404,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": b"lazycat device control port\n"})


async def no_browsers(scope, receive, send):
    """A browser page on a paired device must not speak for the device: browsers always send
    Origin on a WebSocket upgrade, lazycat-client never does."""
    if any(name == b"origin" for name, _ in scope.get("headers", ())):
        await send({"type": "websocket.close", "code": 4403})
        return
    await control_router(scope, receive, send)


control_router = URLRouter(control_urlpatterns)
control = ProtocolTypeRouter({"http": not_found, "websocket": no_browsers})


async def application(scope, receive, send):
    server = scope.get("server")
    port = settings.LAZYCAT_CONTROL_PORT
    if port and server and len(server) > 1 and server[1] == port:
        return await control(scope, receive, send)
    return await console(scope, receive, send)
