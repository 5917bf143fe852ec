"""A TUN interface for the overlay: whole IP packets in and out of the kernel, configured with
netlink (pyroute2).

Opening (Linux ``Documentation/networking/tuntap.rst``)::

    fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK)
    ioctl(fd, TUNSETIFF, struct ifreq { char ifr_name[16]; short ifr_flags = IFF_TUN | IFF_NO_PI; })

``IFF_TUN``: layer 3, each read() is one IP packet and each write() must be one.
``IFF_NO_PI``: no 4-byte packet-information header before the packet. The interface lives as
long as the fd is open (it is not made persistent), so a crash cannot leave it behind.

Then, with pyroute2's ``IPRoute``: the MTU, link up, our overlay address as a ``/128`` (no DAD:
``IFA_F_NODAD``, nobody else is on a point-to-point TUN, and a tentative address could not be
bound for seconds), and ``fc03:1136:3800::/40 dev <tun>`` so the whole overlay goes into the
tunnel. The DNS resolver address (``RESOLVER``) is one more ``/128`` on the same interface: a
socket bound there answers local programs without any packet crossing the TUN.

MTU 1280: the IPv6 minimum link MTU (RFC 8200 sec. 5), and the overlay is IPv6 only, so no
inner packet can need less. Our tunnel adds at most 96 bytes (outer IPv6 40 + UDP 8 + transport
header 14 + inner frame type 1 + Poly1305 tag 16 + a relay SEND's 17), so a 1280-byte inner
packet is a 1376-byte outer one: it fits a 1500 Ethernet path, PPPoE's 1492, and most tunnels
under us (WireGuard's 1420, IPsec) without fragmentation. A bigger MTU would win a few percent
of throughput and lose every path whose MTU is below 1500 + overhead, silently (PMTUD black
holes); programs inside the tunnel see 1280 and size their packets to it.

Reading: ``loop.add_reader(fd)`` and ``os.read`` until ``EAGAIN`` (several packets per wakeup);
writing: ``os.write`` of one packet (a full queue drops it, as a link would).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import struct
from collections.abc import Callable
from ipaddress import IPv6Address, IPv6Network

from transport.addressing import OVERLAY

__all__ = ["DEFAULT_MTU", "DEFAULT_NAME", "TUN_PATH", "Tun", "TunError"]

TUN_PATH = "/dev/net/tun"
DEFAULT_NAME = "lzc0"
DEFAULT_MTU = 1280  # see the module docstring

TUNSETIFF = 0x400454CA  # _IOW('T', 202, int), linux/if_tun.h
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFA_F_NODAD = 0x02  # linux/if_addr.h
IFNAMSIZ = 16


class TunError(OSError):
    """The TUN device cannot be made or configured; the message says what to fix."""


def _explain(exc: OSError, what: str) -> TunError:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return TunError(
            exc.errno, f"{what}: this needs root or CAP_NET_ADMIN for the TUN device ({exc})"
        )
    if exc.errno == errno.ENOENT:
        return TunError(exc.errno, f"{what}: {TUN_PATH} is missing (modprobe tun) ({exc})")
    return TunError(exc.errno, f"{what}: {exc}")


class Tun:
    """One TUN interface. ``Tun.open(name)`` makes it; :meth:`configure` gives it addresses
    and routes; :meth:`start` feeds each packet read to ``on_packet``; :meth:`close` removes
    it (closing the fd deletes a non-persistent TUN, routes and addresses with it)."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.index: int | None = None
        self.stats = {"rx_packets": 0, "tx_packets": 0, "rx_bytes": 0, "tx_bytes": 0, "drops": 0}
        self._reading = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def open(cls, name: str = DEFAULT_NAME) -> Tun:
        raw = name.encode()
        if not raw or len(raw) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
            raise TunError(errno.EINVAL, f"{name!r} is not a valid interface name")
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _explain(exc, f"opening {TUN_PATH}") from exc
        try:
            ifr = struct.pack(f"{IFNAMSIZ}sH22x", raw, IFF_TUN | IFF_NO_PI)
            out = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            os.close(fd)
            raise _explain(exc, f"creating {name}") from exc
        actual = out[:IFNAMSIZ].split(b"\0", 1)[0].decode()
        return cls(fd, actual)

    # --- configuration (netlink) ------------------------------------------------------------

    def configure(
        self,
        addresses: list[IPv6Address],
        *,
        mtu: int = DEFAULT_MTU,
        routes: list[IPv6Network] | None = None,
    ) -> None:
        """MTU, link up, each address as a /128 without DAD, and the routes (default: the
        whole overlay /40) through this interface. Blocking (netlink): call it before the
        loop is busy, or in an executor."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        routes = [OVERLAY] if routes is None else routes
        try:
            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=self.name)
                if not found:
                    raise TunError(errno.ENODEV, f"{self.name} vanished before it was configured")
                index = self.index = int(found[0])
                ipr.link("set", index=index, mtu=mtu, state="up")
                for address in addresses:
                    ipr.addr(
                        "add",
                        index=index,
                        address=str(address),
                        prefixlen=128,
                        family=10,  # AF_INET6
                        flags=IFA_F_NODAD,
                    )
                for route in routes:
                    ipr.route("add", dst=str(route), oif=index, family=10)
        except NetlinkError as exc:
            raise _explain(OSError(exc.code, str(exc)), f"configuring {self.name}") from exc

    # --- packets ------------------------------------------------------------------------------

    def start(self, on_packet: Callable[[bytes], None]) -> None:
        """Read packets on the running loop and give each to ``on_packet``."""
        loop = self._loop = asyncio.get_running_loop()
        loop.add_reader(self.fd, self._readable, on_packet)
        self._reading = True

    def _readable(self, on_packet: Callable[[bytes], None]) -> None:
        for _ in range(64):  # bounded: other callbacks get their turn
            try:
                packet = os.read(self.fd, 65535)
            except BlockingIOError:
                return
            except OSError:
                self.stats["drops"] += 1
                return
            if not packet:
                return
            self.stats["rx_packets"] += 1
            self.stats["rx_bytes"] += len(packet)
            on_packet(packet)

    def read(self) -> bytes | None:
        """One packet, or None if none is waiting (non-blocking)."""
        try:
            return os.read(self.fd, 65535)
        except BlockingIOError:
            return None

    def write(self, packet: bytes) -> bool:
        """Hand one IP packet to the kernel; False if it was dropped."""
        try:
            os.write(self.fd, packet)
        except OSError:  # EAGAIN (queue full), EINVAL (not an IP packet)
            self.stats["drops"] += 1
            return False
        self.stats["tx_packets"] += 1
        self.stats["tx_bytes"] += len(packet)
        return True

    def close(self) -> None:
        """Stop reading and delete the interface (its addresses and routes go with it)."""
        if self._reading and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.fd)
        self._reading = False
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Tun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_interface(name: str) -> bool:
    """Delete interface ``name`` if it exists (``down`` after a crash left a persistent one, or
    another process still holds it); True if one was removed."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as exc:
            raise _explain(OSError(exc.code, str(exc)), f"removing {name}") from exc
        return True
