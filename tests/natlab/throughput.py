"""TCP throughput in the NAT lab: one iperf3 stream between two lab hosts, and wireguard-go.

Not a test module: the lab benchmark and ``tests/natlab/test_throughput.py`` import it. Two
things, both on the lab's own hosts (``tests/natlab/lab.py``) so their figures sit beside each
other in one run on one machine:

* :func:`tcp_throughput` / :func:`tcp_stream`: one TCP stream from ``sender`` to ``address``
  (IPv4 or IPv6; the receiver's own address, an overlay address, a port-forwarded public
  address — whatever reaches ``receiver``), measured by Debian's ``iperf3``. The server runs in
  the receiver's namespace with ``-s -1`` (one test, then it exits), the client with ``-J``;
  the figure is ``end.sum_received.bits_per_second``, what the *receiver* counted, so data still
  in flight when the sender stops does not count. The server is started through the lab (so
  the lab kills it by PID if anything escapes) and stopped by its PID here; every step has a
  deadline.

* :class:`WireguardGo`: a userspace WireGuard (Debian's ``wireguard-go``, a TUN device driven by
  a Go process, plus ``wg`` from ``wireguard-tools``) between two lab hosts, over whatever
  underlay joins them: the same LAN, or a public host and a host behind a NAT. The "server" side
  listens on a fixed UDP port; the "client" side knows its endpoint (an IP the client reaches,
  given by the caller) and sends the first packet, so it works from behind any NAT the lab
  makes; both keep the path alive with a 25 s persistent keepalive (the interval the
  WireGuard documentation suggests for NAT). It is the reference a userspace tunnel over TUN
  is measured against.

How wireguard-go is run, and why:

* ``wireguard-go -f <if>`` stays in the foreground, started with ``host.popen`` so it runs in
  the host's namespace, in its own process group, killed by PID on exit (and by the lab if
  this object never exits). It creates the TUN ``<if>`` in that namespace (default MTU 1420)
  and its control socket ``/var/run/wireguard/<if>.sock``. That directory is shared by every
  namespace (it is a file system path), so interface names must be unique on the machine:
  they are the lab's ``ln<pid>wg<n>s`` / ``ln<pid>wg<n>c``. ``wg set`` finds the socket by name.
* Keys come from ``wg genkey`` / ``wg pubkey``; the private key reaches ``wg set ... private-key
  /dev/stdin`` through a pipe, never a file.
* Inner addresses: ``10.77.<n>.1`` (server) and ``.2`` (client) in a /24, and, when both hosts
  have IPv6, ``fd00:77:<n>::1`` / ``::2`` in a /64 (RFC 1918 and RFC 4193 ranges, which exist
  only inside the namespaces; the lab's own LANs are ``10.<k>.1.0/24`` with k <= 15).
* Ready means a TCP connection attempt from the client to the server's inner address gets an
  answer (accepted or refused: a RST that came back through the tunnel proves both directions),
  within a deadline.
* Exit: SIGTERM to each process group by its PID, SIGKILL after 3 s, then delete the interfaces
  and control sockets it made, by their exact names, if the processes left any behind.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tests.natlab.lab import PYTHON, Host, LabError

IPERF_PORT = 5201
WG_PORT = 51820
KEEPALIVE = 25  # seconds: wg(8) suggests 25 for peers behind a NAT
WG_SOCKET_DIR = Path("/var/run/wireguard")  # wireguard-go's UAPI sockets (shared by all netns)

_instances = itertools.count(1)


class ThroughputError(LabError):
    """A measurement or the wireguard-go set-up failed; the message carries the tools' output."""


