"""The negotiation's data and decisions, with no I/O: what crosses the device control socket,
how the box pairs the two sides' candidates, when the simultaneous start is, and how failures
back off.

The device control socket (``docs/negotiation.md``) is a WebSocket the client opens *inside*
the tunnel, to the box's overlay address. Its messages are JSON objects with a ``type``:

client -> box
    ``hello``       ``{"candidates": [...], "network_changed": false, "version": "..."}``:
                    the device's candidates (sent on open and whenever they change).
    ``netcheck``    ``{"report": NetcheckReport.to_json()}``: the device's own network check.

box -> client
    ``punch``       ``{"candidates": [...], "delay": 0.12, "relay": "eu", "attempt": 1}``:
                    the box's candidates, and "start probing them ``delay`` seconds from now".

The device's configuration — the box's ``heiyu.space`` records and a fresh relay ticket — does
not need TCP: it travels as a ``wire.Control`` frame on channel :data:`CONFIG_CHANNEL` of the
Noise session, ``{"type": "config", "records": {name: [address...]}, "ticket": "..."}``. The box
sends it at approval (to the pairing session), when a device connects and when names change; a
device that has not heard it a few seconds after connecting sends an empty frame on the same
channel to ask again (datagrams get lost).

A candidate is ``{"kind": "reflexive", "ip": "203.0.113.7", "port": 41641}`` or
``{"kind": "relay", "relay": "eu"}`` (``transport.paths.Candidate``). Parsers here raise only
:class:`NegotiationError`: the box reads what a device sends, and the device what a box sends.

Timing: the box sends ``punch`` to the device through the tunnel (still on the relay) and to
its own daemon through the channel layer at the same moment. The device hears it about half a
relay round trip later, so the box's daemon starts that much later too (:func:`plan`); the
probe rounds in ``transport/paths.py`` absorb the rest (5 probes over a second).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

from transport.paths import Candidate, CandidateKind, Direct, ViaRelay

CONFIG_CHANNEL = 1  # wire.Control channel of the device's configuration
CONTROL_PORT = 7480  # the box's device control socket (LAZYCAT_CONTROL_PORT); 0: none
CONTROL_PATH = "/control/"
MAX_CANDIDATES = 32  # a device with more addresses than this is lying or misconfigured
MAX_MESSAGE = 16 * 1024  # bytes of one control message
START_BASE = 0.1  # seconds every simultaneous start waits beyond the message's travel
START_MAX = 1.0  # never wait longer than this, whatever the latencies say
UNKNOWN_LATENCY = 0.1  # seconds, a relay's round trip nobody measured
RETRY_FIRST, RETRY_MAX = 5.0, 300.0  # seconds between attempts after a failed one


class NegotiationError(ValueError):
    """A control message or candidate that cannot be used (the text says why)."""


# --- candidates as JSON ---------------------------------------------------------------------


def candidate_to_json(candidate: Candidate) -> dict[str, Any]:
    address = candidate.address
    if isinstance(address, ViaRelay):
        return {"kind": candidate.kind.value, "relay": address.relay}
    out: dict[str, Any] = {"kind": candidate.kind.value, "ip": address.ip, "port": address.port}
    if candidate.priority:
        out["priority"] = candidate.priority
    return out


def candidate_from_json(data: object) -> Candidate:
    if not isinstance(data, dict):
        raise NegotiationError("a candidate is an object")
    try:
        kind = CandidateKind(data.get("kind"))
    except ValueError:
        raise NegotiationError(f"unknown candidate kind {data.get('kind')!r}") from None
    priority = data.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority < 1000:
        raise NegotiationError("a candidate's priority is an integer 0-999")
    if kind is CandidateKind.RELAY:
        relay = data.get("relay")
        if not isinstance(relay, str) or not 0 < len(relay) <= 64:
            raise NegotiationError("a relay candidate names its relay (1-64 characters)")
        return Candidate(kind, ViaRelay(relay), priority)
    ip, port = data.get("ip"), data.get("port")
    if not isinstance(ip, str) or len(ip) > 64:
        raise NegotiationError("a direct candidate has an ip")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port <= 0xFFFF:
        raise NegotiationError("a direct candidate has a port 1-65535")
    try:
        parsed = ip_address(ip)
    except ValueError:
        raise NegotiationError(f"not an IP address: {ip!r}") from None
    if parsed.is_unspecified or parsed.is_multicast or parsed.is_loopback:
        raise NegotiationError(f"{ip} cannot be a candidate")
    return Candidate(kind, Direct(str(parsed), port), priority)


def candidates_to_json(candidates: Iterable[Candidate]) -> list[dict[str, Any]]:
    return [candidate_to_json(c) for c in candidates]


def candidates_from_json(data: object) -> list[Candidate]:
    if not isinstance(data, list):
        raise NegotiationError("candidates are a list")
    if len(data) > MAX_CANDIDATES:
        raise NegotiationError(f"more than {MAX_CANDIDATES} candidates")
    out: list[Candidate] = []
    for item in data:
        candidate = candidate_from_json(item)
        if candidate not in out:
            out.append(candidate)
    return out


# --- the client's messages -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    candidates: tuple[Candidate, ...]
    network_changed: bool = False
    version: str = ""


@dataclass(frozen=True, slots=True)
class NetcheckMessage:
    report: dict[str, Any]


ClientMessage = Hello | NetcheckMessage


def parse_client_message(data: object) -> ClientMessage:
    """A message from a device (already JSON-decoded)."""
    if not isinstance(data, dict):
        raise NegotiationError("a control message is a JSON object")
    kind = data.get("type")
    if kind == "hello":
        changed = data.get("network_changed", False)
        version = data.get("version", "")
        if not isinstance(changed, bool) or not isinstance(version, str):
            raise NegotiationError("hello: network_changed is a boolean, version a string")
        return Hello(tuple(candidates_from_json(data.get("candidates"))), changed, version[:32])
    if kind == "netcheck":
        report = data.get("report")
        if not isinstance(report, dict):
            raise NegotiationError("netcheck: report is an object")
        return NetcheckMessage(report)
    raise NegotiationError(f"unknown control message type {kind!r}")


def hello(
    candidates: Iterable[Candidate], *, network_changed: bool, version: str
) -> dict[str, Any]:
    return {
        "type": "hello",
        "candidates": candidates_to_json(candidates),
        "network_changed": network_changed,
        "version": version,
    }


# --- the box's messages ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Punch:
    candidates: tuple[Candidate, ...]
    delay: float
    relay: str | None = None
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class Config:
    records: dict[str, list[str]]
    ticket: bytes | None = None
    control_port: int = CONTROL_PORT


BoxMessage = Punch | Config


def punch_message(punch: Punch) -> dict[str, Any]:
    return {
        "type": "punch",
        "candidates": candidates_to_json(punch.candidates),
        "delay": round(punch.delay, 4),
        "relay": punch.relay,
        "attempt": punch.attempt,
    }


def config_message(config: Config) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "config",
        "records": config.records,
        "control_port": config.control_port,
    }
    if config.ticket is not None:
        out["ticket"] = base64.urlsafe_b64encode(config.ticket).decode().rstrip("=")
    return out


def parse_box_message(data: object) -> BoxMessage:
    """A message from the box (already JSON-decoded)."""
    if not isinstance(data, dict):
        raise NegotiationError("a control message is a JSON object")
    kind = data.get("type")
    if kind == "punch":
        delay, relay, attempt = data.get("delay"), data.get("relay"), data.get("attempt", 1)
        if not isinstance(delay, int | float) or isinstance(delay, bool):
            raise NegotiationError("punch: delay is a number of seconds")
        if not 0 <= delay <= START_MAX * 10:
            raise NegotiationError("punch: delay out of range")
        if relay is not None and not isinstance(relay, str):
            raise NegotiationError("punch: relay is a name")
        if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
            raise NegotiationError("punch: attempt is a positive integer")
        candidates = tuple(candidates_from_json(data.get("candidates")))
        return Punch(candidates, float(delay), relay, attempt)
    if kind == "config":
        port = data.get("control_port", CONTROL_PORT)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 0xFFFF:
            raise NegotiationError("config: control_port is a port number")
        return Config(parse_records(data.get("records")), _ticket(data.get("ticket")), port)
    raise NegotiationError(f"unknown control message type {kind!r}")


def parse_records(data: object) -> dict[str, list[str]]:
    if not isinstance(data, dict) or len(data) > 4096:
        raise NegotiationError("records are an object of at most 4096 names")
    out: dict[str, list[str]] = {}
    for name, addresses in data.items():
        if not isinstance(name, str) or not 0 < len(name) <= 253:
            raise NegotiationError("a record's name is a DNS name")
        if not isinstance(addresses, list) or not 0 < len(addresses) <= 8:
            raise NegotiationError(f"{name}: a record has 1-8 addresses")
        try:
            parsed = [ip_address(a) for a in addresses if isinstance(a, str)]
        except ValueError:
            raise NegotiationError(f"{name}: not an address") from None
        if len(parsed) != len(addresses) or any(a.version != 6 for a in parsed):
            raise NegotiationError(f"{name}: records are IPv6 addresses")
        out[name.lower().rstrip(".")] = [str(a) for a in parsed]
    return out


def _ticket(data: object) -> bytes | None:
    if data is None:
        return None
    if not isinstance(data, str) or len(data) > 512:
        raise NegotiationError("ticket: base64url text")
    try:
        return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        raise NegotiationError("ticket: not base64url") from None


# --- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """What the box tells each side: the other's candidates and when to start."""

    to_box: tuple[Candidate, ...]  # the device's candidates, for the box's daemon
    to_device: tuple[Candidate, ...]  # the box's candidates, for the device
    relay: str | None  # the relay both sides should use until direct works
    box_delay: float  # seconds after the daemon hears it
    device_delay: float  # seconds after the device hears it


