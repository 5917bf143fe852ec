"""What the box exposes to devices, as data: services, their targets, ports and allowed devices,
and the nftables ruleset that enforces it. Pure: no IO (``transport.exposure_linux`` applies it,
``transport.forwarder_aio`` carries the flows the kernel cannot NAT). ``docs/forwarding.md`` is
the page for people; this docstring is the contract for code.

A device's packet leaves its Noise session into the TUN ``lzc0`` (transportd has already checked
that its source is the device's own overlay address: cryptokey routing). If its destination is a
service address it takes one of two paths, chosen by :func:`uses_nat66`::

    IPv6 target (not loopback)   lzc0 -> [svc_pre: access + ports] -> DNAT to the target, port
                                 kept -> forward -> masquerade on the way out -> the LAN
    IPv4 target, or loopback     lzc0 -> [svc_pre: access + ports] -> TPROXY to [::]:tproxy_port,
                                 mark -> policy route "local ::/0" -> the forwarder's socket,
                                 which connects to (target, the original port)

Every packet from ``lzc0`` to a service address — not only the first of a connection — passes
``svc_pre`` (a filter chain at prerouting, priority mangle, so before DNAT rewrites anything):
its (service, source) pair must be in the ``access`` set and its (service, protocol, port) in the
``ports`` interval set, or it is rejected there: ``tcp reset`` for TCP, ICMPv6 administratively
prohibited (RFC 4443 sec. 3.1, code 1) for anything else. So a device without access sees a
refused connection, not a hang, and revoking a device stops its open connections at their next
packet. Only TCP and UDP reach a service; ICMP errors *related* to an accepted flow pass.

``lzc_forward`` keeps the box from being a router: from ``lzc0`` only lzc0 -> lzc0 (device to
device) and DNAT'd service flows pass; anything else from a device to another interface is
rejected, and nothing new enters ``lzc0`` from another interface (forwarding is switched on for
NAT66, and must not expose devices to the LAN).

The whole table is replaced in one ``nft -f`` transaction (``add table``; ``delete table``;
``table { ... }``): the kernel applies it atomically, so there is no instant without rules, and
existing NAT bindings (they live in conntrack, not in the table) survive for flows that are still
allowed. Chain names avoid nft keywords (``fwd``, ``nat``, ``forward`` would be read as syntax).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from transport.addressing import OVERLAY, Role
from transport.ports import MAX_PORT, MIN_PORT, Range

__all__ = [
    "Exposure",
    "ExposureError",
    "allows",
    "revoked",
    "ruleset",
    "uses_nat66",
]

_IFNAME = re.compile(r"[A-Za-z0-9_.\-]{1,15}")  # IFNAMSIZ - 1; nothing nft would parse as syntax
_TABLE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")
# Bits 64-79 of an overlay address carry its role; 2 is a service (docs/addressing.md).
_ROLE_MASK = IPv6Address(0xFFFF << 48)
_ROLE_SERVICE = IPv6Address(int(Role.SERVICE) << 48)


class ExposureError(RuntimeError):
    """Forwarding cannot be set up as asked; the message says what to fix."""


@dataclass(frozen=True)
class Exposure:
    """One service as the forwarding layer sees it.

    ``tcp``/``udp`` are the effective ranges (``PortPolicy.effective_ranges``): merged, sorted,
    inclusive. ``devices`` are the overlay addresses allowed to reach it; the caller expands
    "every approved device" into the list, so this layer never has to know who is approved.
    """

    name: str
    address: IPv6Address
    target: IPv4Address | IPv6Address
    tcp: tuple[Range, ...]
    udp: tuple[Range, ...]
    devices: frozenset[IPv6Address]

    def __post_init__(self) -> None:
        if not isinstance(self.address, IPv6Address):
            raise ExposureError(f"{self.name}: the overlay address must be IPv6")
        if self.address.is_loopback or self.address.is_unspecified or self.address.is_multicast:
            raise ExposureError(f"{self.name}: {self.address} cannot be a service address")
        t = self.target
        if t.is_unspecified or t.is_multicast or (isinstance(t, IPv6Address) and t.is_link_local):
            # A link-local target would need an interface scope the data model does not carry.
            raise ExposureError(f"{self.name}: {t} cannot be a target")
        for proto, ranges in (("tcp", self.tcp), ("udp", self.udp)):
            for first, last in ranges:
                if not MIN_PORT <= first <= last <= MAX_PORT:
                    raise ExposureError(f"{self.name}: {proto} {first}-{last} is not a port range")

    def allows(self, device: IPv6Address, proto: str, port: int) -> bool:
        """True when ``device`` may reach ``port`` (``proto`` "tcp"/"udp") of this service."""
        return allows(self, device, proto, port)


def allows(e: Exposure, device: IPv6Address, proto: str, port: int) -> bool:
    if device not in e.devices:
        return False
    ranges = e.tcp if proto == "tcp" else e.udp if proto == "udp" else ()
    return any(first <= port <= last for first, last in ranges)


def uses_nat66(e: Exposure) -> bool:
    """True: the kernel routes and NATs the flows (an IPv6 target the box can forward to).
    False: the userspace forwarder carries them — an IPv4-only target (NAT64 would need a
    translator we do not want), or a loopback target (the kernel refuses to route a packet from
    another interface to ``::1``, RFC 4291 sec. 2.5.3)."""
    t = e.target
    return isinstance(t, IPv6Address) and not t.is_loopback and t.ipv4_mapped is None


def _covers(wide: Sequence[Range], narrow: Sequence[Range]) -> bool:
    """True when every port of ``narrow`` is inside ``wide``."""
    merged: list[Range] = []
    for first, last in sorted(wide):  # join touching ranges: (1, 9) + (10, 20) covers (5, 15)
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return all(any(a <= first and last <= b for a, b in merged) for first, last in narrow)


def revoked(
    old: Sequence[Exposure], new: Sequence[Exposure]
) -> set[tuple[IPv6Address, IPv6Address]]:
    """(service address, device address) pairs whose open flows must end when ``new`` replaces
    ``old``: the device lost access, or the service went away, or — kept simple on purpose — the
    service's ports narrowed or its target changed, in which case every flow of the pair counts
    as revoked (the device reconnects where it still may; per-port bookkeeping of conntrack
    entries would buy little)."""
    by_address = {e.address: e for e in new}
    out: set[tuple[IPv6Address, IPv6Address]] = set()
    for e in old:
        now = by_address.get(e.address)
        whole = (
            now is None
            or now.target != e.target
            or not _covers(now.tcp, e.tcp)
            or not _covers(now.udp, e.udp)
        )
        for device in e.devices:
            if whole or now is None or device not in now.devices:
                out.add((e.address, device))
    return out


def _check_unique(exposures: Sequence[Exposure]) -> None:
    seen: dict[IPv6Address, str] = {}
    for e in exposures:
        if e.address in seen:
            raise ExposureError(f"{e.name} and {seen[e.address]} share the address {e.address}")
        seen[e.address] = e.name


def _port(r: Range) -> str:
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


def _elements(items: Iterable[str]) -> str:
    """A set's ``elements = { ... }`` line, or nothing: nft refuses an empty element list."""
    listed = sorted(set(items))
    if not listed:
        return ""
    return "\t\telements = { " + ", ".join(listed) + " }\n"


