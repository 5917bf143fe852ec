"""The browser socket: who may connect, and what reaches an open console."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.sessions.backends.db import SessionStore

from lazycat.devices import actions
from lazycat.devices.actions import DeviceFacts
from lazycat.devices.consumers import CLOSE_UNAUTHENTICATED
from lazycat.routing import websocket_urlpatterns

pytestmark = pytest.mark.django_db(transaction=True)

APP = AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)))


@sync_to_async
def session_cookie_for(username: str) -> bytes:
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY

    user = get_user_model().objects.get(username=username)
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.save()
    return f"{settings.SESSION_COOKIE_NAME}={session.session_key}".encode()


def communicator(
    cookie: bytes | None, origin: bytes = b"http://localhost"
) -> WebsocketCommunicator:
    headers = [(b"origin", origin), (b"host", b"localhost")]
    if cookie:
        headers.append((b"cookie", cookie))
    return WebsocketCommunicator(APP, "/ws/console/", headers=headers)


async def test_anonymous_socket_is_refused(box):
    comm = communicator(None)
    connected, code = await comm.connect(timeout=10)
    assert not connected
    assert code == CLOSE_UNAUTHENTICATED
    await comm.disconnect()


async def test_cross_origin_socket_is_refused(box):
    cookie = await session_cookie_for("owner")
    comm = communicator(cookie, origin=b"http://evil.example")
    connected, _ = await comm.connect(timeout=10)
    assert not connected
    await comm.disconnect()


async def test_signed_in_console_gets_inbox_then_live_pending_device(box, owner):
    cookie = await session_cookie_for("owner")
    comm = communicator(cookie)
    connected, _ = await comm.connect(timeout=10)
    assert connected
    first = await comm.receive_from(timeout=10)
    assert 'id="approval-inbox"' in first and "request-" not in first

    def pair() -> None:
        _, bundle = actions.do_create_pairing_code(box, owner)
        outcome = actions.do_request_pairing(
            bundle.secret, b"\x05" * 32, DeviceFacts(name="Tablet", os="iPadOS"), "198.51.100.9"
        )
        assert outcome.accepted

    await sync_to_async(pair)()
    pushed = await comm.receive_from(timeout=10)
    assert 'hx-swap-oob="true"' in pushed and "Tablet" in pushed and "198.51.100.9" in pushed
    await comm.disconnect()
