"""The private network namespace of proxy mode, for real (root: namespaces and /dev/net/tun).

- a namespace made from a thread: its inode differs from ours, and a TUN made in it is not on
  the host;
- a socket made in it cannot reach the host's loopback listener but reaches one made inside,
  from the event loop's thread too (a socket keeps its namespace);
- a connection to an overlay address leaves through the namespace's TUN (a SYN from our
  address), and one that nobody answers is bounded by the caller's timeout;
- afterwards no thread, no fd, no reference to the namespace is left;
- and, in a child run inside a namespace of its own (as the NAT lab runs the client), the
  output of ``ip route``, ``ip -6 route`` and ``ip addr`` is byte for byte the same before and
  after making, using and closing it;
- without CAP_SYS_ADMIN the error says what to do.

Skipped when not root or without ``ip``; under ``CI`` that fails instead.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from tests.natlab.lab import lab_or_skip
from transport.netns import NetnsError, PrivateNetns

REPO = Path(__file__).resolve().parents[2]
DEVICE = IPv6Address("fc03:1136:38ab:cdef:1::5")
SERVICE = IPv6Address("fc03:1136:38ab:cdef::10")


@pytest.fixture(autouse=True)
def _root() -> None:
    lab_or_skip(tun=True)  # root, `ip netns`, /dev/net/tun; fails as root or under CI


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def net_references(inode: int) -> list[str]:
    """Everything in this process still pointing at namespace ``inode``: fds, threads."""
    wanted = f"net:[{inode}]"
    found = []
    for where in [f"/proc/self/fd/{fd}" for fd in os.listdir("/proc/self/fd")] + [
        f"/proc/self/task/{task}/ns/net" for task in os.listdir("/proc/self/task")
    ]:
        try:
            if os.readlink(where) == wanted:
                found.append(where)
        except OSError:
            pass
    return found


@pytest.fixture
def host_listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.bind(("::1", 0))
    sock.listen()
    yield sock
    sock.close()


def test_a_private_namespace_holds_its_tun_and_its_sockets(host_listener: socket.socket) -> None:
    gc.collect()  # an earlier test's unreferenced sockets must not close during this one
    threads, open_fds = set(threading.enumerate()), fds()
    name = f"lzn{os.getpid() % 100000}"
    netns = PrivateNetns.create()
    try:
        assert netns.inode != os.stat("/proc/self/ns/net").st_ino
        tun = netns.open_tun(name, [DEVICE])
        try:
            assert tun.name == name
            host_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True)
            assert f" {name}:" not in host_links.stdout  # the TUN is not on the host
            inside = netns.call(lambda: socket.if_nametoindex(name))
            assert inside == tun.index

            # the host's loopback listener is not reachable from inside
            port = host_listener.getsockname()[1]
            probe = netns.socket_in(socket.AF_INET6, socket.SOCK_STREAM)
            with probe, pytest.raises(ConnectionRefusedError):
                probe.settimeout(2)
                probe.connect(("::1", port))

            # a listener made inside is, from the event loop's thread
            listener = netns.socket_in(socket.AF_INET6, socket.SOCK_STREAM)
            with listener:
                listener.bind(("::1", 0))
                listener.listen()
                inner_port = listener.getsockname()[1]

                async def reach() -> bytes:
                    sock = await netns.dial("::1", inner_port)
                    with sock:
                        peer, _ = listener.accept()
                        with peer:
                            peer.sendall(b"inside")
                            loop = asyncio.get_running_loop()
                            return await asyncio.wait_for(loop.sock_recv(sock, 16), 5)

                assert asyncio.run(reach()) == b"inside"

                # a thread of our own can join it with setns (the ns fd)
                seen: list[object] = []

                def joiner() -> None:
                    netns.enter()
                    with socket.create_connection(("::1", inner_port), timeout=2):
                        seen.append(os.readlink("/proc/thread-self/ns/net"))

                thread = threading.Thread(target=joiner)
                thread.start()
                thread.join(5)
                assert seen == [f"net:[{netns.inode}]"]
                listener.accept()[0].close()

            # to the overlay: the SYN comes out of the TUN, from our address; nobody answers,
            # so the caller's timeout ends it
            async def overlay() -> None:
                await asyncio.wait_for(netns.dial(SERVICE, 443), 0.5)

            with pytest.raises(TimeoutError):
                asyncio.run(overlay())
            syn = None
            for _ in range(20):
                select.select([tun.fd], [], [], 0.1)
                while (packet := tun.read()) is not None:
                    if packet[0] >> 4 == 6 and packet[6] == 6 and packet[24:40] == SERVICE.packed:
                        syn = packet
                if syn:
                    break
            assert syn is not None
            assert IPv6Address(syn[8:24]) == DEVICE and int.from_bytes(syn[42:44]) == 443
        finally:
            tun.close()
    finally:
        inode = netns.inode
        netns.close()
    assert not netns.alive
    with pytest.raises(NetnsError):
        netns.socket_in()
    assert set(threading.enumerate()) - threads == set()  # none of ours is left
    assert fds() - open_fds == set()
    # join() returns when Python is done with a thread, a moment before the kernel task exits
    for _ in range(100):
        if not net_references(inode):
            break
        time.sleep(0.01)
    assert net_references(inode) == []


def test_without_cap_sys_admin_the_error_says_what_to_do() -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not installed (Debian: util-linux)")
    code = (
        "from transport.netns import PrivateNetns\n"
        "try:\n    PrivateNetns.create()\nexcept OSError as exc:\n    print(exc)\n"
    )
    result = subprocess.run(
        ["setpriv", "--bounding-set", "-sys_admin", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert "needs root, or CAP_SYS_ADMIN and CAP_NET_ADMIN" in result.stdout
    assert "Nothing on the host's network changes" in result.stdout


CHILD = r"""
import asyncio, json, subprocess, sys
from ipaddress import IPv6Address
from transport.netns import PrivateNetns

