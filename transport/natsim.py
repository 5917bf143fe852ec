"""An in-memory network with simulated NATs, driven by a fake clock (sans-IO).

This is the bench every multi-peer scenario runs on before the namespace lab: clients, the
box and relays live in one process, exchange :class:`Datagram` objects through hosts, links
and routers, and time only moves when the test says so (:meth:`Network.run_until`,
:meth:`Network.step`). The same seed gives the same run, packet for packet.

Topology
========

::

                                  the internet (realm)
        +----------------+-------------------+-------------------------+
        |                |                   |                         |
     relay host     router "home"       router "carrier" (CGNAT)   public host
     (public)       outside 203.0.113.7 outside 198.51.100.9
                         |                   |
                    inside realm        inside realm (100.64.0.0/10)
                    192.168.1.0/24           |
                     |        |          router "flat" (home NAT behind CGNAT)
                   laptop    box         outside 100.64.0.2
                                             |
                                         inside realm: phone 192.168.0.5

A **realm** is a broadcast domain: the internet, or the inside of one router. Each node (a
:class:`Host` or a :class:`Router`) is attached to one realm by a :class:`Link` with a one-way
latency and a loss rate. A datagram crosses the sender's link to its realm; if its destination
address belongs to a member of that realm it crosses the member's link to it, otherwise the
realm's gateway router forwards it out (translating it) into its own realm, and so on. A router
receiving on its outside link translates back and delivers into its inside realm. Every hop is
an event on the clock, so NAT state changes at the moment a packet passes the router, which is
what makes simultaneous-open punching races come out as they do on real wires.

Default latencies: a host behind a router sits 1 ms from it (``lan_latency``); routers and
public hosts sit 10 ms from the internet (``latency``). Two hosts behind two NATs are therefore
22 ms apart one way; through a public relay, 42 ms.

NAT behaviour (RFC 4787)
========================

A router's :class:`Behavior` says how it maps and filters (RFC 4787 sections 4.1 and 5):

- **Mapping**: which outbound flows from one internal endpoint ``X:x`` share an external
  endpoint ``X':x'``. *Endpoint-independent* (EIM): every destination. *Address-dependent*
  (ADM): destinations with the same IP. *Address-and-port-dependent* (APDM, "symmetric"):
  only the same ``Y:y``.
- **Filtering**: which external endpoints may send to ``X':x'``. *Endpoint-independent* (EIF):
  anyone. *Address-dependent* (ADF): any port of an IP ``X:x`` has sent to. *Address-and-port-
  dependent* (APDF): exactly the ``Y:y`` it has sent to.
- **Mapping timeout**: a mapping (and each filter permission) dies ``mapping_timeout`` seconds
  after the last *outbound* packet that used it; inbound packets never refresh it (RFC 4787
  REQ-6 makes inbound refresh optional; many routers, and Linux conntrack for unreplied flows,
  refresh only on outbound). The default of 30 s is Linux's ``nf_conntrack_udp_timeout`` and
  what many home routers use, which is why peers keep mappings alive every 25 s.
- **Hairpinning** (RFC 4787 section 6): an inside host sending to the router's own outside
  address is looped back as if it had come from outside, with the sender's *external* address
  as source (REQ-9a); with ``hairpin=False`` such packets are dropped.
- **Port preservation**: a new mapping keeps the internal port when it is free; otherwise (or
  with ``port_preservation=False``) the port is drawn from the seeded RNG.
- **Static mappings** (:meth:`Router.add_port_mapping`), as PCP (RFC 6887) or UPnP create:
  inbound from anyone reaches the internal endpoint, and its outbound traffic leaves from the
  mapped port (RFC 6887 section 11: the mapping is used for outgoing packets too).
- **UDP blocked**: the router drops every UDP datagram in both directions (``proto="tcp"``
  datagrams still pass, as a stand-in for relay-over-TCP in such networks).
- **No translation** (``translate=False``): a plain router or a stateful firewall; hosts behind
  it carry public addresses and ``filtering`` (``None`` = open) applies to inbound traffic.
- **IPv6**: never translated. Global IPv6 addresses of hosts behind routers are reachable from
  the internet through each router on the way, and a router with ``v6_filtering`` set filters
  inbound IPv6 statefully (APDF by default, RFC 6092 REC-11) without touching addresses.
  Carrier routers usually forward IPv6 openly (``v6_filtering=None``).
- **Nested NATs** (CGNAT): a router's outside may sit in another router's inside realm.

Presets: :data:`NAT1` (EIM + EIF, "full cone"), :data:`NAT2` (EIM + ADF, "restricted cone"),
:data:`NAT3` (EIM + APDF, "port-restricted"; Linux masquerade), :data:`NAT4` (APDM + APDF,
"symmetric", random ports), :data:`CGNAT` (EIM + APDF, random ports, IPv6 open),
:data:`FIREWALL` (no translation, APDF both families), :data:`NONE` (no translation, no
filtering) and :data:`BLOCKED` (NAT3 that drops all UDP).

Only UDP-like datagrams are simulated; ``proto="tcp"`` marks a datagram that is never lost
(a reliable stream's segments), nothing more.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import Enum

Address = tuple[str, int]  # (ip, port), as asyncio and transport.wire use


class Mapping(Enum):
    """RFC 4787 section 4.1: which destinations share one external endpoint."""

    EIM = "endpoint-independent"
    ADM = "address-dependent"
    APDM = "address-and-port-dependent"


class Filtering(Enum):
    """RFC 4787 section 5: which external endpoints may send in through a mapping."""

    EIF = "endpoint-independent"
    ADF = "address-dependent"
    APDF = "address-and-port-dependent"


@dataclass(frozen=True, slots=True)
class Behavior:
    """How a router treats traffic. Presets below; vary one with ``dataclasses.replace``."""

    name: str
    mapping: Mapping = Mapping.EIM
    filtering: Filtering | None = Filtering.APDF
    translate: bool = True
    hairpin: bool = False
    port_preservation: bool = True
    mapping_timeout: float = 30.0
    udp_blocked: bool = False
    v6_filtering: Filtering | None = Filtering.APDF


NAT1 = Behavior("NAT1", Mapping.EIM, Filtering.EIF)
NAT2 = Behavior("NAT2", Mapping.EIM, Filtering.ADF)
NAT3 = Behavior("NAT3", Mapping.EIM, Filtering.APDF)
NAT4 = Behavior("NAT4", Mapping.APDM, Filtering.APDF, port_preservation=False)
CGNAT = Behavior("CGNAT", Mapping.EIM, Filtering.APDF, port_preservation=False, v6_filtering=None)
FIREWALL = Behavior("FIREWALL", translate=False, filtering=Filtering.APDF)
NONE = Behavior("NONE", translate=False, filtering=None, v6_filtering=None)
BLOCKED = Behavior("BLOCKED", Mapping.EIM, Filtering.APDF, udp_blocked=True)
PRESETS = {b.name: b for b in (NAT1, NAT2, NAT3, NAT4, CGNAT, FIREWALL, NONE, BLOCKED)}


@dataclass(frozen=True, slots=True)
class Datagram:
    src: Address
    dst: Address
    data: bytes
    proto: str = "udp"


@dataclass(slots=True)
class Link:
    """A node's attachment to its realm. Change the fields at any time (a link going bad)."""

    latency: float
    loss: float = 0.0


