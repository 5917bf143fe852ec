"""Shared fixtures: a real Redis for the whole run, users, the set-up box."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from django.conf import settings

from lazycat.embedded_redis import EmbeddedRedis


@pytest.fixture(scope="session", autouse=True)
def redis_server() -> Iterator[None]:
    """The packaged redis-server on a unix socket in the test data directory: the channel
    layer, the cache and the Celery broker in the tests are the real thing."""
    if not settings.REDIS_EMBEDDED:
        yield  # REDIS_URL names a server the caller runs
        return
    server = EmbeddedRedis(settings.REDIS_SOCKET, settings.DATA_DIR)
    server.start()
    try:
        yield
    finally:
        server.stop()
        if settings.DATA_DIR.name.startswith("lazycat-test-"):
            shutil.rmtree(settings.DATA_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _clear_cache(redis_server: None) -> Iterator[None]:
    """Rate-limit windows and other cache state must not leak between tests."""
    from django.core.cache import cache

    cache.clear()
    yield


@pytest.fixture
def box(db: None):  # type: ignore[no-untyped-def]
    from lazycat.core.actions import do_setup_box

    return do_setup_box("home", "owner", "correct horse battery")


@pytest.fixture
def owner(box):  # type: ignore[no-untyped-def]
    from django.contrib.auth import get_user_model

    return get_user_model().objects.get(username="owner")


@pytest.fixture
def owner_client(client, owner):  # type: ignore[no-untyped-def]
    client.force_login(owner)
    return client
