"""NAT discovery from one UDP socket (RFC 5780 §4), sans-IO.

:class:`Netcheck` sends STUN Binding requests to a list of servers and relays from the socket
the caller owns (``transport.netcheck_aio`` runs it on its own socket; ``transportd`` can feed
it from the shared one), takes the answers it gets, and produces a :class:`NetcheckReport`:
is UDP reachable, which families work, our reflexive address, how the NAT maps and filters,
the NAT type, relay latencies and hairpinning. ``docs/netcheck.md`` has the decision table.

The tests run in three phases, so that no earlier packet opens the NAT filter a later test
measures:

1. **primary** — a Binding request to every server and relay (their primary addresses). Gives
   reachability per family, the reflexive address, RTTs, and which servers announce an
   OTHER-ADDRESS (RFC 5780 servers; RFC 3489's CHANGED-ADDRESS counts too).
2. **filtering** (RFC 5780 §4.4), per family, with the first RFC 5780 server ``P`` whose other
   address ``O`` differs in IP and port: a request with CHANGE-REQUEST "change IP and port"
   (the answer comes from ``O.ip:O.port``) and one with "change port" (from ``P.ip:O.port``),
   both sent to ``P`` so they contact nothing new. Answer to the first: endpoint-independent
   filtering. Only to the second: address-dependent. Neither: address-and-port-dependent.
   An answer from another source than the expected one means the server ignored the change:
   filtering unknown. If phase 1 already contacted ``O.ip`` (or ``P.ip:O.port``) the test is
   void and skipped: that NAT filter is open already.
3. **mapping** (RFC 5780 §4.3): requests to ``O.ip:P.port`` and ``O.ip:O.port``; then every
   (destination, reflexive address) pair seen is compared: one reflexive address for several
   destination IPs is endpoint-independent mapping; a change between destinations of one IP
   (different ports) is address-and-port-dependent; a change only between IPs is
   address-dependent. Hairpinning (RFC 5780 §4.5), if asked: a request to our own reflexive
   address, which comes back to us only if the NAT hairpins.

Relays are STUN servers too (a relay's STUN port); each gets ``relay_samples`` sequential
transactions and its latency is the lowest RTT seen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import ip_address
from typing import Any

from transport.stun import (
    DEFAULT_REQUEST_SIZE,
    BindingResult,
    BindingTransaction,
    Class,
    StunError,
    decode,
    family_of,
    format_address,
    unmap_address,
)
from transport.wire import Address

__all__ = [
    "FamilyReport",
    "Filtering",
    "LocalInfo",
    "MappingBehavior",
    "NatType",
    "Netcheck",
    "NetcheckConfig",
    "NetcheckReport",
    "Observation",
    "Purpose",
    "RelayLatency",
    "classify",
]


class MappingBehavior(StrEnum):
    """How the NAT picks the public address for our socket (RFC 4787 §4.1)."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    # It changes with the destination, but no two destinations shared an IP to tell which.
    DESTINATION_DEPENDENT = "destination-dependent"


class Filtering(StrEnum):
    """Which inbound packets the NAT lets through to an existing mapping (RFC 4787 §5)."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"


class NatType(StrEnum):
    OPEN = "open"  # no NAT: the reflexive address is our own
    NAT1 = "NAT1"  # full cone: endpoint-independent mapping and filtering
    NAT2 = "NAT2"  # restricted cone: EI mapping, address-dependent filtering
    NAT3 = "NAT3"  # port-restricted cone: EI mapping, address-and-port-dependent filtering
    NAT4 = "NAT4"  # symmetric: the mapping depends on the destination
    BLOCKED = "blocked"  # no STUN server answered
    UNKNOWN = "unknown"  # answers came, but not enough of them to tell


_DESCRIPTIONS = {
    NatType.OPEN: "no NAT (open)",
    NatType.NAT1: "a full cone NAT (NAT1)",
    NatType.NAT2: "a restricted cone NAT (NAT2)",
    NatType.NAT3: "a port-restricted cone NAT (NAT3)",
    NatType.NAT4: "a symmetric NAT (NAT4)",
    NatType.UNKNOWN: "a NAT of unknown type",
}

_REACH = {
    NatType.OPEN: "reachable directly",
    NatType.NAT1: "reachable directly at its reflexive address",
    NatType.NAT2: "reachable by hole punching from every NAT type",
    NatType.NAT3: "reachable by hole punching from cone NATs; symmetric NATs need the relay",
    NatType.NAT4: "reachable by hole punching only from open, NAT1 and NAT2 peers",
    NatType.UNKNOWN: "direct connections will be tried, the relay stays ready",
}


def classify(
    *,
    reachable: bool,
    open_: bool,
    mapping: MappingBehavior | None,
    filtering: Filtering | None,
) -> NatType:
    """The NAT type from the observations: docs/netcheck.md's table, as code."""
    if not reachable:
        return NatType.BLOCKED
    if open_:
        return NatType.OPEN
    if mapping is None:
        return NatType.UNKNOWN
    if mapping is not MappingBehavior.ENDPOINT_INDEPENDENT:
        return NatType.NAT4
    if filtering is None:
        return NatType.UNKNOWN
    return {
        Filtering.ENDPOINT_INDEPENDENT: NatType.NAT1,
        Filtering.ADDRESS_DEPENDENT: NatType.NAT2,
        Filtering.ADDRESS_AND_PORT_DEPENDENT: NatType.NAT3,
    }[filtering]