def usable(candidates: Sequence[Candidate], towards: Sequence[Candidate]) -> list[Candidate]:
    """``candidates`` a side with ``towards`` as its own can try: a direct address of a family
    it has (IPv6 only if it has IPv6 itself), relays only if it knows them too."""
    families = {c.address.family for c in towards if isinstance(c.address, Direct)}
    relays = {c.address.relay for c in towards if isinstance(c.address, ViaRelay)}
    out: list[Candidate] = []
    for c in candidates:
        if isinstance(c.address, ViaRelay):
            if not relays or c.address.relay in relays:
                out.append(c)
        elif not families or c.address.family in families or c.address.family == 4:
            # An IPv4 candidate stays even for a side we saw no IPv4 address on: its egress
            # may still reach it through NAT64 or a relay we do not know of.
            out.append(c)
    return out


def choose_relay(
    box_relays: Sequence[str],
    box_latency: Mapping[str, float],
    device_latency: Mapping[str, float],
) -> str | None:
    """The relay with the lowest box -> relay -> device round trip, of those the box is
    registered at (a device reaches the box only through one of them)."""
    best: tuple[float, int, str] | None = None
    for order, name in enumerate(box_relays):
        total = box_latency.get(name, UNKNOWN_LATENCY) + device_latency.get(name, UNKNOWN_LATENCY)
        if best is None or (total, order) < best[:2]:
            best = (total, order, name)
    return None if best is None else best[2]