def ruleset(
    exposures: Sequence[Exposure],
    *,
    tun: str,
    table: str = "lazycat",
    tproxy_port: int,
    mark: int,
    refuse_forwarder: bool = False,
    refuse_nat66: bool = False,
) -> str:
    """The ``nft -f`` text that replaces ``table inet <table>`` with the state ``exposures``
    describe, in one transaction. Raises :class:`ExposureError` on bad names or numbers.

    ``refuse_forwarder`` / ``refuse_nat66``: that path is broken (the forwarder cannot listen,
    the policy route or the forwarding sysctl cannot be set), so its services are refused like a
    device without access — a RST or admin-prohibited, never a hang — while access to the other
    path is still enforced (fail closed). NAT66 flows are marked ``ct mark |= mark`` so that
    conntrack can be asked for them alone (``CTA_MARK`` dump filter)."""
    if not _IFNAME.fullmatch(tun):
        raise ExposureError(f"{tun!r} is not an interface name")
    if not _TABLE.fullmatch(table):
        raise ExposureError(f"{table!r} is not a table name: use letters, digits and _")
    if not MIN_PORT <= tproxy_port <= MAX_PORT:
        raise ExposureError(f"tproxy port {tproxy_port} is out of range")
    if not 0 < mark <= 0xFFFFFFFF:
        raise ExposureError(f"mark {mark:#x} must be a non-zero 32-bit value")
    _check_unique(exposures)
    ordered = sorted(exposures, key=lambda e: e.address)
    nat66 = [e for e in ordered if uses_nat66(e)]
    proxied = [e for e in ordered if not uses_nat66(e)]
    iif = f'iifname "{tun}"'
    m = f"{mark:#x}"

    services = _elements(str(e.address) for e in ordered)
    nat_set = _elements(str(e.address) for e in nat66)
    access = _elements(f"{e.address} . {d}" for e in ordered for d in e.devices)
    ports = _elements(
        f"{e.address} . {proto} . {_port(r)}"
        for e in ordered
        for proto, ranges in (("tcp", e.tcp), ("udp", e.udp))
        for r in ranges
    )
    names = "".join(
        f"# {e.address} {_COMMENT_UNSAFE.sub('_', e.name)[:63]} -> {e.target}"
        f" ({'nat66' if uses_nat66(e) else 'forwarder'})\n"
        for e in ordered
    )

    out = [
        f"# lazycat service forwarding: {len(ordered)} service(s); see docs/forwarding.md\n",
        names,
        # Create-then-delete makes the delete succeed whether or not the table existed; the
        # definition that follows is part of the same transaction (nft -f is atomic).
        f"add table inet {table}\n",
        f"delete table inet {table}\n",
        f"table inet {table} {{\n",
        f"\tset services {{\n\t\ttype ipv6_addr\n{services}\t}}\n",
        f"\tset nat66 {{\n\t\ttype ipv6_addr\n{nat_set}\t}}\n",
        f"\tset access {{\n\t\ttype ipv6_addr . ipv6_addr\n{access}\t}}\n",
        "\tset ports {\n\t\ttype ipv6_addr . inet_proto . inet_service\n"
        f"\t\tflags interval\n{ports}\t}}\n",
        # Every packet from a device to a service address, before DNAT (mangle < dstnat).
        "\tchain svc_pre {\n",
        "\t\ttype filter hook prerouting priority mangle; policy accept;\n",
        f'\t\tiifname != "{tun}" return\n',
        # An address of the service role (docs/addressing.md) that is no service (any more):
        # refused, so a device holding a stale name record is told at once.
        f"\t\tip6 daddr != @services ip6 daddr {OVERLAY}"
        f" ip6 daddr & {_ROLE_MASK} == {_ROLE_SERVICE} goto svc_deny\n",
        "\t\tip6 daddr != @services return\n",
        # Access first, for every packet, related ones too: conntrack relates an ICMPv6 error to
        # the flow its payload quotes whoever sends it, so another device could otherwise push
        # errors into a flow it has no access to.
        "\t\tip6 daddr . ip6 saddr != @access goto svc_deny\n",
    ]
    if refuse_nat66:
        out.append("\t\tip6 daddr @nat66 goto svc_deny\n")
    else:
        # ICMPv6 errors about an accepted flow (RFC 4443 sec. 2.4): conntrack links them to it.
        out.append("\t\tct state related ip6 daddr @nat66 accept\n")
    if proxied and not refuse_forwarder:
        out.append(f"\t\tct state related meta mark set {m} accept\n")
    out += [
        "\t\tmeta l4proto != { tcp, udp } goto svc_deny\n",
        "\t\tip6 daddr . meta l4proto . th dport != @ports goto svc_deny\n",
        "\t\tip6 daddr @nat66 accept\n",
    ]
    if proxied and not refuse_forwarder:
        # The mark routes the packet to the local stack (ip -6 rule fwmark -> local ::/0), where
        # the socket TPROXY chose receives it with its original destination address and port.
        # If no socket is listening, tproxy does not match and the packet falls to svc_deny.
        out += [
            f"\t\tmeta l4proto tcp meta mark set {m} tproxy ip6 to :{tproxy_port} accept\n",
            f"\t\tmeta l4proto udp meta mark set {m} tproxy ip6 to :{tproxy_port} accept\n",
        ]
    out += [
        "\t\tgoto svc_deny\n",
        "\t}\n",
        "\tchain svc_deny {\n",
        "\t\tmeta l4proto tcp reject with tcp reset\n",
        "\t\treject with icmpx admin-prohibited\n",
        "\t}\n",
    ]
    if nat66:
        dnat_map = ", ".join(f"{e.address} : {e.target}" for e in nat66)
        out += [
            "\tchain nat66_in {\n",
            "\t\ttype nat hook prerouting priority dstnat; policy accept;\n",
            # svc_pre let only allowed TCP/UDP through; the destination port is kept.
            # The ct mark (other bits kept) lets flows() ask conntrack for these flows alone.
            f"\t\t{iif} ip6 daddr @nat66 ct mark set ct mark or {m}"
            f" dnat ip6 to ip6 daddr map {{ {dnat_map} }}\n",
            "\t}\n",
            "\tchain nat66_out {\n",
            "\t\ttype nat hook postrouting priority srcnat; policy accept;\n",
            # The target answers the box's LAN address, so replies come back through conntrack
            # (and the box) even though the target has no route to the overlay.
            f'\t\tct status dnat ct original ip6 daddr @nat66 oifname != "{tun}" masquerade\n',
            "\t}\n",
        ]
    out += [
        "\tchain lzc_forward {\n",
        "\t\ttype filter hook forward priority filter; policy accept;\n",
        f'\t\t{iif} oifname "{tun}" accept\n',
        f"\t\t{iif} ct status dnat ct original ip6 daddr @nat66 accept\n",
        f"\t\t{iif} meta l4proto tcp reject with tcp reset\n",
        f"\t\t{iif} reject with icmpx admin-prohibited\n",
        f'\t\toifname "{tun}" ct state established,related accept\n',
        f'\t\toifname "{tun}" drop\n',
        "\t}\n",
        "}\n",
    ]
    return "".join(out)