class Purpose(StrEnum):
    PRIMARY = "primary"
    FILTER_CHANGE_IP_PORT = "filter-change-ip-port"
    FILTER_CHANGE_PORT = "filter-change-port"
    MAP_OTHER_IP = "map-other-ip"
    MAP_OTHER_IP_PORT = "map-other-ip-port"
    RELAY = "relay"
    HAIRPIN = "hairpin"


@dataclass(frozen=True)
class NetcheckConfig:
    """Timing: netcheck gives up much sooner than RFC 8489's 39.5 s. With the defaults a
    transaction sends at 0, 0.25, 0.75 s and fails at 1.75 s, so a whole run takes under 6 s
    even when every filter test times out."""

    rto: float = 0.25
    attempts: int = 3
    final_wait: float = 1.0
    pad_to: int = DEFAULT_REQUEST_SIZE  # 0 for old servers that drop PADDING (stund)
    relay_samples: int = 3
    hairpin: bool = True


@dataclass(frozen=True)
class LocalInfo:
    """What the runner knows about our side: the socket's port, the egress addresses found by
    a UDP connect() that sends nothing, their interfaces, every address of this host (a
    reflexive address among them means no NAT), and which families the socket can send."""

    port: int
    ipv4: str | None = None
    ipv6: str | None = None
    interface_v4: str | None = None
    interface_v6: str | None = None
    addresses: frozenset[str] = frozenset()
    families: frozenset[int] = frozenset({4, 6})

    def is_local(self, addr: Address) -> bool:
        if addr[1] != self.port:
            return False
        own = {a for a in (self.ipv4, self.ipv6, *self.addresses) if a}
        return _canonical(addr[0]) in {_canonical(a) for a in own}


def _canonical(host: str) -> str:
    try:
        return str(ip_address(host.split("%", 1)[0]))
    except ValueError:
        return host


@dataclass(frozen=True)
class Observation:
    """One probe and what came of it (the raw facts the report is built from)."""

    purpose: Purpose
    target: Address
    relay: str | None
    mapped: Address | None
    source: Address | None
    other_address: Address | None
    rtt: float | None
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "purpose": str(self.purpose),
            "target": format_address(self.target),
            "relay": self.relay,
            "mapped": _fmt(self.mapped),
            "source": _fmt(self.source),
            "other_address": _fmt(self.other_address),
            "rtt_ms": _ms(self.rtt),
            "error": self.error,
        }


@dataclass(frozen=True)
class RelayLatency:
    name: str
    address: Address
    rtt: float | None  # seconds, the lowest of the samples; None: no answer

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "address": format_address(self.address), "rtt_ms": _ms(self.rtt)}


