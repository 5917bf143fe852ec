"""A private network namespace that ``lazycat-client up --mode proxy`` owns, so the kernel carries
the overlay's TCP without touching the host's routes, interfaces, addresses or DNS.

Why a namespace: proxy mode must coexist with whatever else owns the host's network (another VPN,
a corporate resolver). Putting the TUN, the overlay address and the ``fc03:1136:3800::/40`` route
in a namespace of their own gives the proxy a complete kernel TCP/IP stack for the overlay that
no other program on the host sees, and the host sees nothing of it.

How (Linux ``unshare(2)``, ``setns(2)``, ``network_namespaces(7)``)::

    host netns (unchanged)                           private netns (anonymous, ours alone)
    ----------------------------------------------   ---------------------------------------------
    event loop thread: relays, UDP, the proxy's      the netns thread: unshare(CLONE_NEWNET), then
    listener on 127.0.0.1:31085, TUN fd reader ──fd──▶ lo up, TUN lzc0 + overlay address + /40 route
    upstream sockets (made in the netns thread,      sockets are made here (socket(2) takes the
    used here: a socket keeps its netns for life)    calling *thread's* netns) and handed over

- Namespace membership is per thread: ``unshare(CLONE_NEWNET)`` in one thread moves that thread
  alone. It is allowed in a multi-threaded process (unlike ``CLONE_NEWUSER``), needs
  ``CAP_SYS_ADMIN``, and leaves the event loop thread where it was.
- Everything that must be *in* the namespace happens in that thread: opening ``/dev/net/tun``
  (the device is created in the opener's netns), pyroute2's netlink socket, ``socket(2)``. File
  descriptors are process-wide, so the TUN fd and those sockets are then used from the loop.
- ``/proc/thread-self/ns/net`` is opened once (``ns_fd``): it names the namespace (its inode, as
  ``lsns`` shows it), keeps it alive independently of the thread, and lets another thread join it
  with ``setns(fd, CLONE_NEWNET)`` (:meth:`PrivateNetns.enter`) if ever needed.
- The namespace has no name under ``/run/netns`` and nothing on the host points at it: when the
  thread ends and every fd referring to it (``ns_fd``, the TUN, sockets) is closed, the kernel
  frees it and deletes its interfaces. A crash cannot leave it behind.

Privileges: ``CAP_SYS_ADMIN`` for ``unshare(CLONE_NEWNET)`` and ``CAP_NET_ADMIN`` (in the new
namespace: root has it) for the TUN; :class:`NetnsError` says so in words.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import errno
import os
import queue
import socket
import threading
from collections.abc import Callable
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from transport.tun import Tun

__all__ = ["CLONE_NEWNET", "NetnsError", "PrivateNetns"]

CLONE_NEWNET = 0x40000000  # linux/sched.h
START_TIMEOUT = 10.0  # seconds for the thread to make the namespace and bring lo up

T = TypeVar("T")

_Job = tuple[Callable[[], Any], "concurrent.futures.Future[Any]"]


class NetnsError(OSError):
    """The private namespace cannot be made or used; the message says what to do."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _privileges(exc: OSError, what: str) -> NetnsError:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return NetnsError(
            exc.errno,
            f"{what}: proxy mode makes a private network namespace for its TUN, which needs "
            "root, or CAP_SYS_ADMIN and CAP_NET_ADMIN (run it with sudo; in a container, add "
            "those capabilities and allow unshare in its seccomp profile). Nothing on the "
            f"host's network changes. ({exc.strerror or exc})",
        )
    return NetnsError(exc.errno, f"{what}: {exc.strerror or exc}")