@dataclass(frozen=True, slots=True)
class Record:
    """One line of :attr:`Network.log`: a delivery or a drop, where and why."""

    time: float
    event: str  # "deliver" or "drop"
    where: str  # the node's name
    reason: str  # the drop reason, "" for a delivery
    datagram: Datagram


class Timer:
    """A callback on the network's clock (:meth:`Network.call_at`)."""

    __slots__ = ("_callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self._callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def family(ip: str) -> int:
    return 6 if ":" in ip else 4


class _Realm:
    """A broadcast domain: the internet, or one router's inside."""

    def __init__(self, name: str, gateway: Router | None) -> None:
        self.name = name
        self.gateway = gateway
        self.members: dict[str, _Node] = {}  # address -> the member that answers for it


class _Node:
    def __init__(self, net: Network, name: str, realm: _Realm, link: Link) -> None:
        self.net = net
        self.name = name
        self.realm = realm
        self.link = link

    def _arrive(self, dg: Datagram) -> None:  # from the realm, across our link
        raise NotImplementedError


# --- hosts ---------------------------------------------------------------------------------------


class Socket:
    """A UDP socket bound to one port on every address of its host (dual-stack).

    Received datagrams go to ``on_receive`` when set, else to ``inbox``.
    """

    def __init__(self, host: Host, port: int) -> None:
        self.host = host
        self.port = port
        self.inbox: deque[Datagram] = deque()
        self.on_receive: Callable[[Datagram], None] | None = None
        self.closed = False

    def local(self, fam: int = 4) -> Address:
        ip = self.host.address(fam)
        if ip is None:
            raise ValueError(f"{self.host.name} has no IPv{fam} address")
        return (ip, self.port)

    def sendto(
        self, data: bytes, dest: Address, *, proto: str = "udp", source_ip: str | None = None
    ) -> None:
        if self.closed:
            raise ValueError("socket is closed")
        src_ip = source_ip or self.host.address(family(dest[0]))
        dg = Datagram((src_ip or "", self.port), (dest[0], dest[1]), bytes(data), proto)
        if src_ip is None:
            self.host.net._drop(self.host, "no source address of this family", dg)
            return
        self.host.net._transmit(self.host, dg)

    def close(self) -> None:
        self.closed = True
        self.host.sockets.pop(self.port, None)

    def _deliver(self, dg: Datagram) -> None:
        if self.on_receive is not None:
            self.on_receive(dg)
        else:
            self.inbox.append(dg)


class Host(_Node):
    def __init__(
        self, net: Network, name: str, realm: _Realm, link: Link, addresses: list[str]
    ) -> None:
        super().__init__(net, name, realm, link)
        self.addresses = addresses
        self.sockets: dict[int, Socket] = {}
        self._next_port = 40000

    def address(self, fam: int = 4) -> str | None:
        """The host's first address of a family: the source of what it sends there."""
        return next((a for a in self.addresses if family(a) == fam), None)

    def bind(self, port: int = 0, on_receive: Callable[[Datagram], None] | None = None) -> Socket:
        if port == 0:
            while self._next_port in self.sockets:
                self._next_port += 1
            port = self._next_port
        if port in self.sockets:
            raise ValueError(f"port {port} is in use on {self.name}")
        sock = Socket(self, port)
        sock.on_receive = on_receive
        self.sockets[port] = sock
        return sock

    def _arrive(self, dg: Datagram) -> None:
        sock = self.sockets.get(dg.dst[1])
        if sock is None:
            self.net._drop(self, "port closed", dg)
            return
        self.net._record("deliver", self, "", dg)
        sock._deliver(dg)


# --- routers -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Binding:
    """One NAT mapping (or, without translation, one firewall pinhole set)."""

    proto: str
    internal: Address
    external: Address
    last_out: float
    static: bool = False
    key: tuple[object, ...] = ()  # the mapping key it is filed under (RFC 4787 section 4.1)
    # remote endpoint -> last outbound packet to it: the filter's permissions (RFC 4787 sec. 5)
    permits: dict[Address, float] = field(default_factory=dict)


class Router(_Node):
    def __init__(
        self,
        net: Network,
        name: str,
        realm: _Realm,
        link: Link,
        behavior: Behavior,
        outside: str,
    ) -> None:
        super().__init__(net, name, realm, link)
        self.behavior = behavior
        self.outside = outside
        self.inside = _Realm(f"{name}-lan", self)
        self._by_key: dict[tuple[object, ...], Binding] = {}
        self._by_port: dict[tuple[str, int], Binding] = {}  # (proto, external port)
        self._static: dict[tuple[str, Address], Binding] = {}  # (proto, internal)
        self._pinholes: dict[tuple[str, Address], Binding] = {}  # without translation

    # -- public knobs --

    def add_port_mapping(
        self, internal: Address, external_port: int | None = None, proto: str = "udp"
    ) -> Address:
        """A static mapping, as PCP MAP (RFC 6887) or UPnP would create; returns its external
        address. Inbound from anyone is let through; outbound from ``internal`` uses it."""
        if not self.behavior.translate:
            raise ValueError(f"{self.name} does not translate; nothing to map")
        port = external_port if external_port is not None else self._allocate(proto, internal[1])
        taken = self._by_port.get((proto, port))
        if taken is not None:
            if taken.static or not self._expired(taken):
                raise ValueError(f"external port {port} is in use on {self.name}")
            self._forget(taken)
        binding = Binding(proto, internal, (self.outside, port), self.net.now, static=True)
        self._static[(proto, internal)] = binding
        self._by_port[(proto, port)] = binding
        return binding.external

    def remove_port_mapping(self, internal: Address, proto: str = "udp") -> None:
        binding = self._static.pop((proto, internal), None)
        if binding is not None:
            self._by_port.pop((proto, binding.external[1]), None)

    def reboot(self) -> None:
        """Forget every dynamic mapping and pinhole (a router restart, a NAT rebinding)."""
        self._by_key.clear()
        self._pinholes.clear()
        self._by_port = {k: b for k, b in self._by_port.items() if b.static}

    def bindings(self) -> list[Binding]:
        """The live mappings, static ones included (for tests and debugging)."""
        live = [b for b in self._by_port.values() if not self._expired(b)]
        return sorted(live, key=lambda b: (b.proto, b.external[1]))

    # -- forwarding --

    def _expired(self, b: Binding) -> bool:
        return not b.static and self.net.now - b.last_out >= self.behavior.mapping_timeout

    def _forget(self, b: Binding) -> None:
        self._by_port.pop((b.proto, b.external[1]), None)
        if self._by_key.get(b.key) is b:
            del self._by_key[b.key]

    def _allocate(self, proto: str, wanted: int) -> int:
        def free(port: int) -> bool:
            b = self._by_port.get((proto, port))
            if b is None:
                return True
            if self._expired(b):
                self._forget(b)
                return True
            return False

        if self.behavior.port_preservation and free(wanted):
            return wanted
        for _ in range(10000):
            port = self.net.rng.randint(1024, 65535)
            if free(port):
                return port
        raise RuntimeError(f"{self.name} has no free external port")

    def _note_permit(self, b: Binding, remote: Address, now: float) -> None:
        b.last_out = now
        b.permits[remote] = now
        if len(b.permits) > 64:  # keep the dict small: drop permissions that have died
            limit = self.behavior.mapping_timeout
            b.permits = {r: t for r, t in b.permits.items() if now - t < limit}

    def _allows(self, b: Binding, remote: Address, filtering: Filtering | None) -> bool:
        """RFC 4787 section 5: may ``remote`` send in through ``b``?"""
        if filtering is None or filtering is Filtering.EIF:
            return True
        now, limit = self.net.now, self.behavior.mapping_timeout
        if filtering is Filtering.ADF:
            return any(r[0] == remote[0] and now - t < limit for r, t in b.permits.items())
        sent = b.permits.get(remote)
        return sent is not None and now - sent < limit

    def _outbound(self, dg: Datagram) -> None:
        """A datagram from the inside realm that no inside member answers for: send it out."""
        net, now = self.net, self.net.now
        if self.behavior.udp_blocked and dg.proto == "udp":
            net._drop(self, "udp blocked", dg)
            return
        if family(dg.dst[0]) == 6 or not self.behavior.translate:
            # No translation: remember the flow so the stateful filter lets answers back in.
            key = (dg.proto, dg.src)
            hole = self._pinholes.get(key)
            if hole is None:
                hole = self._pinholes[key] = Binding(dg.proto, dg.src, dg.src, now)
            self._note_permit(hole, dg.dst, now)
            net._transmit(self, dg)
            return
        binding = self._map(dg, now)
        out = replace(dg, src=binding.external)
        if dg.dst[0] == self.outside:
            # RFC 4787 section 6: hairpinning, with the external source address (REQ-9a).
            if self.behavior.hairpin:
                self._arrive(out)
            else:
                net._drop(self, "hairpinning off", out)
            return
        net._transmit(self, out)

    def _map(self, dg: Datagram, now: float) -> Binding:
        """Find or make the mapping an outbound datagram uses (RFC 4787 section 4.1)."""
        static = self._static.get((dg.proto, dg.src))
        if static is not None:
            self._note_permit(static, dg.dst, now)
            return static
        mapping = self.behavior.mapping
        key: tuple[object, ...]
        if mapping is Mapping.EIM:
            key = (dg.proto, dg.src)
        elif mapping is Mapping.ADM:
            key = (dg.proto, dg.src, dg.dst[0])
        else:
            key = (dg.proto, dg.src, dg.dst)
        binding = self._by_key.get(key)
        if binding is not None and self._expired(binding):
            self._forget(binding)
            binding = None
        if binding is None:
            port = self._allocate(dg.proto, dg.src[1])
            binding = Binding(dg.proto, dg.src, (self.outside, port), now, key=key)
            self._by_key[key] = binding
            self._by_port[(dg.proto, port)] = binding
        self._note_permit(binding, dg.dst, now)
        return binding

    def _arrive(self, dg: Datagram) -> None:
        """A datagram on the outside link (or hairpinned): translate, filter, deliver inside."""
        net = self.net
        if self.behavior.udp_blocked and dg.proto == "udp":
            net._drop(self, "udp blocked", dg)
            return
        if family(dg.dst[0]) == 4 and self.behavior.translate:
            if dg.dst[0] != self.outside:
                net._drop(self, "no route", dg)
                return
            binding = self._by_port.get((dg.proto, dg.dst[1]))
            if binding is None:
                net._drop(self, "no mapping", dg)
                return
            if self._expired(binding):
                self._forget(binding)
                net._drop(self, "mapping expired", dg)
                return
            if not binding.static and not self._allows(binding, dg.src, self.behavior.filtering):
                net._drop(self, "filtered", dg)
                return
            net._down(self.inside, replace(dg, dst=binding.internal), self)
            return
        filtering = (
            self.behavior.v6_filtering if family(dg.dst[0]) == 6 else self.behavior.filtering
        )
        if filtering is not None:
            hole = self._pinholes.get((dg.proto, dg.dst))
            if hole is None or self._expired(hole) or not self._allows(hole, dg.src, filtering):
                net._drop(self, "filtered", dg)
                return
        net._down(self.inside, dg, self)


# --- the network ---------------------------------------------------------------------------------


class Network:
    """Hosts, routers and the clock. Everything happens in :meth:`step`."""

    def __init__(
        self,
        *,
        seed: int = 0,
        latency: float = 0.010,
        lan_latency: float = 0.001,
        loss: float = 0.0,
        start: float = 0.0,
        log_size: int = 10000,
    ) -> None:
        self.rng = random.Random(seed)  # noqa: S311 -- a simulation: reproducible, not secret
        self.latency = latency
        self.lan_latency = lan_latency
        self.loss = loss
        self._now = start
        self._queue: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self.internet = _Realm("internet", None)
        self.hosts: dict[str, Host] = {}
        self.routers: dict[str, Router] = {}
        self.drops: Counter[str] = Counter()
        self.log: deque[Record] = deque(maxlen=log_size)
        self._blocked: set[frozenset[str]] = set()

    # -- building --

    @property
    def now(self) -> float:
        return self._now

    def add_router(
        self,
        name: str,
        behavior: Behavior,
        outside: str,
        *,
        behind: Router | None = None,
        latency: float | None = None,
        loss: float | None = None,
    ) -> Router:
        self._check_name(name)
        realm = behind.inside if behind is not None else self.internet
        link = Link(
            self.latency if latency is None else latency, self.loss if loss is None else loss
        )
        router = Router(self, name, realm, link, behavior, outside)
        self._register(outside, router, realm)
        self.routers[name] = router
        return router

    def add_host(
        self,
        name: str,
        addresses: str | Iterable[str],
        *,
        behind: Router | None = None,
        latency: float | None = None,
        loss: float | None = None,
    ) -> Host:
        self._check_name(name)
        addrs = [addresses] if isinstance(addresses, str) else list(addresses)
        if not addrs:
            raise ValueError("a host needs at least one address")
        realm = behind.inside if behind is not None else self.internet
        default = self.lan_latency if behind is not None else self.latency
        link = Link(default if latency is None else latency, self.loss if loss is None else loss)
        host = Host(self, name, realm, link, addrs)
        for address in addrs:
            self._register(address, host, realm)
        self.hosts[name] = host
        return host

    def _check_name(self, name: str) -> None:
        if name in self.hosts or name in self.routers:
            raise ValueError(f"{name!r} already exists")

    def _register(self, address: str, node: _Node, realm: _Realm) -> None:
        if address in realm.members:
            raise ValueError(f"{address} is already used in {realm.name}")
        realm.members[address] = node
        gateway = realm.gateway
        # Addresses a router does not translate (IPv6; anything behind a plain router) are
        # reachable from the outside through it: its outer realm knows them as the router's.
        if gateway is not None and (family(address) == 6 or not gateway.behavior.translate):
            self._register(address, gateway, gateway.realm)

    def block(self, a: str, b: str) -> None:
        """Drop every datagram between public addresses ``a`` and ``b`` (a path dying)."""
        self._blocked.add(frozenset((a, b)))

    def unblock(self, a: str, b: str) -> None:
        self._blocked.discard(frozenset((a, b)))

    # -- the clock --

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(max(when, self._now), callback)
        heapq.heappush(self._queue, (timer.when, next(self._seq), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.call_at(self._now + delay, callback)

    def next_event(self) -> float | None:
        while self._queue and self._queue[0][2].cancelled:
            heapq.heappop(self._queue)
        return self._queue[0][0] if self._queue else None

    def step(self) -> bool:
        """Run the next event; False when nothing is left."""
        while self._queue:
            when, _, timer = heapq.heappop(self._queue)
            if timer.cancelled:
                continue
            self._now = when
            timer._callback()
            return True
        return False

    def run_until(self, t: float, *, max_events: int = 2_000_000) -> None:
        """Run every event up to time ``t``, then leave the clock at ``t``."""
        for _ in range(max_events):
            nxt = self.next_event()
            if nxt is None or nxt > t:
                break
            self.step()
        else:
            raise RuntimeError(f"more than {max_events} events before t={t}: a busy loop?")
        self._now = max(self._now, t)

    def run_for(self, seconds: float, **kwargs: int) -> None:
        self.run_until(self._now + seconds, **kwargs)

    # -- moving datagrams --

    def _record(self, event: str, node: _Node, reason: str, dg: Datagram) -> None:
        self.log.append(Record(self._now, event, node.name, reason, dg))

    def _drop(self, node: _Node, reason: str, dg: Datagram) -> None:
        self.drops[reason] += 1
        self._record("drop", node, reason, dg)

    def _cross(self, node: _Node, dg: Datagram, then: Callable[[], None]) -> None:
        """Carry ``dg`` over ``node``'s link (either way), losing it with the link's rate."""
        link = node.link
        if dg.proto == "udp" and link.loss > 0 and self.rng.random() < link.loss:
            self._drop(node, "lost", dg)
            return
        self.call_at(self._now + link.latency, then)

    def _transmit(self, sender: _Node, dg: Datagram) -> None:
        """``sender`` puts ``dg`` on its link towards its realm."""
        self._cross(sender, dg, lambda: self._in_realm(sender.realm, dg, sender))

    def _in_realm(self, realm: _Realm, dg: Datagram, sender: _Node) -> None:
        if realm is self.internet and frozenset((dg.src[0], dg.dst[0])) in self._blocked:
            self._drop(sender, "blocked", dg)
            return
        target = realm.members.get(dg.dst[0])
        if target is not None and target is not sender:
            self._cross(target, dg, lambda: target._arrive(dg))
        elif realm.gateway is not None and target is None:
            realm.gateway._outbound(dg)  # the gateway sits on the realm's own switch
        else:
            self._drop(sender, "no route", dg)

    def _down(self, realm: _Realm, dg: Datagram, router: Router) -> None:
        """A router delivers into its inside realm."""
        target = realm.members.get(dg.dst[0])
        if target is None:
            self._drop(router, "no route", dg)
            return
        self._cross(target, dg, lambda: target._arrive(dg))