def _stop(proc: subprocess.Popen[str], grace: float = 3.0) -> None:
    """End a process the lab started (its own session: process group id == PID), by PID."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)


def _read(log: IO[str]) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-4000:]


def _family(address: str) -> str:
    return "-6" if ":" in address else "-4"


# --- iperf3 ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    """One iperf3 stream's result, from the client's JSON."""

    mbit_s: float  # end.sum_received.bits_per_second / 1e6: what the receiver counted
    bytes_sent: int  # TCP payload the sender wrote
    bytes_received: int  # TCP payload the receiver read
    seconds: float  # the receiver's measured interval
    retransmits: int | None  # sender's TCP retransmissions (Linux reports them)


def _wait_listening(host: Host, port: int, proc: subprocess.Popen[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        out = host.run(["ss", "-Htln", f"sport = :{port}"], check=False, timeout=5).stdout
        if out.strip():
            return True
        time.sleep(0.02)
    return False


def tcp_stream(
    sender: Host,
    receiver: Host,
    address: str,
    *,
    seconds: float = 3.0,
    port: int = IPERF_PORT,
    connect_timeout: float = 5.0,
    server_family: int | None = None,
) -> Stream:
    """One TCP stream of ``seconds`` from ``sender`` to ``address`` (which reaches
    ``receiver``), measured by iperf3. Takes at most about ``seconds + connect_timeout + 30``
    seconds; raises :class:`ThroughputError` (with both sides' output) on any failure."""
    family = _family(address)
    # the server's family differs when something between translates (a service's forwarder
    # carries the overlay's IPv6 to an IPv4-only host)
    listen = f"-{server_family}" if server_family else family
    with tempfile.TemporaryFile("w+") as log:
        server = receiver.popen(
            ["iperf3", "-s", "-1", listen, "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            if not _wait_listening(receiver, port, server, 5.0):
                raise ThroughputError(f"iperf3 server in {receiver.name} did not listen on {port}")
            client = sender.run(
                [
                    "iperf3",
                    "-c",
                    address,
                    family,
                    "-p",
                    str(port),
                    "-t",
                    f"{seconds:g}",
                    "-J",
                    "--connect-timeout",
                    str(int(connect_timeout * 1000)),
                ],
                check=False,
                timeout=seconds + connect_timeout + 15,
            )
            try:
                result: dict[str, Any] = json.loads(client.stdout)
            except ValueError:
                result = {"error": f"no JSON from the client: {client.stdout[-2000:]}"}
            if client.returncode != 0 or "error" in result:
                raise ThroughputError(
                    f"iperf3 {sender.name} -> {address}:{port} failed ({client.returncode}): "
                    f"{result.get('error')}\n{client.stderr}\nserver:\n{_read(log)}"
                )
            sent, received = result["end"]["sum_sent"], result["end"]["sum_received"]
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=2)  # -1: it exits by itself after the test
            return Stream(
                mbit_s=float(received["bits_per_second"]) / 1e6,
                bytes_sent=int(sent["bytes"]),
                bytes_received=int(received["bytes"]),
                seconds=float(received["seconds"]),
                retransmits=sent.get("retransmits"),
            )
        finally:
            _stop(server)  # by PID; a no-op when it has exited


def tcp_throughput(
    sender: Host,
    receiver: Host,
    address: str,
    *,
    seconds: float = 3.0,
    port: int = IPERF_PORT,
    server_family: int | None = None,
) -> float:
    """Mbit/s of one TCP stream from ``sender`` to ``receiver`` at ``address`` (see
    :func:`tcp_stream`)."""
    stream = tcp_stream(
        sender, receiver, address, seconds=seconds, port=port, server_family=server_family
    )
    return stream.mbit_s


# --- wireguard-go -------------------------------------------------------------------------------


def _wg_keypair() -> tuple[str, str]:
    """(private, public), base64, from ``wg`` (run in the machine's namespace: no network)."""
    private = subprocess.run(
        ["wg", "genkey"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
    public = subprocess.run(
        ["wg", "pubkey"], input=private, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
    return private, public


REACH = """
import socket, sys, time
host, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(1.0)
    try:
        s.connect((host, 9))
        print("ok"); break
    except ConnectionRefusedError:
        print("ok"); break  # the RST came back through the tunnel
    except OSError:
        time.sleep(0.1)
    finally:
        s.close()
else:
    print("timeout")
"""


@dataclass
class _Side:
    host: Host
    ifname: str
    ip: str
    ip6: str | None
    private: str
    public: str
    proc: subprocess.Popen[str] | None = None
    log: IO[str] | None = None

    @property
    def socket(self) -> Path:
        return WG_SOCKET_DIR / f"{self.ifname}.sock"


class WireguardGo:
    """wireguard-go between ``server`` (listening on ``listen_port``) and ``client`` (which
    sends to ``endpoint``:``endpoint_port``, an address of the server it reaches). A context
    manager; inside it, ``server_ip`` / ``client_ip`` (and ``server_ip6`` / ``client_ip6`` when
    both hosts have IPv6) reach each other through the tunnel::

        with WireguardGo(pub, box, endpoint=pub.ip) as wg:
            mbit = tcp_throughput(box, pub, wg.server_ip)
            rx, tx = wg.transfer(box)
    """

    def __init__(
        self,
        server: Host,
        client: Host,
        endpoint: str,
        *,
        listen_port: int = WG_PORT,
        endpoint_port: int | None = None,
        keepalive: int = KEEPALIVE,
        ready_timeout: float = 10.0,
    ) -> None:
        if server.ns == client.ns:
            raise ThroughputError("server and client must be different hosts")
        self.n = next(_instances)
        net = self.n % 250 + 1
        six = server.ip6 is not None and client.ip6 is not None
        lab = server.lab
        self.server = _Side(
            server,
            lab.ifname(f"wg{self.n}s"),
            f"10.77.{net}.1",
            f"fd00:77:{net:x}::1" if six else None,
            *_wg_keypair(),
        )
        self.client = _Side(
            client,
            lab.ifname(f"wg{self.n}c"),
            f"10.77.{net}.2",
            f"fd00:77:{net:x}::2" if six else None,
            *_wg_keypair(),
        )
        self.endpoint = f"[{endpoint}]" if ":" in endpoint else endpoint
        self.listen_port = listen_port
        self.endpoint_port = endpoint_port or listen_port
        self.keepalive = keepalive
        self.ready_timeout = ready_timeout

    # what the caller uses ------------------------------------------------------------------

    @property
    def server_ip(self) -> str:
        return self.server.ip

    @property
    def client_ip(self) -> str:
        return self.client.ip

    @property
    def server_ip6(self) -> str | None:
        return self.server.ip6

    @property
    def client_ip6(self) -> str | None:
        return self.client.ip6

    @property
    def server_if(self) -> str:
        return self.server.ifname

    @property
    def client_if(self) -> str:
        return self.client.ifname

    def _side(self, host: Host) -> _Side:
        for side in (self.server, self.client):
            if side.host.ns == host.ns:
                return side
        raise ThroughputError(f"{host.name} is not a side of this tunnel")

    def transfer(self, host: Host) -> tuple[int, int]:
        """(received, sent) bytes on ``host``'s wg interface, as ``wg show <if> transfer``
        counts them: whole encrypted datagrams, so more than the TCP payload they carry."""
        side = self._side(host)
        out = host.run(["wg", "show", side.ifname, "transfer"]).stdout
        rx = tx = 0
        for line in out.splitlines():
            fields = line.split()
            if len(fields) == 3:
                rx, tx = rx + int(fields[1]), tx + int(fields[2])
        return rx, tx

    def latest_handshake(self, host: Host) -> int:
        """Unix time of the last handshake ``host``'s side saw (0: none yet)."""
        side = self._side(host)
        out = host.run(["wg", "show", side.ifname, "latest-handshakes"]).stdout.split()
        return int(out[1]) if len(out) >= 2 else 0

    # set-up ----------------------------------------------------------------------------------

    def _start(self, side: _Side) -> None:
        if side.socket.exists():
            raise ThroughputError(f"{side.socket} exists: another wireguard-go owns that name")
        side.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - lives until close()
        side.proc = side.host.popen(
            ["wireguard-go", "-f", side.ifname], stdout=side.log, stderr=subprocess.STDOUT
        )

    def _wait_device(self, side: _Side, deadline: float) -> None:
        assert side.proc is not None and side.log is not None
        while True:
            if side.proc.poll() is not None:
                raise ThroughputError(
                    f"wireguard-go {side.ifname} exited {side.proc.returncode}:\n{_read(side.log)}"
                )
            shown = side.host.run(["ip", "link", "show", side.ifname], check=False, timeout=5)
            if shown.returncode == 0 and side.socket.exists():
                return
            if time.monotonic() > deadline:
                raise ThroughputError(f"wireguard-go {side.ifname} did not come up")
            time.sleep(0.02)

    def _configure(self, side: _Side, peer: _Side, endpoint: str | None) -> None:
        allowed = f"{peer.ip}/32" + (f",{peer.ip6}/128" if peer.ip6 else "")
        args = ["wg", "set", side.ifname, "private-key", "/dev/stdin"]
        if side is self.server:
            args += ["listen-port", str(self.listen_port)]
        args += ["peer", peer.public, "allowed-ips", allowed]
        args += ["persistent-keepalive", str(self.keepalive)]
        if endpoint:
            args += ["endpoint", endpoint]
        side.host.run(args, input=side.private + "\n")
        batch = [f"addr add {side.ip}/24 dev {side.ifname}"]
        if side.ip6:
            batch.append(f"addr add {side.ip6}/64 dev {side.ifname} nodad")
        batch.append(f"link set {side.ifname} up")
        side.host.run(["ip", "-batch", "-"], input="\n".join(batch) + "\n")

    def __enter__(self) -> WireguardGo:
        try:
            deadline = time.monotonic() + self.ready_timeout
            for side in (self.server, self.client):
                self._start(side)
            for side in (self.server, self.client):
                self._wait_device(side, deadline)
            self._configure(self.server, self.client, None)
            self._configure(self.client, self.server, f"{self.endpoint}:{self.endpoint_port}")
            left = max(1.0, deadline - time.monotonic())
            reach = self.client.host.run(
                [PYTHON, "-c", REACH, self.server.ip, f"{left:.1f}"], timeout=left + 10
            ).stdout.strip()
            if reach != "ok":
                raise ThroughputError(
                    f"no answer through wireguard-go from {self.server.ip} in "
                    f"{self.ready_timeout} s\n{self._logs()}"
                )
        except BaseException:
            with contextlib.suppress(ThroughputError):
                self.close()  # the set-up error is the one to report
            raise
        return self

    def _logs(self) -> str:
        out = []
        for side in (self.server, self.client):
            show = side.host.run(["wg", "show", side.ifname], check=False, timeout=5)
            log = _read(side.log) if side.log else ""
            out.append(f"--- {side.ifname} in {side.host.name}\n{show.stdout}{show.stderr}{log}")
        return "\n".join(out)

    # teardown --------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop both processes (by PID), then delete the interfaces and control sockets they
        left, by name. Raises :class:`ThroughputError` if something survived."""
        problems = []
        for side in (self.client, self.server):
            if side.proc is not None:
                try:
                    _stop(side.proc)
                except subprocess.TimeoutExpired:
                    problems.append(f"wireguard-go {side.proc.pid} survived SIGKILL")
        for side in (self.client, self.server):
            if side.proc is None:
                continue  # never started: nothing of ours to delete
            shown = side.host.run(["ip", "link", "show", side.ifname], check=False, timeout=5)
            if shown.returncode == 0:
                side.host.run(["ip", "link", "del", side.ifname], check=False, timeout=5)
                again = side.host.run(["ip", "link", "show", side.ifname], check=False)
                if again.returncode == 0:
                    problems.append(f"{side.ifname} survived in {side.host.ns}")
            with contextlib.suppress(FileNotFoundError):
                side.socket.unlink()  # left behind only if the process was killed
            if side.log is not None:
                side.log.close()
            side.proc = None
        if problems:
            raise ThroughputError("; ".join(problems))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
        else:
            with contextlib.suppress(ThroughputError):
                self.close()  # do not hide the exception that brought us here