def snapshot():
    return [subprocess.run(["ip", *args], capture_output=True, check=True).stdout.decode()
            for args in (["route"], ["-6", "route"], ["addr"], ["link"])]

before = snapshot()
netns = PrivateNetns.create()
tun = netns.open_tun("lzc0", [IPv6Address("fc03:1136:38ab:cdef:1::5")])
inside = netns.call(lambda: subprocess.run(["ip", "-6", "route"], capture_output=True).stdout)
async def main():
    try:
        await asyncio.wait_for(netns.dial("fc03:1136:38ab:cdef::10", 80), 0.3)
    except TimeoutError:
        pass
asyncio.run(main())
during = snapshot()
tun.close(); netns.close()
after = snapshot()
print(json.dumps({"before": before, "during": during, "after": after,
                  "inside": inside.decode()}))
"""


def test_the_host_network_is_byte_for_byte_unchanged(tmp_path: Path) -> None:
    """In a namespace standing for the host (with a route and addresses of its own), as the
    NAT lab runs the client with ``ip netns exec``."""
    ns = f"lznh{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        for command in (
            ["link", "set", "lo", "up"],
            ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
            ["link", "set", "eth0", "up"],
            ["link", "set", "eth1", "up"],
            ["addr", "add", "192.0.2.10/24", "dev", "eth0"],
            ["addr", "add", "2001:db8::10/64", "dev", "eth0", "nodad"],
            ["route", "add", "default", "via", "192.0.2.1"],
        ):
            subprocess.run(["ip", "-n", ns, *command], check=True, timeout=10)
        result = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", CHILD],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert "default via 192.0.2.1" in out["before"][0] and "2001:db8::10" in out["before"][2]
    assert out["during"] == out["before"]
    assert out["after"] == out["before"]
    assert "fc03:1136:3800::/40 dev lzc0" in out["inside"]  # the route is there, not here
