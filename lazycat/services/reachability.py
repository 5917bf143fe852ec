"""Can the box reach a service's target? A quick check the console runs when a service is saved.

The box probes the target on the ports the service exposes, from the box itself (the same
vantage point the forwarding uses), and turns the outcomes into one sentence the owner can act
on: "reachable (tcp 22, 80 open)", or what is wrong and what to try.

Which ports. A small policy (at most ``max_ports`` ports in all) is checked port by port, and
then every TCP port the owner listed is expected to accept. A big one — a developer VM's "all
ports", or a range like ``tcp 8000-8100`` — is *sampled*: first the well-known ports inside the
policy (``SAMPLE_TCP`` / ``SAMPLE_UDP``: SSH, HTTP, HTTPS, RDP, VNC, alternative HTTP, DNS),
then the first port of each open range, up to ``max_ports``. For a sample, one open port is
enough to call the target reachable: nobody expects all 65535 ports of a VM to listen, and a
refused port still proves the host is up (its kernel answered with a RST).

How. TCP: a plain ``connect()`` with a timeout; it is open when the handshake completes,
refused on a RST (ECONNREFUSED), and silent when the timeout passes. UDP has no handshake: a
*connected* UDP socket sends one empty datagram; if the host answers with ICMP port unreachable,
Linux reports it on the socket's next ``recv()`` as ECONNREFUSED (closed), a reply datagram means
something answered, and silence proves nothing — many UDP services ignore an empty datagram — so
it is reported as "no answer — UDP cannot confirm". ENETUNREACH means the box has no route to
the target; EHOSTUNREACH that the neighbour (ARP / NDP) lookup on the LAN failed or a router
said so. All probes run at once (a bounded thread pool), so a check takes at most about
``timeout`` seconds whatever the number of ports.

No Django here: ``check()`` takes an address and a :class:`transport.ports.PortPolicy` and
returns a :class:`Result`; ``lazycat.services.actions.do_check_service`` stores it.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from enum import StrEnum
from ipaddress import ip_address
from typing import Any

from transport.ports import PortPolicy

MAX_PORTS = 12  # probes per check: enough for a sample, few enough to be gentle on the target
MAX_WORKERS = 16  # concurrent probes (threads); each holds one socket for at most `timeout`
SAMPLE_TCP = (22, 80, 443, 3389, 5900, 8080)  # ssh, http, https, rdp, vnc, alternative http
SAMPLE_UDP = (53,)  # dns: the one UDP service that commonly runs on a developer host

# What usually listens on a port, for "is sshd listening on that port?".
LISTENERS = {
    22: "sshd",
    80: "a web server",
    443: "a web server",
    8080: "a web server",
    3389: "an RDP server",
    5900: "a VNC server",
    53: "a DNS server",
}


class Outcome(StrEnum):
    OPEN = "open"  # tcp: the handshake completed
    ANSWERED = "answered"  # udp: a datagram came back
    REFUSED = "refused"  # tcp RST, or udp ICMP port unreachable
    TIMEOUT = "timeout"  # tcp: no answer within the timeout
    SILENT = "silent"  # udp: no answer (which proves nothing)
    NO_ROUTE = "no-route"  # ENETUNREACH: the box has no route to the target
    HOST_UNREACHABLE = "host-unreachable"  # EHOSTUNREACH: nobody has the address on the LAN
    ERROR = "error"  # anything else; `detail` says what


class State(StrEnum):
    """The verdict. ``UNCONFIRMED``: only UDP was checked and nothing answered or refused."""

    OK = "ok"
    PROBLEM = "problem"
    UNCONFIRMED = "unconfirmed"


@dataclass(frozen=True)
class Probe:
    proto: str
    port: int
    outcome: Outcome
    ms: float  # how long the probe took
    detail: str = ""  # the OS error for Outcome.ERROR

    @property
    def text(self) -> str:
        return f"{self.proto} {self.port}"


@dataclass(frozen=True)
class Result:
    target: str
    state: State
    summary: str
    probes: tuple[Probe, ...]
    sampled: bool  # True when the policy was too big to check every port
    timeout: float = 2.0

    def to_json(self) -> dict[str, Any]:
        """The details a model stores in a JSONField."""
        return {
            "target": self.target,
            "state": str(self.state),
            "sampled": self.sampled,
            "timeout": self.timeout,
            "probes": [{**asdict(p), "outcome": str(p.outcome)} for p in self.probes],
        }


def ports_to_check(
    policy: PortPolicy, max_ports: int = MAX_PORTS
) -> tuple[list[tuple[str, int]], bool]:
    """The (proto, port) pairs to probe and whether they are a sample (see the module doc)."""
    ranges = {proto: policy.effective_ranges(proto) for proto in ("tcp", "udp")}
    total = sum(last - first + 1 for rs in ranges.values() for first, last in rs)
    if total <= max_ports:
        every = [(p, port) for p, rs in ranges.items() for a, b in rs for port in range(a, b + 1)]
        return every, False
    chosen: list[tuple[str, int]] = []

    def add(proto: str, port: int) -> None:
        if (proto, port) not in chosen and len(chosen) < max_ports:
            chosen.append((proto, port))

    for proto, wanted in (("tcp", SAMPLE_TCP), ("udp", SAMPLE_UDP)):
        for port in wanted:
            if policy.allows(proto, port):
                add(proto, port)
    for proto in ("tcp", "udp"):
        for first, _ in ranges[proto]:
            add(proto, first)
    return chosen, True


def _classify(exc: OSError) -> tuple[Outcome, str]:
    if isinstance(exc, ConnectionRefusedError):
        return Outcome.REFUSED, ""
    if isinstance(exc, TimeoutError):
        return Outcome.TIMEOUT, ""
    if exc.errno == errno.ENETUNREACH:
        return Outcome.NO_ROUTE, ""
    if exc.errno == errno.EHOSTUNREACH:
        return Outcome.HOST_UNREACHABLE, ""
    return Outcome.ERROR, exc.strerror or str(exc)


def probe_tcp(target: str, port: int, timeout: float) -> Probe:
    started = time.monotonic()
    family = socket.AF_INET6 if ip_address(target).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((target, port))
        except OSError as exc:
            outcome, detail = _classify(exc)
        else:
            outcome, detail = Outcome.OPEN, ""
    return Probe("tcp", port, outcome, round((time.monotonic() - started) * 1000, 1), detail)


def probe_udp(target: str, port: int, timeout: float) -> Probe:
    started = time.monotonic()
    family = socket.AF_INET6 if ip_address(target).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            # connect() makes the kernel deliver the ICMP error for this flow to this socket.
            sock.connect((target, port))
            sock.send(b"")
            sock.recv(2048)
        except TimeoutError:
            outcome, detail = Outcome.SILENT, ""
        except OSError as exc:
            outcome, detail = _classify(exc)
        else:
            outcome, detail = Outcome.ANSWERED, ""
    return Probe("udp", port, outcome, round((time.monotonic() - started) * 1000, 1), detail)


def check(
    target: str,
    policy: PortPolicy,
    *,
    timeout: float = 2.0,
    max_ports: int = MAX_PORTS,
    subject: str = "the service",
) -> Result:
    """Probe `target` on (a sample of) the policy's ports; `subject` names what should be
    running there in the advice ("the VM", "the app")."""
    pairs, sampled = ports_to_check(policy, max_ports)
    workers = max(1, min(MAX_WORKERS, len(pairs)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reachability") as pool:
        futures = [
            pool.submit(probe_tcp if proto == "tcp" else probe_udp, target, port, timeout)
            for proto, port in pairs
        ]
        probes = tuple(f.result() for f in futures)
    state, summary = summarise(target, probes, sampled=sampled, timeout=timeout, subject=subject)
    return Result(target, state, summary, probes, sampled, timeout)


def _ports(probes: Sequence[Probe]) -> str:
    """'tcp 22, 80; udp 53' — the ports of some probes, grouped by protocol."""
    parts = []
    for proto in ("tcp", "udp"):
        ports = [str(p.port) for p in probes if p.proto == proto]
        if ports:
            parts.append(f"{proto} {', '.join(ports)}")
    return "; ".join(parts)


def _seconds(timeout: float) -> str:
    return f"{timeout:g} s"


def _that_port(probes: Sequence[Probe]) -> str:
    return "that port" if len(probes) == 1 else "those ports"


def _listener(probes: Sequence[Probe]) -> str:
    if len(probes) == 1:
        return LISTENERS.get(probes[0].port, "the service")
    return "anything"


def summarise(
    target: str,
    probes: Sequence[Probe],
    *,
    sampled: bool,
    timeout: float,
    subject: str = "the service",
) -> tuple[State, str]:
    """One sentence: what works, or what is wrong and what to check first."""
    by = {o: [p for p in probes if p.outcome is o] for o in Outcome}
    good = by[Outcome.OPEN] + by[Outcome.ANSWERED]
    # What an explicit policy counts against the target: a TCP port that does not accept, a UDP
    # port that is refused (UDP silence proves nothing either way).
    failed = [
        p for p in probes if p.outcome not in (Outcome.OPEN, Outcome.ANSWERED, Outcome.SILENT)
    ]
    if good and not (failed and not sampled):
        notes = []
        if by[Outcome.SILENT] and not sampled:
            notes.append(f"{_ports(by[Outcome.SILENT])}: no answer — UDP cannot confirm")
        opened = _ports(by[Outcome.OPEN])
        answered = _ports(by[Outcome.ANSWERED])
        said = [f"{opened} open"] if opened else []
        said += [f"{answered} answered"] if answered else []
        tail = f"; {'; '.join(notes)}" if notes else ""
        return State.OK, f"reachable ({', '.join(said)}){tail}"
    if by[Outcome.NO_ROUTE]:
        return State.PROBLEM, f"no route to {target} from the box: is it on the box's LAN?"
    if by[Outcome.HOST_UNREACHABLE]:
        return State.PROBLEM, (
            f"{target} is unreachable from the box (nothing on the LAN has that address): "
            f"is {subject} running, and is the address right?"
        )
    if good:  # an explicit policy with some TCP ports not accepting
        refused = [p for p in failed if p.outcome is Outcome.REFUSED]
        if refused:
            return State.PROBLEM, (
                f"{_ports(by[Outcome.OPEN])} open, but {target} refuses {_ports(refused)}: "
                f"is {_listener(refused)} listening on {_that_port(refused)}?"
            )
        return State.PROBLEM, (
            f"{_ports(by[Outcome.OPEN])} open, but {_ports(failed)} timed out after "
            f"{_seconds(timeout)}: does a firewall on {target} drop {_that_port(failed)}?"
        )
    if by[Outcome.REFUSED]:
        refused = by[Outcome.REFUSED]
        if sampled:
            return State.PROBLEM, (
                f"{target} is up but refuses every port checked ({_ports(refused)}): "
                "is sshd, or whatever you expect there, running?"
            )
        return State.PROBLEM, (
            f"{target} refuses {_ports(refused)}: is {_listener(refused)} listening on "
            f"{_that_port(refused)}?"
        )
    if by[Outcome.TIMEOUT]:
        first = by[Outcome.TIMEOUT][0]
        return State.PROBLEM, (
            f"nothing answers at {target}: is {subject} running? "
            f"({first.text}: timed out after {_seconds(timeout)})"
        )
    if by[Outcome.ERROR]:
        first = by[Outcome.ERROR][0]
        return State.PROBLEM, f"could not check {target} ({first.text}: {first.detail})"
    # Only UDP, and only silence.
    return State.UNCONFIRMED, (
        f"{_ports(by[Outcome.SILENT])}: no answer — UDP cannot confirm (nothing refused it either)"
    )
