"""Why is this device relayed? Plain-language reasons, each with one fix, from two netchecks.

The box and the device each run a netcheck (``transport.netcheck``); :class:`NatFacts` is the
part of a report that decides whether hole punching can work: the NAT type, whether UDP gets
out at all, whether IPv6 works, and (box side) whether the router holds a port mapping for the
box (PCP / NAT-PMP / UPnP, ``transport.portmap``). :func:`explain_relay` turns two of them into
a list of :class:`Reason`: empty when ``docs/nat-matrix.md`` predicts a direct path for the
pair, at least one reason where it predicts ``relay``. ``tests/transport/test_explain.py``
parses that document's tables and checks every cell, so this module and the grid cannot drift.

The rule, from the grid ("Why each cell is what it is"):

1. No UDP on either side: relay over TCP, whatever else is true.
2. Both sides have IPv6: IPv6 is not translated, stateful IPv6 firewalls open to simultaneous
   probes (RFC 6092), so the pair goes direct over IPv6.
3. The box has a port mapping: the box behaves like a public host with an endpoint-independent
   mapping (RFC 6887 section 11), every device that can send UDP reaches it.
4. Otherwise a pair fails exactly when one side's mapping is symmetric (NAT4: a new public port
   per destination, RFC 4787 section 4.1) and the other side's filter admits only the exact
   address and port it sent to (NAT3, NAT4, or a public address behind a port-restricting
   stateful firewall, which counts as NAT3).

A side whose NAT type is unknown (not measured yet, or not measurable with the servers it had)
is tried as every type: if some type would relay, the unknown is the reason given, since
nothing more precise can honestly be said.

Pure functions, no I/O, no Django: the console and the client's ``netcheck`` command use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transport.netcheck import Filtering, NatType

__all__ = ["BOX_PORT", "NatFacts", "Reason", "describe_nat", "explain_relay", "relays"]

# The UDP port the box's tunnel listens on: what an owner forwards on the router by hand.
BOX_PORT = 7483

_PLAIN = {
    NatType.OPEN: "No NAT: a public address, reachable directly",
    NatType.NAT1: "Full cone NAT (NAT1): anyone who knows the address can reach it",
    NatType.NAT2: "Restricted cone NAT (NAT2): direct connections work with every kind of NAT",
    NatType.NAT3: (
        "Port-restricted cone NAT (NAT3): direct with most networks, relayed with symmetric NATs"
    ),
    NatType.NAT4: (
        "Symmetric NAT (NAT4): a new public port for every peer; direct only with open or "
        "cone (NAT1, NAT2) networks"
    ),
    NatType.BLOCKED: "UDP is blocked: only the relay over TCP works",
    NatType.UNKNOWN: "Unknown: the STUN servers that answered could not tell",
}

_SYMMETRIC = NatType.NAT4
# Filters that admit only the exact address and port they sent to: a symmetric peer's probes,
# which come from a port nobody saw before, never get through them.
_PORT_RESTRICTING = frozenset({NatType.NAT3, NatType.NAT4})
_ALL_TYPES = (NatType.OPEN, NatType.NAT1, NatType.NAT2, NatType.NAT3, NatType.NAT4)


def describe_nat(nat_type: NatType | str | None) -> str:
    """The NAT type in plain words for the console ("Symmetric NAT (NAT4): …")."""
    if nat_type is None:
        return "Not measured yet"
    try:
        return _PLAIN[NatType(nat_type)]
    except ValueError:
        return _PLAIN[NatType.UNKNOWN]


def _section(report: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = report.get(key)
    return value if isinstance(value, Mapping) else {}


@dataclass(frozen=True)
class NatFacts:
    """What one side's netcheck says about its chances of a direct path.

    ``firewall``: a public address (``open``) whose stateful firewall filters inbound per
    address and port: it behaves like NAT3 (docs/nat-matrix.md, row FIREWALL). ``measured``:
    False when no report exists yet (the type is then UNKNOWN).
    """

    nat_type: NatType = NatType.UNKNOWN
    udp_blocked: bool = False
    ipv6: bool = False
    port_mapping: bool = False
    firewall: bool = False
    measured: bool = True

    @classmethod
    def not_measured(cls) -> NatFacts:
        return cls(measured=False)

    @classmethod
    def from_report(
        cls, report: Mapping[str, Any] | None, *, port_mapping: bool = False
    ) -> NatFacts:
        """From ``NetcheckReport.to_json()`` (as stored). Missing or malformed parts count
        as unknown, never as an error: reports come from devices."""
        if not isinstance(report, Mapping):
            return cls(measured=False, port_mapping=port_mapping)
        ipv4, ipv6 = _section(report, "ipv4"), _section(report, "ipv6")
        tested = bool(ipv4.get("tested")) or bool(ipv6.get("tested"))
        try:
            nat_type = NatType(str(report.get("nat_type")))
        except ValueError:
            nat_type = NatType.UNKNOWN
        udp_blocked = (report.get("udp") is False and tested) or nat_type is NatType.BLOCKED
        if udp_blocked:
            nat_type = NatType.BLOCKED
        firewall = (
            nat_type is NatType.OPEN
            and ipv4.get("filtering") is not None
            and ipv4.get("filtering") != str(Filtering.ENDPOINT_INDEPENDENT)
        )
        return cls(
            nat_type=nat_type,
            udp_blocked=udp_blocked,
            ipv6=bool(ipv6.get("reachable")),
            port_mapping=port_mapping,
            firewall=firewall,
        )

    @property
    def blocked(self) -> bool:
        return self.udp_blocked or self.nat_type is NatType.BLOCKED

    def candidates(self) -> tuple[NatType, ...]:
        """The types this side may have, as the grid sees them (a firewall counts as NAT3)."""
        if self.nat_type is NatType.UNKNOWN:
            return _ALL_TYPES
        if self.nat_type is NatType.OPEN and self.firewall:
            return (NatType.NAT3,)
        return (self.nat_type,)


@dataclass(frozen=True)
class Reason:
    """One cause of the relayed path, as a sentence, and the one thing that would fix it."""

    text: str
    fix: str


def _pair_relays(box: NatType, device: NatType) -> bool:
    """docs/nat-matrix.md's rule for two UDP-capable IPv4 sides without a port mapping."""
    return (box is _SYMMETRIC and device in _PORT_RESTRICTING) or (
        device is _SYMMETRIC and box in _PORT_RESTRICTING
    )


