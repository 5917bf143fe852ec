"""Readiness checks: each returns None when healthy or a short reason when not."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection

CHECK_TIMEOUT = 2.0


def database() -> str | None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:
        return f"database: {exc.__class__.__name__}: {exc}"
    return None


def redis() -> str | None:
    import redis as redis_lib

    try:
        client = redis_lib.Redis.from_url(
            settings.REDIS_URL, socket_timeout=CHECK_TIMEOUT, socket_connect_timeout=1
        )
        client.ping()
        client.close()
    except Exception as exc:
        return f"redis: {exc.__class__.__name__}: {exc}"
    return None


def channel_layer() -> str | None:
    """A message to ourselves through the layer: proves the layer, not just the server."""
    layer = get_channel_layer()
    if layer is None:
        return "channel layer: not configured"

    async def roundtrip() -> bool:
        channel = await layer.new_channel("readyz.")
        token = uuid.uuid4().hex
        await layer.send(channel, {"type": "readyz", "token": token})
        message = await asyncio.wait_for(layer.receive(channel), CHECK_TIMEOUT)
        return bool(message.get("token") == token)

    try:
        ok = async_to_sync(roundtrip)()
    except Exception as exc:
        return f"channel layer: {exc.__class__.__name__}: {exc}"
    return None if ok else "channel layer: the message came back wrong"


def celery() -> str | None:
    from lazycat.celery import app

    try:
        replies = app.control.ping(timeout=1.0)
    except Exception as exc:
        return f"celery: {exc.__class__.__name__}: {exc}"
    return None if replies else "celery: no worker answered a ping within 1 s"


CHECKS: dict[str, Callable[[], str | None]] = {
    "database": database,
    "redis": redis,
    "channel_layer": channel_layer,
    "celery": celery,
}


def run_all() -> dict[str, dict[str, object]]:
    results: dict[str, dict[str, object]] = {}
    for name, check in CHECKS.items():
        started = time.monotonic()
        problem = check()
        results[name] = {
            "ok": problem is None,
            "ms": round((time.monotonic() - started) * 1000, 1),
            **({"error": problem} if problem else {}),
        }
    return results