@dataclass(frozen=True)
class FamilyReport:
    family: int  # 4 or 6
    tested: bool  # a server of this family was asked
    reachable: bool  # and one answered
    local: str | None  # egress address (connect trick)
    interface: str | None
    reflexive: Address | None
    open: bool
    mapping: MappingBehavior | None
    filtering: Filtering | None
    nat_type: NatType
    hairpinning: bool | None

    def to_json(self) -> dict[str, Any]:
        return {
            "tested": self.tested,
            "reachable": self.reachable,
            "local": self.local,
            "interface": self.interface,
            "reflexive": _fmt(self.reflexive),
            "open": self.open,
            "mapping": None if self.mapping is None else str(self.mapping),
            "filtering": None if self.filtering is None else str(self.filtering),
            "nat_type": str(self.nat_type),
            "hairpinning": self.hairpinning,
        }

    def line(self) -> str:
        """One human line, e.g. "IPv4 192.0.2.10 behind a port-restricted cone NAT (NAT3): ..."."""
        name = f"IPv{self.family}"
        if not self.tested:
            if self.local is None:
                return f"{name}: none (no route)."
            return f"{name}: not tested (no {name} server, or the socket is not {name})."
        if not self.reachable:
            return f"{name}: none (no {name} STUN server answered)."
        where = self.reflexive[0] if self.reflexive else "?"
        reach = _REACH[self.nat_type]
        if self.nat_type is NatType.OPEN:
            text = f"{name} {where}: no NAT (open), {reach}"
            if self.filtering not in (None, Filtering.ENDPOINT_INDEPENDENT):
                text += f" after we send first (a firewall filters {self.filtering})"
            text += "."
        else:
            text = f"{name} {where} behind {_DESCRIPTIONS[self.nat_type]}: {reach}."
        if self.hairpinning is not None:
            text += " Hairpinning works." if self.hairpinning else " No hairpinning."
        return text


@dataclass(frozen=True)
class NetcheckReport:
    udp: bool  # some STUN server answered at all
    ipv4: FamilyReport
    ipv6: FamilyReport
    relays: tuple[RelayLatency, ...]
    observations: tuple[Observation, ...]
    notes: tuple[str, ...]
    duration: float

    @property
    def nat_type(self) -> NatType:
        """The IPv4 NAT type (the one that decides hole punching for most peers)."""
        return self.ipv4.nat_type

    @property
    def nearest_relay(self) -> RelayLatency | None:
        answered = [r for r in self.relays if r.rtt is not None]
        return min(answered, key=lambda r: r.rtt or 0.0) if answered else None

    def to_json(self) -> dict[str, Any]:
        nearest = self.nearest_relay
        return {
            "udp": self.udp,
            "nat_type": str(self.nat_type),
            "ipv4": self.ipv4.to_json(),
            "ipv6": self.ipv6.to_json(),
            "relays": [r.to_json() for r in self.relays],
            "nearest_relay": None if nearest is None else nearest.name,
            "observations": [o.to_json() for o in self.observations],
            "notes": list(self.notes),
            "duration_ms": _ms(self.duration),
        }

    def summary(self) -> str:
        lines = []
        if not self.udp:
            tested = self.ipv4.tested or self.ipv6.tested
            lines.append(
                "UDP is blocked: no STUN server answered; only the relay over TCP can work."
                if tested
                else "Nothing was tested: no STUN server of a family this socket can use."
            )
        else:
            lines.append("UDP works. " + self.ipv4.line())
            lines.append(self.ipv6.line())
        nearest = self.nearest_relay
        if nearest is not None and nearest.rtt is not None:
            lines.append(f"Nearest relay: {nearest.name} {nearest.rtt * 1000:.0f} ms.")
        elif self.relays:
            lines.append("No relay answered over UDP.")
        egress = [
            f"{f.interface or '?'} {f.local}" for f in (self.ipv4, self.ipv6) if f.local is not None
        ]
        if egress:
            lines.append("Egress: " + ", ".join(egress) + ".")
        return "\n".join(lines)


def _fmt(addr: Address | None) -> str | None:
    return None if addr is None else format_address(addr)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


# --- the state machine --------------------------------------------------------------------------


@dataclass
class _Probe:
    purpose: Purpose
    target: Address
    family: int
    tx: BindingTransaction
    relay: str | None = None
    expect_source: Address | None = None  # filter tests: where the answer must come from
    background: bool = False  # a relay's second and later samples: phases don't wait for them
    hairpinned: bool = False

    @property
    def finished(self) -> bool:
        return self.hairpinned or self.tx.done


@dataclass(frozen=True)
class _Target:
    address: Address
    family: int
    relay: str | None


class _Phase(StrEnum):
    PRIMARY = "primary"
    FILTERING = "filtering"
    MAPPING = "mapping"
    DONE = "done"


@dataclass(frozen=True)
class _Rfc5780:
    server: Address  # P: the server's primary address, as we contacted it
    other: Address  # O: its other IP and other port