def _unshare_net() -> None:
    libc = _libc()
    if libc.unshare(CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise _privileges(OSError(code, os.strerror(code)), "unshare(CLONE_NEWNET)")


def _prepare() -> None:
    """In the new namespace: ``lo`` up (a listener on ::1 inside works) and IPv6 on.

    A new namespace starts with IPv6 enabled unless ``net.core.devconf_inherit_init_net``
    copies the host's ``disable_ipv6``; these sysctls are the namespace's own (``/proc/sys/net``
    follows the calling thread's netns), so turning it on here changes nothing on the host."""
    from pyroute2 import IPRoute

    for conf in ("all", "default"):
        path = Path(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6")
        with contextlib.suppress(OSError):
            if path.read_text().strip() != "0":
                path.write_text("0\n")
    with IPRoute() as ipr:
        [lo] = ipr.link_lookup(ifname="lo")
        ipr.link("set", index=lo, state="up")


class PrivateNetns:
    """An anonymous network namespace held by one dedicated thread.

    :meth:`create` starts the thread (which unshares) and returns once the namespace is ready;
    :meth:`call` / :meth:`run` run a function in it; :meth:`socket_in`, :meth:`open_tun` and
    :meth:`dial` are the uses the client has; :meth:`close` ends the thread and closes ``ns_fd``.
    """

    def __init__(self) -> None:
        self.ns_fd = -1
        self.inode = 0
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="lazycat-netns", daemon=True)

    @classmethod
    def create(cls, *, timeout: float = START_TIMEOUT) -> PrivateNetns:
        """Make the namespace (blocking, a few ms). Raises NetnsError."""
        netns = cls()
        netns._thread.start()
        if not netns._ready.wait(timeout):
            netns.close()
            raise NetnsError(errno.ETIMEDOUT, "the private network namespace did not start")
        if netns._error is not None:
            netns._thread.join(timeout)
            error = netns._error
            if isinstance(error, NetnsError):
                raise error
            if isinstance(error, OSError):
                raise _privileges(error, "preparing the private network namespace") from error
            raise NetnsError(errno.EIO, f"preparing the private network namespace: {error}")
        return netns

    def _main(self) -> None:
        try:
            _unshare_net()
            self.ns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            self.inode = os.fstat(self.ns_fd).st_ino
            _prepare()
        except BaseException as exc:  # reported to create(); the thread ends
            self._error = exc
            if self.ns_fd >= 0:
                os.close(self.ns_fd)
                self.ns_fd = -1
            self._ready.set()
            return
        self._ready.set()
        while (job := self._jobs.get()) is not None:
            function, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function())
            except BaseException as exc:
                future.set_exception(exc)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.ns_fd >= 0

    # --- running code in the namespace ------------------------------------------------------

    def submit(self, function: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``function`` in the namespace's thread; its future."""
        if not self.alive:
            raise NetnsError(errno.ESRCH, "the private network namespace is closed")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((function, future))
        return future

    def call(self, function: Callable[[], T], timeout: float | None = START_TIMEOUT) -> T:
        """Run ``function`` in the namespace and wait for its result (blocking)."""
        return self.submit(function).result(timeout)

    async def run(self, function: Callable[[], T]) -> T:
        """Run ``function`` in the namespace without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(function))

    def socket_in(
        self, family: int = socket.AF_INET6, type: int = socket.SOCK_STREAM, proto: int = 0
    ) -> socket.socket:
        """A new socket in the namespace (blocking: one round trip to the thread, ~0.1 ms)."""
        return self.call(lambda: socket.socket(family, type, proto))

    async def dial(self, address: str | IPv6Address, port: int) -> socket.socket:
        """A TCP connection from inside the namespace to ``[address]:port``: a non-blocking,
        connected socket. Raises OSError (refused, unreachable); bound it with a timeout."""
        loop = asyncio.get_running_loop()
        sock = await self.run(lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM))
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, (str(address), port))
        except BaseException:  # refused, unreachable, or cancelled by the caller's timeout
            sock.close()
            raise
        return sock

    def open_tun(
        self,
        name: str,
        addresses: list[IPv6Address],
        *,
        routes: list[IPv6Network] | None = None,
    ) -> Tun:
        """Make TUN ``name`` inside the namespace and configure it there (``Tun.configure``:
        MTU, up, ``addresses`` as /128s, ``routes``, by default the overlay). Blocking.
        Raises TunError."""
        from transport.tun import Tun

        def make() -> Tun:
            tun = Tun.open(name)
            try:
                tun.configure(addresses, routes=routes)
            except BaseException:
                tun.close()
                raise
            return tun

        return self.call(make)

    def enter(self) -> None:
        """Move the *calling* thread into the namespace (``setns``). For a thread of one's own,
        never the event loop's: it cannot come back without a handle on its old namespace."""
        if _libc().setns(self.ns_fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise _privileges(OSError(code, os.strerror(code)), "setns")

    # --- the end --------------------------------------------------------------------------------

    def close(self, timeout: float = START_TIMEOUT) -> None:
        """End the thread and close ``ns_fd``. The namespace is freed once the TUN and the
        sockets made in it are closed too (close those first, or with it)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout)
        while True:  # jobs submitted too late: their callers hear it, never hang
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[1].cancel()
        if self.ns_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.ns_fd)
            self.ns_fd = -1

    def __enter__(self) -> PrivateNetns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
