from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest


@pytest.fixture
def udp4() -> Iterator[socket.socket]:
    """A non-blocking UDP socket on 127.0.0.1, closed after the test."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()