def relays(box: NatFacts, device: NatFacts) -> bool:
    """Whether the pair is expected to stay on the relay (some possible type would relay)."""
    return bool(explain_relay(box, device))


def _forward_fix(port: int) -> str:
    return f"Enable UPnP or NAT-PMP on the box's router, or forward UDP port {port} to the box."


def _kind(facts: NatFacts) -> str:
    if facts.nat_type is NatType.OPEN and facts.firewall:
        return "a public address behind a firewall that only admits replies (like NAT3)"
    return {
        NatType.OPEN: "no NAT",
        NatType.NAT1: "a full cone NAT (NAT1)",
        NatType.NAT2: "a restricted cone NAT (NAT2)",
        NatType.NAT3: "a port-restricted cone NAT (NAT3)",
        NatType.NAT4: "a symmetric NAT (NAT4)",
    }.get(facts.nat_type, "an unknown NAT")


def _unknown(side: str, facts: NatFacts, port: int) -> Reason:
    if side == "box":
        text = (
            "The box's network has not been checked yet."
            if not facts.measured
            else "The box's NAT type could not be measured (no STUN server could tell how its "
            "router filters)."
        )
        return Reason(
            text,
            "Press “Check now” on the dashboard; if it stays unknown, enable UPnP or NAT-PMP on "
            f"the box's router, or forward UDP port {port} to the box.",
        )
    text = (
        "The device's network is not measured yet: it has not reported a network check."
        if not facts.measured
        else "The device's NAT type could not be measured."
    )
    return Reason(
        text, "Update the lazycat client on the device; it reports its network when it connects."
    )


def explain_relay(box: NatFacts, device: NatFacts, *, box_port: int = BOX_PORT) -> list[Reason]:
    """Why the pair is expected to be relayed; ``[]`` when a direct path is expected."""
    reasons = []
    if device.blocked:
        reasons.append(
            Reason(
                "UDP is blocked on the device's network.",
                "The device uses the relay over TCP; allow outbound UDP on that network for a "
                "direct path.",
            )
        )
    if box.blocked:
        reasons.append(
            Reason(
                "UDP is blocked on the box's network.",
                "Allow outbound UDP from the box (its firewall and its router); until then every "
                "device reaches it through the relay over TCP.",
            )
        )
    if reasons:
        return reasons
    if box.ipv6 and device.ipv6:
        return []  # direct-v6: IPv6 is not translated
    if box.port_mapping:
        return []  # the box is an open door at its mapped address

    box_types, device_types = box.candidates(), device.candidates()
    if not any(_pair_relays(b, d) for b in box_types for d in device_types):
        return []
    if len(box_types) > 1:
        reasons.append(_unknown("box", box, box_port))
    if len(device_types) > 1:
        reasons.append(_unknown("device", device, box_port))
    if reasons:
        return reasons

    (b,), (d,) = box_types, device_types
    if b is _SYMMETRIC and d is _SYMMETRIC:
        return [
            Reason(
                "Both sides are behind symmetric NATs (NAT4): each uses a new public port for "
                "every peer, so neither side's probes reach the other, and the box has no port "
                "mapping.",
                _forward_fix(box_port) + " A port mapping on the box makes every device direct.",
            )
        ]
    if b is _SYMMETRIC:
        return [
            Reason(
                "Your NAT is symmetric (NAT4) and the box has no port mapping; the device is "
                f"behind {_kind(device)}, which only admits the exact address it sent to.",
                _forward_fix(box_port),
            )
        ]
    return [
        Reason(
            f"The device is behind a symmetric NAT (NAT4) and the box is behind {_kind(box)}, "
            "which only admits the exact address it sent to; the box has no port mapping.",
            _forward_fix(box_port) + " Or connect the device over IPv6 or another network.",
        )
    ]