def plan(
    box: Sequence[Candidate],
    device: Sequence[Candidate],
    *,
    box_latency: Mapping[str, float] | None = None,
    device_latency: Mapping[str, float] | None = None,
) -> Plan:
    """Pair the two sides' candidates and time the simultaneous start.

    The start message reaches the device through the relay — half of box -> relay -> device —
    while it reaches the box's daemon at once; the box waits that much longer so both start
    together (``START_BASE`` covers the rest, the probe round the skew).
    """
    box_latency = box_latency or {}
    device_latency = device_latency or {}
    box_relays = [c.address.relay for c in box if isinstance(c.address, ViaRelay)]
    relay = choose_relay(box_relays, box_latency, device_latency)
    if relay is None:
        travel = UNKNOWN_LATENCY / 2
    else:
        rtt = box_latency.get(relay, UNKNOWN_LATENCY) + device_latency.get(relay, UNKNOWN_LATENCY)
        travel = rtt / 2
    travel = min(travel, START_MAX - START_BASE)
    return Plan(
        to_box=tuple(usable(device, box)),
        to_device=tuple(usable(box, device)),
        relay=relay,
        box_delay=START_BASE + travel,
        device_delay=START_BASE,
    )


def retry_delay(attempt: int) -> float:
    """Seconds before attempt ``attempt + 1`` after ``attempt`` failed: 5, 10, 20 … 300."""
    return float(min(RETRY_MAX, RETRY_FIRST * 2 ** max(0, attempt - 1)))
