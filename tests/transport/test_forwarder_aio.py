"""The userspace forwarder on its own terms: UDP flow lifetime and bounds, half-close, resets
from update(), usage() and a port it cannot take. It only works behind TPROXY, so these tests
run in the namespaces of test_exposure_linux.py (same helpers, a lab of this module's own), with
the kernel side set up by KernelExposure and a Forwarder built here with short timeouts."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Iterator

import pytest

from tests.transport.test_exposure_linux import (
    D1,
    D2,
    S4,
    T4,
    banner,
    echo_once,
    lab,  # noqa: F401 (the module-scoped fixture: namespaces and echo servers)
    netns,
    svc,
    tcp_from,
    udp_from,
)
from transport import forwarder_aio
from transport.exposure import ExposureError
from transport.exposure_linux import KernelExposure
from transport.forwarder_aio import Forwarder, _State

pytestmark = pytest.mark.natlab
PORT = 7481


def wait_for(check: object, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def fwd(lab: None) -> Iterator[tuple[KernelExposure, Forwarder]]:  # noqa: F811
    with netns("box"):
        forwarder = Forwarder(PORT, udp_idle=0.3, max_udp_flows=2)
        k = KernelExposure(tproxy_port=PORT, forwarder=forwarder)
        try:
            k.apply([svc(S4, T4, {D1, D2})])
            yield k, forwarder
        finally:
            k.close()


def test_a_port_in_use_is_a_clear_error(lab: None) -> None:  # noqa: F811
    with netns("box"):
        taken = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            taken.bind(("::", PORT))
            taken.listen()
            forwarder = Forwarder(PORT)
            with pytest.raises(ExposureError, match=f"cannot listen on \\[::\\]:{PORT}"):
                forwarder.start()
            assert not forwarder.running
            with pytest.raises(ExposureError, match="not running"):
                forwarder.usage()
        finally:
            taken.close()


def test_idle_udp_flows_are_closed(fwd: tuple[KernelExposure, Forwarder]) -> None:
    _k, forwarder = fwd
    with udp_from(D1, S4, 7) as sock:
        sock.send(b"ping")
        assert sock.recv(1000).endswith(b"ping")
        assert forwarder.usage() == {S4: {D1}}
        assert wait_for(lambda: forwarder.usage() == {})  # udp_idle is 0.3 s here
        assert forwarder.stats()["udp_flows"] == 0
        sock.send(b"back")  # a later datagram opens a new flow
        assert sock.recv(1000).endswith(b"back")
    assert forwarder.stats()["udp_flows_opened"] == 2


def test_udp_flows_are_bounded_and_the_oldest_goes(fwd: tuple[KernelExposure, Forwarder]) -> None:
    _k, forwarder = fwd
    socks = [udp_from(D1, S4, 7), udp_from(D2, S4, 7), udp_from(D1, S4, 7)]
    try:
        for i, sock in enumerate(socks):
            sock.send(b"%d" % i)
            assert sock.recv(1000).endswith(b"%d" % i)
        stats = forwarder.stats()
        assert stats["udp_flows"] == 2 and stats["udp_evicted"] == 1
    finally:
        for sock in socks:
            sock.close()


def test_update_resets_revoked_connections_even_if_the_kernel_still_lets_them_in(
    fwd: tuple[KernelExposure, Forwarder],
) -> None:
    _k, forwarder = fwd
    with tcp_from(D1, S4, 22) as one, tcp_from(D2, S4, 22) as two:
        banner(one), banner(two)
        assert forwarder.usage() == {S4: {D1, D2}}
        forwarder.update([svc(S4, T4, {D2})])  # the forwarder alone; nftables unchanged
        one.settimeout(1.0)
        with pytest.raises(ConnectionResetError):
            one.recv(100)  # a RST, without the device sending anything
        assert echo_once(two, b"ok") == b"ok"
        assert forwarder.usage() == {S4: {D2}}
        assert forwarder.stats()["tcp_reset_by_update"] == 1
        # A new connection of the revoked device is accepted by TPROXY and reset at once.
        with pytest.raises(ConnectionResetError), tcp_from(D1, S4, 22) as again:
            again.recv(100)
        assert forwarder.stats()["tcp_denied"] == 1


def test_half_close_passes_through(fwd: tuple[KernelExposure, Forwarder]) -> None:
    with tcp_from(D1, S4, 7) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)  # FIN to the target; our direction back stays open
        got = b""
        while chunk := sock.recv(1000):
            got += chunk
        assert got == b"port 7 from 10.77.0.1\nlast words"


def test_flows_of_the_kernel_exposure_include_the_forwarders(
    fwd: tuple[KernelExposure, Forwarder],
) -> None:
    k, _forwarder = fwd
    with tcp_from(D2, S4, 7) as sock:
        banner(sock)
        assert k.flows() == {S4: {D2}}
    assert wait_for(lambda: k.flows() == {})


def test_close_resets_open_connections(lab: None) -> None:  # noqa: F811
    with netns("box"):
        k = KernelExposure(tproxy_port=PORT)
        k.apply([svc(S4, T4, {D1})])
        try:
            sock = tcp_from(D1, S4, 22)
            banner(sock)
        finally:
            k.close()
    with sock, pytest.raises(ConnectionResetError):
        sock.settimeout(1.0)
        sock.recv(100)


class FlakyLoop(asyncio.SelectorEventLoop):
    """An event loop whose accept() fails with the given errors (as Linux accept(2) can, passing
    a new connection's network error through), then finds the listener closed."""

    def __init__(self, errors: list[OSError]) -> None:
        super().__init__()
        self.errors = errors
        self.calls = 0

    async def sock_accept(self, sock: socket.socket) -> tuple[socket.socket, object]:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        sock.close()  # the forwarder is stopping
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))


def test_the_accept_loop_outlives_any_accept_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forwarder_aio, "ACCEPT_BACKOFF", 0.01)
    codes = (errno.ENETDOWN, errno.EPROTO, errno.EHOSTUNREACH, errno.ECONNABORTED, errno.EMFILE)
    loop = FlakyLoop([OSError(code, os.strerror(code)) for code in codes])
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        state = _State(loop, connect_timeout=1.0, udp_idle=1.0, max_udp_flows=1)
        # It returns (the listener is closed) instead of dying on the first odd errno.
        loop.run_until_complete(asyncio.wait_for(state.accept_loop(listener), 5.0))
    finally:
        listener.close()
        loop.close()
    assert loop.calls == len(codes) + 1 and not loop.errors


def test_a_stuck_loop_is_an_exposure_error(
    fwd: tuple[KernelExposure, Forwarder], monkeypatch: pytest.MonkeyPatch
) -> None:
    _k, forwarder = fwd
    monkeypatch.setattr(forwarder_aio, "CALL_TIMEOUT", 0.1)
    assert forwarder._loop is not None
    forwarder._loop.call_soon_threadsafe(time.sleep, 0.5)  # something hogs the loop
    with pytest.raises(ExposureError, match="did not answer"):
        forwarder.usage()
    monkeypatch.undo()
    assert forwarder.usage() == {}  # and it answers again once the loop is free
