"""KernelExposure and the forwarder against a real kernel, in network namespaces this module makes.

::

    device ns                  box ns (this test's main thread)         lan ns
    dev0: D1, D2 (/128) <-veth-> lzc0: BOX::1/128, fe80::1  lan0 <-veth-> eth0: 10.77.0.2 (v4)
    P::/64 via fe80::1           P::/64 dev lzc0          10.77.0.1           fd77::2, fd77::3
    fd77::/64 via fe80::1        KernelExposure + Forwarder  fd77::1

A veth named ``lzc0`` stands in for transportd's TUN: the box sees device packets arrive on
``lzc0`` exactly as if transportd had written them there. Echo servers (threads of this process,
with sockets made inside the lan namespace) answer ``port <n> from <peer>`` so a test sees which
port the target got and whose address it saw.

The main thread enters the box namespace for the module (``setns``, per thread) and leaves it at
the end; device and lan sockets are made inside their namespaces and used from here. Namespaces are
named ``lzctest-<pid>-<role>`` and deleted by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from tests.natlab.lab import lab_or_skip
from transport import exposure_linux
from transport.exposure import Exposure, ExposureError
from transport.exposure_linux import KernelExposure

pytestmark = pytest.mark.natlab

PREFIX = IPv6Network("fc03:1136:3864:b5f8::/64")
BOX = IPv6Address("fc03:1136:3864:b5f8::1")
D1 = IPv6Address("fc03:1136:3864:b5f8:1::d1")
D2 = IPv6Address("fc03:1136:3864:b5f8:1::d2")
S4 = IPv6Address("fc03:1136:3864:b5f8:2::4")  # -> 10.77.0.2, IPv4 only: the forwarder
S6 = IPv6Address("fc03:1136:3864:b5f8:2::6")  # -> fd77::2: NAT66
SLO = IPv6Address("fc03:1136:3864:b5f8:2::7f")  # -> 127.0.0.1 in the box: the forwarder
T4 = IPv4Address("10.77.0.2")
T6 = IPv6Address("fd77::2")
OTHER = IPv6Address("fd77::3")  # a LAN host that is no service
TCP_PORTS = (22, 7, 8080)
UDP_PORTS = (7, 5353)
BOX_LOCAL_PORT = 8000  # a "store app" on the box's loopback
TIMEOUT = 3.0

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
PID = os.getpid()
NS = {role: f"lzctest-{PID}-{role}" for role in ("box", "dev", "lan")}


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def netns(role: str) -> Iterator[None]:
    """Run the block in namespace ``role`` (this thread only), then come back."""
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{NS[role]}", os.O_RDONLY)
    try:
        _setns(there)
        try:
            yield
        finally:
            _setns(here)
    finally:
        os.close(here)
        os.close(there)


def sh(*args: str) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=10, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def ns_sh(role: str, *args: str) -> str:
    return sh("ip", "netns", "exec", NS[role], *args)


# --- echo servers -------------------------------------------------------------------------------


class Echo:
    """TCP and UDP echo on given addresses: TCP says ``port <n> from <peer>\\n`` first, then
    echoes; UDP answers ``port <n> from <peer>: <data>``. One thread, selectors, stoppable."""

    def __init__(self, addresses: Sequence[tuple[str, int, int]]) -> None:  # (addr, port, type)
        self.socks: dict[int, tuple[socket.socket, int, str]] = {}
        self.conns: dict[int, socket.socket] = {}
        for addr, port, kind in addresses:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            sock = socket.socket(family, kind)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((addr, port))
            if kind == socket.SOCK_STREAM:
                sock.listen(16)
            sock.setblocking(False)
            self.socks[sock.fileno()] = (sock, port, "tcp" if kind == socket.SOCK_STREAM else "udp")
        self.stop_r, self.stop_w = os.pipe()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        poll = select.poll()
        poll.register(self.stop_r, select.POLLIN)
        for fd in self.socks:
            poll.register(fd, select.POLLIN)
        while True:
            for fd, _ev in poll.poll(1000):
                if fd == self.stop_r:
                    return
                if fd in self.socks:
                    sock, port, proto = self.socks[fd]
                    try:
                        if proto == "tcp":
                            conn, peer = sock.accept()
                            conn.sendall(f"port {port} from {peer[0]}\n".encode())
                            conn.setblocking(False)
                            self.conns[conn.fileno()] = conn
                            poll.register(conn.fileno(), select.POLLIN)
                        else:
                            data, peer = sock.recvfrom(65535)
                            sock.sendto(f"port {port} from {peer[0]}: ".encode() + data, peer)
                    except OSError:
                        continue
                elif fd in self.conns:
                    conn = self.conns[fd]
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        data = b""
                    if data:
                        with contextlib.suppress(OSError):
                            conn.setblocking(True)
                            conn.sendall(data)
                            conn.setblocking(False)
                    else:
                        poll.unregister(fd)
                        del self.conns[fd]
                        conn.close()

    def close(self) -> None:
        os.write(self.stop_w, b"x")
        self.thread.join(5)
        for sock, _port, _proto in self.socks.values():
            sock.close()
        for conn in self.conns.values():
            conn.close()
        os.close(self.stop_r)
        os.close(self.stop_w)


# --- the lab ------------------------------------------------------------------------------------


def _build() -> None:
    for ns in NS.values():
        sh("ip", "netns", "add", ns)
        # No duplicate address detection: addresses are usable at once (no 1-2 s wait).
        sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0")
        sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    box, dev, lan = NS["box"], NS["dev"], NS["lan"]
    sh("ip", "-n", box, "link", "add", "lzc0", "type", "veth", "peer", "name", "dev0", "netns", dev)
    sh("ip", "-n", box, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", lan)
    batch = {
        box: [
            f"addr add {BOX}/128 dev lzc0 nodad",
            "addr add fe80::1/64 dev lzc0 nodad",
            "link set lzc0 up",
            f"route add {PREFIX} dev lzc0",
            "addr add 10.77.0.1/24 dev lan0",
            "addr add fd77::1/64 dev lan0 nodad",
            "link set lan0 up",
        ],
        dev: [
            f"addr add {D1}/128 dev dev0 nodad",
            f"addr add {D2}/128 dev dev0 nodad",
            "link set dev0 up",
            f"route add {PREFIX} via fe80::1 dev dev0",
            "route add fd77::/64 via fe80::1 dev dev0",
        ],
        lan: [
            f"addr add {T4}/24 dev eth0",
            f"addr add {T6}/64 dev eth0 nodad",
            f"addr add {OTHER}/64 dev eth0 nodad",
            "link set eth0 up",
            # The LAN could answer the overlay directly: only the box's rules keep devices out.
            "route add fc03:1136:3800::/40 via fd77::1 dev eth0",
        ],
    }
    for ns, lines in batch.items():
        proc = subprocess.run(
            ["ip", "-n", ns, "-batch", "-"],
            input="\n".join(lines) + "\n",
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"ip -batch in {ns}: {proc.stderr}")
    # A box interface that takes router advertisements, to see accept_ra turned to 2 and back.
    ns_sh("box", "sysctl", "-q", "-w", "net.ipv6.conf.lan0.accept_ra=1")


def _destroy() -> None:
    for ns in NS.values():
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)
    left = set(sh("ip", "netns", "list").split())
    assert not left & set(NS.values()), f"namespaces left behind: {left & set(NS.values())}"


@pytest.fixture(scope="module")
def lab() -> Iterator[None]:
    lab_or_skip()
    _build()
    echoes: list[Echo] = []
    try:
        with netns("lan"):
            listen = [(str(T4), p, socket.SOCK_STREAM) for p in TCP_PORTS]
            listen += [(str(T4), p, socket.SOCK_DGRAM) for p in UDP_PORTS]
            listen += [(str(T6), p, socket.SOCK_STREAM) for p in TCP_PORTS]
            listen += [(str(T6), p, socket.SOCK_DGRAM) for p in UDP_PORTS]
            listen += [(str(OTHER), 22, socket.SOCK_STREAM)]
            echoes.append(Echo(listen))
        with netns("box"):
            echoes.append(Echo([("127.0.0.1", BOX_LOCAL_PORT, socket.SOCK_STREAM)]))
        with netns("box"):
            yield
    finally:
        for echo in echoes:
            echo.close()
        _destroy()


@pytest.fixture
def kx(lab: None) -> Iterator[KernelExposure]:
    with netns("box"):
        k = KernelExposure()
        try:
            yield k
        finally:
            k.close()


def svc(address: IPv6Address, target: object, devices: set[IPv6Address], **kw: object) -> Exposure:
    return Exposure(
        name=f"svc-{address.exploded[-4:]}",
        address=address,
        target=target,  # type: ignore[arg-type]
        tcp=kw.get("tcp", ((7, 8), (22, 22))),  # type: ignore[arg-type]
        udp=kw.get("udp", ((7, 7),)),  # type: ignore[arg-type]
        devices=frozenset(devices),
    )


# --- device side --------------------------------------------------------------------------------


def tcp_from(device: IPv6Address, service: IPv6Address, port: int) -> socket.socket:
    """A TCP connection from ``device`` (made in the device namespace), connected, with a
    timeout; raises what connect() raises."""
    with netns("dev"):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.bind((str(device), 0))
    try:
        sock.connect((str(service), port))
    except OSError:
        sock.close()
        raise
    return sock


def udp_from(device: IPv6Address, service: IPv6Address, port: int) -> socket.socket:
    with netns("dev"):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.settimeout(TIMEOUT)
    sock.bind((str(device), 0))
    sock.connect((str(service), port))
    return sock


def banner(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(100)
        if not chunk:
            break
        data += chunk
    return data.decode()


def echo_once(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def refused_tcp(device: IPv6Address, service: IPv6Address, port: int) -> float:
    """Seconds until the connection attempt was refused (a RST to the SYN); fails if it
    connects, hangs, or meets anything but a refusal."""
    start = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        tcp_from(device, service, port).close()
    elapsed = time.monotonic() - start
    assert elapsed < 1.0, f"refusal took {elapsed:.2f} s"
    return elapsed


def sysctl(path: str) -> str:
    return Path("/proc/sys/net/ipv6/conf", path).read_text().strip()


# --- tests --------------------------------------------------------------------------------------


def test_tcp_and_udp_reach_an_ipv4_only_target_on_the_original_port(kx: KernelExposure) -> None:
    kx.apply([svc(S4, T4, {D1})])
    for port in (22, 7):
        with tcp_from(D1, S4, port) as sock:
            # The target saw the port the device chose, and the box's LAN address.
            assert banner(sock) == f"port {port} from 10.77.0.1\n"
            assert echo_once(sock, b"hello" * 1000) == b"hello" * 1000
    with udp_from(D1, S4, 7) as sock:
        sock.send(b"ping")
        assert sock.recv(1000) == b"port 7 from 10.77.0.1: ping"
        sock.send(b"again")  # the flow's own socket now (TPROXY's established lookup)
        assert sock.recv(1000) == b"port 7 from 10.77.0.1: again"
    assert kx.forwarder is not None
    stats = kx.forwarder.stats()
    assert stats["tcp_accepted"] == 2 and stats["udp_flows_opened"] == 1


def test_a_loopback_target_is_reached_through_the_forwarder(kx: KernelExposure) -> None:
    kx.apply([svc(SLO, IPv4Address("127.0.0.1"), {D1}, tcp=((BOX_LOCAL_PORT, BOX_LOCAL_PORT),))])
    with tcp_from(D1, SLO, BOX_LOCAL_PORT) as sock:
        assert banner(sock) == f"port {BOX_LOCAL_PORT} from 127.0.0.1\n"


def test_nat66_reaches_an_ipv6_target_and_turns_forwarding_on(kx: KernelExposure) -> None:
    assert sysctl("all/forwarding") == "0"
    kx.apply([svc(S6, T6, {D1})])
    assert sysctl("all/forwarding") == "1"
    assert sysctl("lan0/accept_ra") == "2"  # forwarding must not cost the box its RAs
    with tcp_from(D1, S6, 22) as sock:
        assert banner(sock) == "port 22 from fd77::1\n"  # masqueraded to the box's LAN address
        assert echo_once(sock, b"x" * 100_000) == b"x" * 100_000
    with udp_from(D1, S6, 7) as sock:
        sock.send(b"ping")
        assert sock.recv(1000) == b"port 7 from fd77::1: ping"
    assert D1 in kx.flows().get(S6, set())
    assert kx.forwarder is None  # no forwarder service, no forwarder thread


def test_a_port_outside_the_policy_is_refused_not_dropped(kx: KernelExposure) -> None:
    kx.apply([svc(S4, T4, {D1}), svc(S6, T6, {D1})])
    refused_tcp(D1, S4, 8080)  # the target listens there, but the policy says no
    refused_tcp(D1, S6, 8080)
    with udp_from(D1, S4, 5353) as sock:  # UDP: ICMPv6 admin-prohibited -> EACCES
        sock.send(b"ping")
        with pytest.raises(PermissionError):
            sock.recv(1000)


def test_a_device_without_access_gets_a_refusal(kx: KernelExposure) -> None:
    kx.apply([svc(S4, T4, {D1}), svc(S6, T6, {D1})])
    refused_tcp(D2, S4, 22)
    refused_tcp(D2, S6, 22)
    for service in (S4, S6):
        with udp_from(D2, service, 7) as sock:
            sock.send(b"ping")
            with pytest.raises(PermissionError):
                sock.recv(1000)
    with tcp_from(D1, S4, 22) as sock:  # the allowed one still works
        assert banner(sock).startswith("port 22")


@pytest.mark.parametrize(("service", "target"), [(S4, T4), (S6, T6)], ids=["forwarder", "nat66"])
def test_narrowing_access_stops_the_revoked_device_only(
    kx: KernelExposure, service: IPv6Address, target: object
) -> None:
    kx.apply([svc(service, target, {D1, D2})])
    one, two = tcp_from(D1, service, 7), tcp_from(D2, service, 7)
    with one, two:
        assert banner(one).startswith("port 7") and banner(two).startswith("port 7")
        assert echo_once(one, b"a") == b"a" and echo_once(two, b"b") == b"b"
        start = time.monotonic()
        kx.apply([svc(service, target, {D2})])
        one.settimeout(1.0)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            # The forwarder resets it at once; under NAT66 the next packet meets a RST.
            if echo_once(one, b"still there?") == b"":
                raise ConnectionResetError("closed")
        assert time.monotonic() - start < 1.0
        assert echo_once(two, b"still here") == b"still here"
    refused_tcp(D1, service, 7)
    assert D1 not in kx.flows().get(service, set())


def test_a_target_that_refuses_resets_the_device_connection(kx: KernelExposure) -> None:
    kx.apply([svc(S4, T4, {D1})])  # tcp 8 is in the policy, but nothing listens there
    start = time.monotonic()
    # The forwarder accepted the handshake before asking the target; it passes the target's
    # refusal on as a RST (seen by connect() itself when it comes that fast).
    with pytest.raises(ConnectionResetError), tcp_from(D1, S4, 8) as sock:
        sock.recv(100)
    assert time.monotonic() - start < 1.0
    assert kx.forwarder is not None and kx.forwarder.stats()["tcp_connect_failed"] == 1


def test_a_device_cannot_use_the_box_as_a_router(kx: KernelExposure) -> None:
    kx.apply([svc(S6, T6, {D1, D2}), svc(S4, T4, {D1})])  # forwarding is on (NAT66)
    assert sysctl("all/forwarding") == "1"
    refused_tcp(D1, OTHER, 22)  # another LAN host
    refused_tcp(D1, T6, 22)  # a service's target, by its own address
    with udp_from(D1, T6, 7) as sock:
        sock.send(b"ping")
        with pytest.raises(PermissionError):
            sock.recv(1000)


def test_apply_is_idempotent_and_changes_keep_other_flows(kx: KernelExposure) -> None:
    state = [svc(S4, T4, {D1}), svc(S6, T6, {D1})]
    kx.apply(state)
    with tcp_from(D1, S6, 22) as six, tcp_from(D1, S4, 22) as four:
        banner(six), banner(four)
        kx.apply(state)
        kx.apply([*state, svc(SLO, IPv4Address("127.0.0.1"), {D2})])  # another service appears
        assert echo_once(six, b"six") == b"six" and echo_once(four, b"four") == b"four"
        assert kx.flows() == {S6: {D1}, S4: {D1}}


def test_close_leaves_nothing_behind_and_restores_sysctls(lab: None) -> None:
    with netns("box"):
        before = {p: sysctl(p) for p in ("all/forwarding", "default/forwarding", "lan0/accept_ra")}
        rules_before = sh("ip", "-6", "rule", "list")
        k = KernelExposure()
        try:
            k.apply([svc(S4, T4, {D1}), svc(S6, T6, {D1})])
            assert "lazycat" in sh("nft", "list", "tables")
            assert "fwmark 0x1136 lookup 1136" in sh("ip", "-6", "rule", "list")
            assert "local default dev lo" in sh("ip", "-6", "route", "show", "table", "1136")
        finally:
            k.close()
        assert "lazycat" not in sh("nft", "list", "tables")
        assert sh("ip", "-6", "rule", "list") == rules_before
        assert sh("ip", "-6", "route", "show", "table", "all").count("table 1136") == 0
        assert {p: sysctl(p) for p in before} == before
        k.close()  # twice is harmless
        with pytest.raises(OSError):  # the forwarder's port is free again, nothing listens
            tcp_from(D1, S4, 22)


def test_only_the_ruleset_is_needed_to_drop_the_nat66_path(kx: KernelExposure) -> None:
    kx.apply([svc(S6, T6, {D1})])
    kx.apply([svc(S4, T4, {D1})])  # NAT66 gone: forwarding goes back off
    assert sysctl("all/forwarding") == "0"
    assert sysctl("lan0/accept_ra") == "1"
    refused_tcp(D1, S6, 22)


def test_a_bad_state_is_refused_before_anything_changes(kx: KernelExposure) -> None:
    with pytest.raises(ExposureError, match="share the address"):
        kx.apply([svc(S4, T4, {D1}), svc(S4, T6, {D1})])
    assert "lazycat" not in sh("nft", "list", "tables")


def test_a_forwarder_that_cannot_listen_fails_closed_and_is_retried(kx: KernelExposure) -> None:
    state = [svc(S4, T4, {D1}), svc(S6, T6, {D1})]
    taken = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        taken.bind(("::", kx.tproxy_port))
        taken.listen()
        with pytest.raises(ExposureError, match=r"forwarder services refused.*cannot listen"):
            kx.apply(state)
        # The ruleset went in all the same: the forwarder's services are refused, not left to
        # hang, and access to the NAT66 one is enforced.
        assert "lazycat" in sh("nft", "list", "tables")
        refused_tcp(D1, S4, 22)
        with udp_from(D1, S4, 7) as sock:
            sock.send(b"ping")
            with pytest.raises(PermissionError):
                sock.recv(1000)
        with tcp_from(D1, S6, 22) as sock:
            assert banner(sock).startswith("port 22")
        refused_tcp(D2, S6, 22)
    finally:
        taken.close()
    kx.apply(state)  # the next apply tries the forwarder again
    with tcp_from(D1, S4, 22) as sock:
        assert banner(sock) == "port 22 from 10.77.0.1\n"


def _rules_of_ours() -> list[str]:
    return [line for line in sh("ip", "-6", "rule", "list").splitlines() if "0x1136" in line]


def test_start_removes_what_a_crashed_run_left(lab: None) -> None:
    with netns("box"):
        sh("nft", "add table inet lazycat; add chain inet lazycat stale")
        sh("ip", "-6", "rule", "add", "fwmark", "0x1136", "lookup", "1136", "pref", "1136")
        sh("ip", "-6", "rule", "add", "fwmark", "0x1136", "lookup", "1136", "pref", "2000")
        sh("ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "1136")
        k = KernelExposure()
        try:
            k.start()
            assert "lazycat" not in sh("nft", "list", "tables")
            assert _rules_of_ours() == []
            assert sh("ip", "-6", "route", "show", "table", "all").count("table 1136") == 0
            # And the first apply of a run that never called start() does it too.
            sh("ip", "-6", "rule", "add", "fwmark", "0x1136", "lookup", "1136", "pref", "1136")
            later = KernelExposure()
            try:
                later.apply([svc(S6, T6, {D1})])  # NAT66 only: no policy rule wanted
                assert _rules_of_ours() == []
            finally:
                later.close()
        finally:
            k.close()


def _sysctls() -> dict[str, str]:
    names = ("all/forwarding", "default/forwarding", "lan0/forwarding", "lan0/accept_ra")
    return {p: sysctl(p) for p in names}


def test_a_crashed_runs_sysctls_are_put_back_from_the_state_file(lab: None, tmp_path: Path) -> None:
    file = tmp_path / "forwarding-sysctls.json"
    with netns("box"):
        before = _sysctls()
        crashed = KernelExposure(state_file=file)
        try:
            crashed.apply([svc(S6, T6, {D1})])
            assert sysctl("all/forwarding") == "1" and sysctl("lan0/accept_ra") == "2"
            assert stat.S_IMODE(file.stat().st_mode) == 0o600
            saved = json.loads(file.read_text())["sysctls"]
            assert saved["all/forwarding"] == "0" and saved["lan0/accept_ra"] == "1"
            # The process dies here (no close()); the next run starts:
            k = KernelExposure(state_file=file)
            k.start()
            assert _sysctls() == before
            assert not file.exists()
            assert "lazycat" not in sh("nft", "list", "tables")
            k.close()
        finally:
            crashed.close()
        assert _sysctls() == before


def test_the_owners_forwarding_and_an_old_boots_state_file_are_left_alone(
    lab: None, tmp_path: Path
) -> None:
    file = tmp_path / "forwarding-sysctls.json"
    with netns("box"):
        ns_sh("box", "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
        try:
            k = KernelExposure(state_file=file)
            try:
                k.apply([svc(S6, T6, {D1})])
                assert not file.exists()  # nothing of ours to put back
            finally:
                k.close()
            assert sysctl("all/forwarding") == "1"
            # A file from before a reboot: the reboot put the values back already.
            file.write_text(json.dumps({"boot_id": "x", "sysctls": {"all/forwarding": "0"}}))
            k = KernelExposure(state_file=file)
            k.start()
            k.close()
            assert sysctl("all/forwarding") == "1" and not file.exists()
        finally:
            ns_sh("box", "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=0")


def test_close_during_apply_wins_and_leaves_nothing_behind(lab: None) -> None:
    state = [svc(S4, T4, {D1}), svc(S6, T6, {D1})]
    outcome: list[str] = []
    applied = threading.Event()
    with netns("box"):
        k = KernelExposure()

        def keep_applying() -> None:  # a thread made here lives in the box namespace too
            for _ in range(100):
                try:
                    k.apply(state)
                except ExposureError as exc:
                    outcome.append(str(exc))
                    return
                applied.set()
            outcome.append("never refused")

        worker = threading.Thread(target=keep_applying)
        worker.start()
        try:
            assert applied.wait(10)
            k.close()
            worker.join(30)
            assert outcome and "closed" in outcome[0]
            assert "lazycat" not in sh("nft", "list", "tables")
            assert _rules_of_ours() == []
            assert sysctl("all/forwarding") == "0"
            with pytest.raises(ExposureError, match="closed"):
                k.apply(state)
            assert k.flows() == {} and k.forget_flows([(S6, D1)]) == 0
        finally:
            worker.join(30)
            k.close()


@pytest.mark.parametrize(
    ("said", "message"),
    [
        ("Error: Could not process rule: Operation not permitted", "nft needs CAP_NET_ADMIN"),
        ("Error: syntax error, unexpected junk", "nft refused the ruleset: Error: syntax error"),
    ],
)
def test_nft_errors_show_what_nft_said(tmp_path: Path, said: str, message: str) -> None:
    fake = tmp_path / "nft"  # an nft that only fails; nothing reaches the kernel
    fake.write_text(f"#!/bin/sh\ncat >/dev/null\necho '{said}' >&2\nexit 1\n")
    fake.chmod(0o755)
    k = KernelExposure(nft=str(fake))
    with pytest.raises(ExposureError) as info:
        k.start()
    assert message in str(info.value)
    assert ("CAP_NET_ADMIN" in str(info.value)) == ("not permitted" in said)
    k.close()


def test_an_interface_that_vanishes_while_forwarding_goes_on_is_skipped(
    kx: KernelExposure, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"  # a stand-in for /proc/sys/net/ipv6/conf
    for name in ("all", "default", "eth9"):
        (conf / name).mkdir(parents=True)
        (conf / name / "forwarding").write_text("0\n")
        (conf / name / "accept_ra").write_text("1\n")
    (conf / "gone0").mkdir()  # listed, but its files went with it before they were read
    monkeypatch.setattr(exposure_linux, "CONF", conf)
    kx.apply([svc(S6, T6, {D1})])
    assert (conf / "all/forwarding").read_text().strip() == "1"
    assert (conf / "eth9/accept_ra").read_text().strip() == "2"
    kx.apply([])
    assert (conf / "all/forwarding").read_text().strip() == "0"
    assert (conf / "eth9/accept_ra").read_text().strip() == "1"