class Netcheck:
    """One NAT check. Drive it like every sans-IO machine here: :meth:`datagrams_to_send` at
    :meth:`next_timer` and after each :meth:`receive`; :meth:`report` once :attr:`done`.

    ``servers`` and ``relays`` are IP literals (the runner resolves names). A relay is
    ``(name, address)``; one name may come with an address per family.
    """

    def __init__(
        self,
        servers: Sequence[Address],
        relays: Sequence[tuple[str, Address]] | Mapping[str, Address] = (),
        *,
        local: LocalInfo,
        now: float,
        config: NetcheckConfig | None = None,
    ) -> None:
        self.config = config or NetcheckConfig()
        self.local = local
        self.start = now
        self.finished_at: float | None = None
        self.notes: list[str] = []
        relay_items = list(relays.items()) if isinstance(relays, Mapping) else list(relays)
        named: list[tuple[str | None, Address]] = [(None, a) for a in servers]
        named += [(name, a) for name, a in relay_items]
        targets: dict[Address, _Target] = {}
        skipped: set[int] = set()
        for name, raw in named:
            addr = unmap_address(raw)
            family = family_of(addr[0])
            if family not in local.families:
                skipped.add(family)
                continue
            known = targets.get(addr)
            if known is None or (known.relay is None and name is not None):
                targets[addr] = _Target(addr, family, name)
        for family in sorted(skipped):
            self.notes.append(f"IPv{family} servers skipped: the socket cannot send IPv{family}")
        self.targets = list(targets.values())
        self.probes: list[_Probe] = []
        self.contacted: set[Address] = set()  # every destination we sent to, for void tests
        self.rfc5780: dict[int, _Rfc5780] = {}
        self.phase = _Phase.PRIMARY
        for target in self.targets:
            purpose = Purpose.RELAY if target.relay is not None else Purpose.PRIMARY
            self._probe(purpose, target.address, now, relay=target.relay)
        self._advance(now)

    # -- sans-IO interface --

    @property
    def done(self) -> bool:
        return self.phase is _Phase.DONE

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out: list[tuple[bytes, Address]] = []
        for _ in range(4):  # a timeout can end a phase; the next one sends at once (3 phases)
            for probe in self.probes:
                if not probe.finished:
                    out += probe.tx.datagrams_to_send(now)
            if not self._advance(now):
                break
        return out

    def next_timer(self) -> float | None:
        times = [p.tx.next_timer() for p in self.probes if not p.finished]
        pending = [t for t in times if t is not None]
        return min(pending) if pending else None

    def receive(self, data: bytes, source: Address, now: float) -> bool:
        """Feed a datagram from the socket; True if it was one of ours."""
        try:
            msg = decode(data)
            source = unmap_address(source)
        except StunError:
            return False
        for probe in self.probes:
            if probe.purpose is Purpose.HAIRPIN and msg.cls is Class.REQUEST:
                if msg.transaction_id == probe.tx.transaction_id:
                    probe.hairpinned = True  # our own request came back through the NAT
                    self._advance(now)
                    return True
                continue
            if probe.tx.handle_message(msg, source, now):
                self._advance(now)
                return True
        return False

    # -- phases --

    def _probe(
        self,
        purpose: Purpose,
        target: Address,
        now: float,
        *,
        relay: str | None = None,
        change_ip: bool = False,
        change_port: bool = False,
        expect_source: Address | None = None,
        background: bool = False,
    ) -> None:
        cfg = self.config
        tx = BindingTransaction(
            target,
            now,
            rto=cfg.rto,
            attempts=cfg.attempts,
            final_wait=cfg.final_wait,
            pad_to=cfg.pad_to,
            change_ip=change_ip,
            change_port=change_port,
        )
        family = family_of(target[0])
        self.probes.append(
            _Probe(purpose, target, family, tx, relay, expect_source, background=background)
        )
        self.contacted.add(target)

    def _advance(self, now: float) -> bool:
        """Move on to the next phase when the current one is over (at most three steps).
        True if new probes were started."""
        started = self._more_relay_samples(now)
        while self.phase is not _Phase.DONE:
            if any(not p.finished for p in self.probes if not p.background):
                break
            if self.phase is _Phase.PRIMARY:
                self.phase = _Phase.FILTERING
                started |= self._start_filtering(now)
            elif self.phase is _Phase.FILTERING:
                self.phase = _Phase.MAPPING
                started |= self._start_mapping(now)
            else:
                if any(not p.finished for p in self.probes):
                    break  # relay samples still running
                self.phase = _Phase.DONE
                self.finished_at = now
        return started

    def _more_relay_samples(self, now: float) -> bool:
        started = False
        for target in self.targets:
            if target.relay is None:
                continue
            mine = [p for p in self.probes if p.relay is not None and p.target == target.address]
            if len(mine) >= self.config.relay_samples or not all(p.finished for p in mine):
                continue
            if mine[-1].tx.result is None:
                continue  # it did not answer: one timeout is enough
            self._probe(Purpose.RELAY, target.address, now, relay=target.relay, background=True)
            started = True
        return started

    def _answered(self, family: int, *purposes: Purpose) -> list[tuple[_Probe, BindingResult]]:
        return [
            (p, p.tx.result)
            for p in self.probes
            if p.family == family and p.purpose in purposes and p.tx.result is not None
        ]

    def _start_filtering(self, now: float) -> bool:
        started = False
        for family in (4, 6):
            for probe, result in self._answered(family, Purpose.PRIMARY, Purpose.RELAY):
                other = result.other_address
                if other is None or family_of(other[0]) != family:
                    continue
                other = unmap_address(other)
                server = probe.target
                if other[0] != server[0] and other[1] != server[1]:
                    self.rfc5780[family] = _Rfc5780(server, other)
                    break
            rfc = self.rfc5780.get(family)
            if rfc is None:
                if self._answered(family, Purpose.PRIMARY, Purpose.RELAY):
                    self.notes.append(
                        f"IPv{family} filtering not measured: no server announced an"
                        " OTHER-ADDRESS (RFC 5780)"
                    )
                continue
            # A test is void if an earlier packet already opened the filter it measures.
            if rfc.other[0] in {a[0] for a in self.contacted}:
                self.notes.append(
                    f"IPv{family} change-IP filter test skipped: {rfc.other[0]} was already"
                    " contacted (don't list a server's other address as a server)"
                )
            else:
                self._probe(
                    Purpose.FILTER_CHANGE_IP_PORT,
                    rfc.server,
                    now,
                    change_ip=True,
                    change_port=True,
                    expect_source=rfc.other,
                )
                started = True
            changed_port = (rfc.server[0], rfc.other[1])
            if changed_port in self.contacted:
                self.notes.append(
                    f"IPv{family} change-port filter test skipped:"
                    f" {format_address(changed_port)} was already contacted"
                )
            else:
                self._probe(
                    Purpose.FILTER_CHANGE_PORT,
                    rfc.server,
                    now,
                    change_port=True,
                    expect_source=changed_port,
                )
                started = True
        return started

    def _start_mapping(self, now: float) -> bool:
        started = False
        for rfc in self.rfc5780.values():
            self._probe(Purpose.MAP_OTHER_IP, (rfc.other[0], rfc.server[1]), now)
            self._probe(Purpose.MAP_OTHER_IP_PORT, rfc.other, now)
            started = True
        if self.config.hairpin:
            answered = self._answered(4, Purpose.PRIMARY, Purpose.RELAY)
            if answered and not self.local.is_local(answered[0][1].mapped):
                self._probe(Purpose.HAIRPIN, answered[0][1].mapped, now)
                started = True
        return started

    # -- the report --

    def _mapping(self, family: int, open_: bool) -> MappingBehavior | None:
        seen = [
            (p.target, r.mapped)
            for p, r in self._answered(
                family,
                Purpose.PRIMARY,
                Purpose.RELAY,
                Purpose.MAP_OTHER_IP,
                Purpose.MAP_OTHER_IP_PORT,
            )
        ]
        if not seen:
            return None
        if open_:
            return MappingBehavior.ENDPOINT_INDEPENDENT
        if len({m for _, m in seen}) == 1:
            # One reflexive address for several destination IPs; for one IP we can't tell.
            many_ips = len({t[0] for t, _ in seen}) >= 2
            return MappingBehavior.ENDPOINT_INDEPENDENT if many_ips else None
        by_ip: dict[str, list[tuple[Address, Address]]] = {}
        for target, mapped in seen:
            by_ip.setdefault(target[0], []).append((target, mapped))
        if any(len({m for _, m in group}) > 1 for group in by_ip.values()):
            return MappingBehavior.ADDRESS_AND_PORT_DEPENDENT  # the port alone changed it
        if any(len({t for t, _ in group}) > 1 for group in by_ip.values()):
            return MappingBehavior.ADDRESS_DEPENDENT  # ports of one IP shared a mapping
        return MappingBehavior.DESTINATION_DEPENDENT

    def _filter_outcome(self, family: int, purpose: Purpose, notes: list[str]) -> str | None:
        """'pass', 'timeout', 'unknown', or None when the test was not run."""
        for p in self.probes:
            if p.family != family or p.purpose is not purpose:
                continue
            result = p.tx.result
            if result is not None:
                if result.source == p.expect_source:
                    return "pass"
                expected = format_address(p.expect_source or p.target)
                notes.append(
                    f"{format_address(p.target)} answered a CHANGE-REQUEST from"
                    f" {format_address(result.source)} instead of {expected}:"
                    " it does not really change address"
                )
                return "unknown"
            if p.tx.error is not None and p.tx.error.startswith("timeout"):
                return "timeout"
            return "unknown"
        return None

    def _filtering(self, family: int, notes: list[str]) -> Filtering | None:
        both = self._filter_outcome(family, Purpose.FILTER_CHANGE_IP_PORT, notes)
        port = self._filter_outcome(family, Purpose.FILTER_CHANGE_PORT, notes)
        if both == "pass":
            if port == "timeout":
                notes.append(f"IPv{family}: the change-port answer was lost, change-IP's was not")
            return Filtering.ENDPOINT_INDEPENDENT
        if port == "timeout":
            # Nothing from P.ip:O.port although we had talked to P.ip: the port matters.
            return Filtering.ADDRESS_AND_PORT_DEPENDENT
        if port == "pass" and both == "timeout":
            return Filtering.ADDRESS_DEPENDENT
        return None

    def _family_report(self, family: int, notes: list[str]) -> FamilyReport:
        tested = any(p.family == family for p in self.probes)
        answered = [
            r for p, r in self._answered(family, *Purpose) if p.purpose is not Purpose.HAIRPIN
        ]
        firsts = self._answered(family, Purpose.PRIMARY, Purpose.RELAY)
        reflexive = firsts[0][1].mapped if firsts else None
        open_ = reflexive is not None and self.local.is_local(reflexive)
        mapping = self._mapping(family, open_)
        filtering = self._filtering(family, notes)
        hairpins = [p for p in self.probes if p.family == family and p.purpose is Purpose.HAIRPIN]
        public = sorted({r.mapped[0] for r in answered})
        if len(public) > 1:
            notes.append(f"IPv{family}: several public addresses seen: {', '.join(public)}")
        nat_type = (
            classify(reachable=bool(answered), open_=open_, mapping=mapping, filtering=filtering)
            if tested
            else NatType.UNKNOWN
        )
        return FamilyReport(
            family=family,
            tested=tested,
            reachable=bool(answered),
            local=self.local.ipv4 if family == 4 else self.local.ipv6,
            interface=self.local.interface_v4 if family == 4 else self.local.interface_v6,
            reflexive=reflexive,
            open=open_,
            mapping=mapping,
            filtering=filtering,
            nat_type=nat_type,
            hairpinning=any(p.hairpinned for p in hairpins) if hairpins else None,
        )

    def report(self, now: float | None = None) -> NetcheckReport:
        """The findings (complete once :attr:`done`; before that, what is known at ``now``)."""
        notes = list(self.notes)
        v4, v6 = self._family_report(4, notes), self._family_report(6, notes)
        relays = []
        for target in self.targets:
            if target.relay is None:
                continue
            rtts = [
                p.tx.result.rtt
                for p in self.probes
                if p.relay is not None and p.target == target.address and p.tx.result is not None
            ]
            relays.append(RelayLatency(target.relay, target.address, min(rtts) if rtts else None))
        observations = tuple(
            Observation(
                purpose=p.purpose,
                target=p.target,
                relay=p.relay,
                mapped=p.tx.result.mapped if p.tx.result else None,
                source=p.tx.result.source if p.tx.result else None,
                other_address=p.tx.result.other_address if p.tx.result else None,
                rtt=p.tx.result.rtt if p.tx.result else None,
                error="hairpinned" if p.hairpinned else p.tx.error,
            )
            for p in self.probes
        )
        end = self.finished_at if self.finished_at is not None else now
        return NetcheckReport(
            udp=v4.reachable or v6.reachable,
            ipv4=v4,
            ipv6=v6,
            relays=tuple(relays),
            observations=observations,
            notes=tuple(dict.fromkeys(notes)),
            duration=max(0.0, (end if end is not None else self.start) - self.start),
        )
