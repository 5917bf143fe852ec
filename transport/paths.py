"""Path selection for one peer: where each datagram of an established session goes, and when
to probe (sans-IO, no crypto).

A client and the box talk over one UDP socket each. Between them there may be several
*direct* paths (the peer's LAN address, its global IPv6 address, its NAT's reflexive or
port-mapped address, or a peer-reflexive address learned when its packets arrive from
somewhere new) and one *relayed* path through a relay. :class:`PathManager` decides, for the
session above it, which of those carry data, and which probes and keepalives to send.

It never encrypts and never touches a socket. The session layer (``transport.session``)
feeds it authenticated events and turns its outputs into ``wire.Probe`` / ``wire.Keepalive``
inner frames::

    session layer                                   PathManager
    -------------                                   -----------
    candidates from the negotiation   ----------->  local_candidates(), remote_candidates()
    simultaneous start from the box   ----------->  schedule(start_at)
    any authenticated packet from src ----------->  received(src, now, data=...)
    wire.ProbeAck(txid, observed)     ----------->  probe_acked(txid, src, observed, now)
    the OS says the network changed   ----------->  network_changed(now)
    a data packet to send             ----------->  route(now) -> [Direct | ViaRelay, ...]
    timer                             ----------->  handle_timer(now); next_timer()
    SendProbe(txid, dest)             <-----------  take_outputs()
    SendKeepalive(dest)               <-----------
    PathChanged(old, new, cause)      <-----------  (the console's timeline)

The session layer answers every ``wire.Probe`` itself with a ``wire.ProbeAck`` sent to the
address the probe came from, saying which address that was (the manager is not involved).

Paths and their states
======================

A *path* is one remote direct address (only remote addresses matter: we send everything from
one socket; local candidates decide which address families we can use and let us tell a
port-mapped path from a punched one). Each path is in one :class:`PathState`::

        schedule, new candidate,                      ack
        retry timer, heard from it    +---------+ ---------> +------+
      +--------+  start_at            |         |            |      | -- heartbeat (active)
      |WAITING | -------------------> | PROBING |            |  UP  |    keepalive (idle)
      +--------+                      |         | <--------- |      |    every interval
                                      +---------+  silent,   +------+
                                        |    ^     not the     |  ^
                  no answer to a round  |    |     active      |  | ack
                  (5 probes + 1.5 s)    |    |     path        |  |
                                        v    | retry after     |  |
                                      +------+-+ backoff,      |  |
                                      |  DOWN  | at once on    |  |
                                      +--------+ network       |  |
                                          ^      change        v  |
                                          |  round fails  +---------+
                                          +-------------- | SUSPECT | <- silent past the trust
                                                          +---------+    timeout (active path),
                                                                         network changed

The *active* path is the direct path data goes to. Where data goes:

=====================  ================================================================
active path            ``route(now)``
=====================  ================================================================
UP                     ``[Direct]``
SUSPECT                ``[Direct, ViaRelay]``: both, until the path answers again (back
                       to ``[Direct]``) or its round fails (then relay only). This is what
                       keeps a TCP connection inside the tunnel alive through a path death.
none (or DOWN)         ``[ViaRelay]``; with no relay known, the last address heard from
=====================  ================================================================

Preference and hysteresis
=========================

Tiers: LAN and IPv6 paths (0) over IPv4 punched, port-mapped or egress paths (1) over the relay
(2); within a tier, the lower smoothed RTT (RFC 6298's SRTT, alpha = 1/8), then the candidate's
priority. The manager leaves the current path only for one *clearly* better — a better tier,
or faster than the current SRTT by more than 20 % *and* 5 ms on each of its last two RTT
samples — that has been confirmed by two acks, the last within the trust timeout while data
flows; so two similar paths under RTT noise never flap. Leaving the relay for a direct path
also takes two acks (the second probe goes out the moment the first ack arrives, so it costs
one RTT); the active path coming back from SUSPECT takes one. When the active path turns
SUSPECT every other UP path is probed at once, so a live standby takes over one RTT later.

Timers (:class:`PathConfig`; ``docs/paths.md`` says why each value):

- heartbeat: a probe on the active path every 1 s while the session is *active* (data sent or
  received in the last 45 s);
- keepalive: on every other UP path (standbys; the active one when idle), something every
  25 s, under the 30 s UDP mapping timeouts of common NATs: a bare keepalive if we heard from
  the path in that time, else a probe;
- trust: the active path is trusted for 2.5 s after its last ack while active (two missed
  heartbeats and a margin: failover to dual sending within 2.5 s of a path dying), 55 s after
  anything was last heard from it while idle;
- rounds: 5 probes 250 ms apart, failed 1.5 s after the last without an answer;
- retries of DOWN paths: 1 s, doubling to 60 s; reset by an ack, a schedule, new candidates or
  a network change (which also retries every path at once and suspects the active path).
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_address

from transport.wire import TXID_LEN, Address

_LAN_V4 = (
    IPv4Network("10.0.0.0/8"),  # RFC 1918
    IPv4Network("172.16.0.0/12"),
    IPv4Network("192.168.0.0/16"),
    IPv4Network("169.254.0.0/16"),  # RFC 3927 link-local
)
_ULA = IPv6Network("fc00::/7")  # RFC 4193


class CandidateKind(Enum):
    LAN = "lan"  # an address on the host's own LAN (RFC 1918, link-local, ULA)
    EGRESS = "egress"  # the source address the OS picks for the internet (public if not NATed)
    REFLEXIVE = "reflexive"  # the NAT's external address, as STUN saw it
    IPV6 = "ipv6"  # a global IPv6 address
    PORTMAPPED = "portmapped"  # a mapping made with PCP / NAT-PMP / UPnP
    RELAY = "relay"  # reachable through a relay (the address is a ViaRelay)


@dataclass(frozen=True, slots=True)
class Direct:
    ip: str
    port: int

    @property
    def addr(self) -> Address:
        return (self.ip, self.port)

    @property
    def family(self) -> int:
        return 6 if ":" in self.ip else 4

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.family == 6 else f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class ViaRelay:
    relay: str  # the relay's name, as the relay client knows it

    def __str__(self) -> str:
        return f"relay {self.relay}"


Destination = Direct | ViaRelay


@dataclass(frozen=True, slots=True)
class Candidate:
    """One way to reach a peer (remote) or to be reached (local)."""

    kind: CandidateKind
    address: Destination
    priority: int = 0  # higher wins among otherwise equal paths

    def __post_init__(self) -> None:
        if (self.kind is CandidateKind.RELAY) != isinstance(self.address, ViaRelay):
            raise ValueError("a RELAY candidate, and only one, has a ViaRelay address")
        if isinstance(self.address, Direct):
            if not 0 < self.address.port <= 0xFFFF:
                raise ValueError(f"port {self.address.port} out of range")
            ip_address(self.address.ip)  # raises ValueError for a non-address


# --- outputs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendProbe:
    """Send ``wire.Probe(txid)`` on this path; its ``wire.ProbeAck`` goes to probe_acked()."""

    txid: bytes
    destination: Direct


@dataclass(frozen=True, slots=True)
class SendKeepalive:
    """Send ``wire.Keepalive()`` on this path (it refreshes NAT mappings; nobody answers)."""

    destination: Direct


@dataclass(frozen=True, slots=True)
class PathChanged:
    """Data now flows primarily on ``new`` (``None``: nowhere). ``kind`` is the console's
    ``PathKind`` value (``lan``, ``direct-v6``, ``direct-v4``, ``direct-portmapped``,
    ``relay``, ``offline``); ``cause`` is a few words for the timeline."""

    old: Destination | None
    new: Destination | None
    cause: str
    kind: str
    rtt: float | None = None  # seconds, the new direct path's smoothed RTT


Output = SendProbe | SendKeepalive | PathChanged


class PathState(Enum):
    WAITING = "waiting"  # known, waiting for the scheduled start
    PROBING = "probing"  # a round of probes is out
    UP = "up"  # answered, and heard from recently enough
    SUSPECT = "suspect"  # was UP, silent too long: probing hard (data also goes via relay)
    DOWN = "down"  # a round got no answer: retry after the backoff


@dataclass(frozen=True, slots=True)
class PathConfig:
    heartbeat: float = 1.0  # probe interval on the active path while the session is active
    trust_timeout: float = 2.5  # active path trusted this long after its last ack (active)
    active_timeout: float = 45.0  # a session is active this long after data went either way
    keepalive: float = 25.0  # idle: send something on every UP path this often
    idle_trust: float = 55.0  # idle: a path is UP this long after we last heard from it
    probe_interval: float = 0.25  # between the probes of one round
    probe_count: int = 5  # probes in a round
    probe_timeout: float = 1.5  # a round fails this long after its last probe
    retry_min: float = 1.0  # first pause before retrying a DOWN path
    retry_max: float = 60.0  # the backoff doubles up to this
    confirmations: int = 2  # acks a path needs before data moves to it
    rtt_margin: float = 0.2  # a faster path must be this much faster (fraction of SRTT) ...
    rtt_min_gain: float = 0.005  # ... and by at least this many seconds
    max_paths: int = 32  # bound on paths (learned ones are evicted first)

    def __post_init__(self) -> None:
        if self.trust_timeout <= self.heartbeat:
            raise ValueError("trust_timeout must exceed the heartbeat interval")
        if min(self.probe_interval, self.retry_min, self.keepalive, self.heartbeat) <= 0:
            raise ValueError("intervals must be positive")
        if self.probe_count < 1 or self.confirmations < 1:
            raise ValueError("probe_count and confirmations are at least 1")


_NEVER = -math.inf
_MAX_OUTSTANDING = 1024
_OUTSTANDING_TTL = 30.0


class Path:
    """One remote direct address and what we know about it. Read it; don't change it."""

    def __init__(
        self,
        destination: Direct,
        kind: CandidateKind,
        priority: int,
        learned: bool,
        config: PathConfig,
    ) -> None:
        self.destination = destination
        self.kind = kind
        self.priority = priority
        self.learned = learned  # peer-reflexive: heard from, not announced
        self.state = PathState.WAITING
        self.srtt: float | None = None
        # the last RTT samples: a faster path must be faster on each (hysteresis)
        self.recent: deque[float] = deque(maxlen=config.confirmations)
        self.observed: Address | None = None  # how the peer saw us on this path
        self.confirmations = 0  # acks since the path last went DOWN
        self.last_ack = _NEVER
        self.last_heard = _NEVER  # ack or any authenticated packet from it
        self.last_sent = _NEVER  # anything: data, probe, keepalive
        self.last_probe = _NEVER
        self.start_at = _NEVER  # WAITING: when the round starts
        self.next_probe = _NEVER  # PROBING / SUSPECT: when the next probe of the round goes
        self.probes_left = 0
        self.round_ends = math.inf
        self.retry_at = math.inf  # DOWN: when the next round starts
        self.backoff = config.retry_min  # the pause after the next failed round

    @property
    def tier(self) -> int:
        return 0 if self.kind is CandidateKind.LAN or self.destination.family == 6 else 1

    def __repr__(self) -> str:
        rtt = f" {self.srtt * 1000:.1f} ms" if self.srtt is not None else ""
        return f"<Path {self.destination} {self.kind.value} {self.state.value}{rtt}>"


def is_lan_address(ip: str) -> bool:
    """An address only its own network reaches: RFC 1918, link-local, ULA. (Not Python's
    ``is_private``, which also counts the documentation and benchmarking ranges.)"""
    addr = ip_address(ip)
    if isinstance(addr, IPv4Address):
        return any(addr in net for net in _LAN_V4)
    return addr.is_link_local or addr in _ULA


class PathManager:
    """The path state machine for one peer. See the module docstring."""

    def __init__(
        self,
        config: PathConfig | None = None,
        *,
        now: float = 0.0,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.config = config or PathConfig()
        self._random_bytes = random_bytes
        self._now = now
        self._paths: dict[Direct, Path] = {}
        self._remote: list[Candidate] = []
        self._local: list[Candidate] = []
        self._relays: list[ViaRelay] = []
        self._start_at = _NEVER
        self._active: Path | None = None
        self._active_until = _NEVER  # the session is active while now < this
        self._active_since = _NEVER
        self._outstanding: dict[bytes, tuple[Direct, float]] = {}
        self._outputs: list[Output] = []
        self._reported: Destination | None = None  # the primary last announced
        self._cause: str | None = None
        self._ever_direct = False
        self._last_source: Direct | None = None
        self._due: float | None = now

    # --- status ---------------------------------------------------------------------------

    @property
    def paths(self) -> list[Path]:
        return list(self._paths.values())

    @property
    def active(self) -> Path | None:
        """The direct path data goes to (UP or SUSPECT), if any."""
        return self._active

    @property
    def relay(self) -> ViaRelay | None:
        """The relay to fall back to: the peer's first relay candidate, else ours."""
        return self._relays[0] if self._relays else None

    @property
    def primary(self) -> Destination | None:
        """Where data primarily flows now (what the console shows)."""
        a = self._active
        if a is not None and a.state is PathState.UP:
            return a.destination
        if self.relay is not None:
            return self.relay
        return a.destination if a is not None else None

    @property
    def kind(self) -> str:
        """The console's ``PathKind`` value for :attr:`primary`."""
        return self._kind_of(self.primary)

    def is_active(self, now: float) -> bool:
        """Has data flowed either way within ``active_timeout``?"""
        return now < self._active_until

    # --- inputs ---------------------------------------------------------------------------

    def local_candidates(self, candidates: Iterable[Candidate]) -> None:
        """Our own candidates: which address families we can use, our relay, our mappings."""
        self._local = list(candidates)
        self._sync()

    def remote_candidates(self, candidates: Iterable[Candidate]) -> None:
        """The peer's candidates (replacing any earlier list): paths to probe, its relay."""
        self._remote = list(candidates)
        self._sync()

    def schedule(self, start_at: float) -> None:
        """The negotiated simultaneous start: every path not UP starts a round at
        ``start_at`` (both sides do, so each side's first probes open its own NAT for the
        other's). Candidates that arrive later start then too."""
        self._start_at = start_at
        for p in self._paths.values():
            p.backoff = self.config.retry_min
            if p.state in (PathState.WAITING, PathState.PROBING, PathState.DOWN):
                self._wait(p, start_at)
        self._due = self._now

    def probe_acked(self, txid: bytes, source: Destination, observed: Address, now: float) -> None:
        """A ``wire.ProbeAck`` arrived (authenticated) from ``source``."""
        self._advance(now)
        sent = self._outstanding.pop(txid, None)
        if sent is not None and isinstance(source, Direct):
            destination, sent_at = sent
            p = self._paths.get(destination)
            if p is not None:
                self._acked(p, now, now - sent_at, observed)
            if source != destination:
                self._heard(source, now)  # it answered from elsewhere: learn that address too
        self._tick(now)

    def received(self, source: Destination, now: float, *, data: bool = False) -> None:
        """Any authenticated packet from ``source``; ``data=True`` when it carried user data
        (a ``wire.Packet``), which keeps the session active."""
        self._advance(now)
        if data:
            if now >= self._active_until:
                self._due = now  # the session just became active: heartbeat, tighter trust
            self._note_data(now)
        if isinstance(source, Direct):
            p = self._paths.get(source)
            if p is not None and p.state is PathState.UP:  # the per-packet case: cheap
                p.last_heard = now
                self._last_source = source
            else:
                self._heard(source, now)
                self._due = now
        if self._due is not None and now >= self._due:
            self._tick(now)

    def network_changed(self, now: float) -> None:
        """Our addresses or interfaces changed: every mapping may be gone. Suspect the active
        path (data goes both ways until it answers) and retry every path at once."""
        self._advance(now)
        for p in self._paths.values():
            p.backoff = self.config.retry_min
            if p is self._active:
                self._start_round(p, now, PathState.SUSPECT)
            else:
                p.confirmations = 0
                self._start_round(p, now, PathState.PROBING)
        self._cause = "network changed"
        self._tick(now)

    def peer_moved(self, now: float) -> None:
        """The peer reached us through the relay while our data goes direct: it has lost that
        path (its process restarted on a new port, it moved). Suspect the active path at
        once — data goes on the relay too until the path answers — instead of sending into
        the void until the trust timeout."""
        self._advance(now)
        a = self._active
        if a is not None and a.state is PathState.UP:
            a.backoff = self.config.retry_min
            self._start_round(a, now, PathState.SUSPECT)
            self._cause = "the peer came back through the relay"
        self._tick(now)

    def route(self, now: float) -> list[Destination]:
        """Where to send one data packet now (possibly two places, possibly none)."""
        if now >= self._active_until:
            self._note_data(now)
            self._due = now  # the session just became active: heartbeat, tighter trust
        else:
            self._active_until = now + self.config.active_timeout
        if self._due is not None and now >= self._due:
            self._tick(now)
        a = self._active
        if a is not None:
            a.last_sent = now
            if a.state is PathState.UP:
                return [a.destination]
            relay = self.relay
            return [a.destination, relay] if relay is not None else [a.destination]
        if self._relays:
            return [self._relays[0]]
        return [self._last_source] if self._last_source is not None else []

    def next_timer(self) -> float | None:
        """When :meth:`handle_timer` must run next (maybe already past), or None."""
        return self._due

    def handle_timer(self, now: float) -> None:
        self._advance(now)
        self._tick(now)

    def take_outputs(self) -> list[Output]:
        """The probes, keepalives and path changes since the last call, in order."""
        out, self._outputs = self._outputs, []
        return out

    # --- internals: candidates ------------------------------------------------------------

    def _advance(self, now: float) -> None:
        self._now = max(self._now, now)

    def _families(self) -> set[int]:
        fams = {c.address.family for c in self._local if isinstance(c.address, Direct)}
        return fams or {4, 6}  # nothing said: try both

    def _sync(self) -> None:
        """Rebuild paths and relays from the two candidate lists."""
        cfg, families = self.config, self._families()
        relays = [c for c in self._remote if isinstance(c.address, ViaRelay)]
        relays += [c for c in self._local if isinstance(c.address, ViaRelay)]
        self._relays = []
        for c in relays:  # stable: the peer's first, then by priority within each list
            if isinstance(c.address, ViaRelay) and c.address not in self._relays:
                self._relays.append(c.address)
        wanted: dict[Direct, Candidate] = {}
        for c in sorted(self._remote, key=lambda c: -c.priority):
            if isinstance(c.address, Direct) and c.address.family in families:
                wanted.setdefault(c.address, c)
        for dest, old in list(self._paths.items()):
            if dest in wanted:
                continue
            keep = old is self._active or (old.learned and dest.family in families)
            if not keep:
                del self._paths[dest]
        start = self._start_at if self._start_at > self._now else self._now
        for dest, c in wanted.items():
            p = self._paths.get(dest)
            if p is None:
                if len(self._paths) >= cfg.max_paths and not self._evict():
                    continue
                p = Path(dest, c.kind, c.priority, learned=False, config=cfg)
                self._paths[dest] = p
                self._wait(p, start)
            else:
                p.kind, p.priority, p.learned = c.kind, c.priority, False
                if p.state is PathState.DOWN:  # new information: try again soon
                    p.backoff = cfg.retry_min
                    self._wait(p, start)
        self._due = self._now

    def _evict(self) -> bool:
        """Make room for one path: drop the stalest non-active learned (else DOWN) path."""
        for pred in (
            lambda p: p.learned and p.state is not PathState.UP,
            lambda p: p.state is PathState.DOWN,
        ):
            victims = [p for p in self._paths.values() if p is not self._active and pred(p)]
            if victims:
                victim = min(victims, key=lambda p: p.last_heard)
                del self._paths[victim.destination]
                return True
        return False

    def _heard(self, source: Direct, now: float) -> None:
        p = self._paths.get(source)
        if p is None:
            # Peer-reflexive (RFC 8445 sec. 7.3.1.3): a packet from an address it never
            # announced, e.g. a new mapping of a symmetric NAT. Probe it at once.
            if len(self._paths) >= self.config.max_paths and not self._evict():
                return
            kind = self._infer_kind(source)
            p = Path(source, kind, 0, learned=True, config=self.config)
            self._paths[source] = p
        p.last_heard = now
        self._last_source = source
        # A triggered check (RFC 8445 sec. 7.3.1.4): the peer is sending from there now, so
        # its NAT is open towards us; answer with our own probe without waiting for a round.
        if p.state in (PathState.WAITING, PathState.DOWN):
            self._start_round(p, now, PathState.PROBING)
        elif (
            p.state in (PathState.PROBING, PathState.SUSPECT)
            and now - p.last_probe >= self.config.probe_interval / 2
        ):
            self._probe(p, now)

    def _infer_kind(self, dest: Direct) -> CandidateKind:
        # The same IP announced with another port: another mapping of the same NAT (or the
        # same LAN host), so the same kind; a NAT's reflexive address over its port mapping.
        same_ip = [
            c.kind
            for c in self._remote
            if isinstance(c.address, Direct) and c.address.ip == dest.ip
        ]
        if same_ip:
            return CandidateKind.REFLEXIVE if CandidateKind.REFLEXIVE in same_ip else same_ip[0]
        if is_lan_address(dest.ip):
            return CandidateKind.LAN
        return CandidateKind.IPV6 if dest.family == 6 else CandidateKind.REFLEXIVE

    # --- internals: the state machine -----------------------------------------------------

    def _note_data(self, now: float) -> None:
        if now >= self._active_until:
            self._active_since = now
        self._active_until = now + self.config.active_timeout

    def _wait(self, p: Path, start_at: float) -> None:
        p.state = PathState.WAITING
        p.start_at = start_at
        p.probes_left = 0

    def _start_round(self, p: Path, now: float, state: PathState) -> None:
        p.state = state
        p.probes_left = self.config.probe_count
        p.next_probe = now
        p.round_ends = math.inf
        p.retry_at = math.inf

    def _probe(self, p: Path, now: float) -> None:
        txid = self._random_bytes(TXID_LEN)
        if len(self._outstanding) >= _MAX_OUTSTANDING:
            self._prune_outstanding(now)
        self._outstanding[txid] = (p.destination, now)
        p.last_probe = p.last_sent = now
        self._outputs.append(SendProbe(txid, p.destination))

    def _prune_outstanding(self, now: float) -> None:
        fresh = {t: v for t, v in self._outstanding.items() if now - v[1] < _OUTSTANDING_TTL}
        while len(fresh) >= _MAX_OUTSTANDING:  # still full: forget the oldest
            del fresh[next(iter(fresh))]
        self._outstanding = fresh

    def _acked(self, p: Path, now: float, rtt: float, observed: Address) -> None:
        # RFC 6298 sec. 2: SRTT <- (1 - 1/8) SRTT + 1/8 R'
        rtt = max(rtt, 0.0)
        p.srtt = rtt if p.srtt is None else p.srtt + (rtt - p.srtt) / 8
        p.recent.append(rtt)
        p.last_ack = p.last_heard = now
        p.observed = observed
        p.confirmations += 1
        p.backoff = self.config.retry_min
        if p.state is PathState.SUSPECT and p is self._active:
            self._cause = "back to direct"
        if p.state is not PathState.UP:
            p.state = PathState.UP
            p.probes_left = 0
            p.round_ends = p.retry_at = math.inf
        if p is not self._active and p.confirmations < self.config.confirmations:
            self._probe(p, now)  # confirm at once rather than at the next round slot

    def _trust_deadline(self, p: Path, active: bool) -> float:
        if active and p is self._active:
            return max(p.last_ack, self._active_since) + self.config.trust_timeout
        return p.last_heard + self.config.idle_trust

    def _tick(self, now: float) -> None:
        # A pass can change the active path, whose timers then may already be due (a new
        # active path heartbeats at once): a second pass settles it. Two always suffice.
        for _ in range(3):
            active = self.is_active(now)
            for p in list(self._paths.values()):
                self._service(p, now, active)
            self._reselect(now)
            self._announce()
            self._due = self._compute_due(now)
            if self._due is None or self._due > now:
                break
        self._cause = None  # a cause explains a change in this tick or none at all

    def _service(self, p: Path, now: float, active: bool) -> None:
        """Run whatever is due on one path (the transitions drawn in the module docstring)."""
        cfg = self.config
        if p.state is PathState.WAITING and now >= p.start_at:
            self._start_round(p, now, PathState.PROBING)
        if p.state is PathState.DOWN and now >= p.retry_at:
            self._start_round(p, now, PathState.PROBING)
        if p.state in (PathState.PROBING, PathState.SUSPECT):
            if p.probes_left > 0 and now >= p.next_probe:
                self._probe(p, now)
                p.probes_left -= 1
                p.next_probe = now + cfg.probe_interval
                if p.probes_left == 0:
                    p.round_ends = now + cfg.probe_timeout
            elif p.probes_left == 0 and now >= p.round_ends:
                p.state = PathState.DOWN
                p.confirmations = 0
                p.recent.clear()
                p.round_ends = math.inf
                p.retry_at = now + p.backoff
                p.backoff = min(p.backoff * 2, cfg.retry_max)
        elif p.state is PathState.UP:
            deadline = self._trust_deadline(p, active)
            if now >= deadline:
                if p is self._active:
                    base = deadline - (cfg.trust_timeout if active else cfg.idle_trust)
                    self._cause = f"direct path silent for {now - base:.1f} s"
                    self._start_round(p, now, PathState.SUSPECT)
                    for other in self._paths.values():  # a standby may take over: ask it now
                        if other is not p and other.state is PathState.UP:
                            self._probe(other, now)
                else:
                    self._start_round(p, now, PathState.PROBING)
                self._service(p, now, active)  # the round's first probe, now
            elif p is self._active and active:
                if now >= p.last_probe + cfg.heartbeat:
                    self._probe(p, now)
            elif now >= p.last_sent + cfg.keepalive:
                if now - p.last_heard < cfg.keepalive:
                    p.last_sent = now
                    self._outputs.append(SendKeepalive(p.destination))
                else:
                    self._probe(p, now)

    def _rank(self, p: Path) -> tuple[int, float, int]:
        return (p.tier, p.srtt if p.srtt is not None else math.inf, -p.priority)

    def _clearly_better(self, p: Path, cur: Path) -> bool:
        if p.tier != cur.tier:
            return p.tier < cur.tier
        cfg = self.config
        if cur.srtt is None or len(p.recent) < cfg.confirmations:
            return False
        # Faster on each of its last samples, not only on average: one lucky sample of a
        # rarely probed standby path must not pull the session over (no flapping).
        worst = max(p.recent)
        return worst < cur.srtt * (1 - cfg.rtt_margin) and cur.srtt - worst > cfg.rtt_min_gain

    def _reselect(self, now: float) -> None:
        cur = self._active
        need = self.config.confirmations
        if cur is None and self.relay is None:
            need = 1  # nothing else to send on: take the first path that answers
        # While data flows, only a path that answered within the trust timeout may take it
        # over: a standby path last heard from 20 s ago is probed first (see _service).
        active = self.is_active(now)
        trust = self.config.trust_timeout
        ups = [
            p
            for p in self._paths.values()
            if p.state is PathState.UP
            and p is not cur
            and p.confirmations >= need
            and (not active or now - p.last_ack < trust)
        ]
        if cur is not None and cur.state is PathState.UP:
            better = [p for p in ups if self._clearly_better(p, cur)]
            if better:
                best = min(better, key=self._rank)
                self._cause = self._why_better(best, cur)
                self._active = best
            return
        if ups:
            best = min(ups, key=self._rank)
            if cur is not None and cur.state is not PathState.UP:
                silent = now - max(cur.last_ack, cur.last_heard)
                self._cause = f"direct path silent for {silent:.1f} s, moved to {self._label(best)}"
            elif not self._ever_direct:
                self._cause = {0: f"{self._label(best)} path found", 1: "punched"}[best.tier]
            elif self._cause != "network changed":
                self._cause = "back to direct"
            self._active = best
            self._ever_direct = True
        elif cur is not None and cur.state is not PathState.SUSPECT:
            self._active = None  # its round failed: relay only

    def _why_better(self, p: Path, cur: Path) -> str:
        if p.tier != cur.tier:
            return f"{self._label(p)} preferred over {self._label(cur)}"
        assert cur.srtt is not None  # _clearly_better checked
        ms = max(p.recent) * 1000
        return f"lower latency: {ms:.0f} ms instead of {cur.srtt * 1000:.0f} ms"

    def _label(self, p: Path) -> str:
        return {
            "lan": "LAN",
            "direct-v6": "IPv6",
            "direct-portmapped": "IPv4 (port-mapped)",
            "direct-v4": "IPv4",
        }[self._kind_of(p.destination)]

    def _kind_of(self, dest: Destination | None) -> str:
        if dest is None:
            return "offline"
        if isinstance(dest, ViaRelay):
            return "relay"
        p = self._paths.get(dest)
        kind = p.kind if p is not None else self._infer_kind(dest)
        if kind is CandidateKind.LAN:
            return "lan"
        if dest.family == 6:
            return "direct-v6"
        mapped = {
            c.address.addr
            for c in self._local
            if c.kind is CandidateKind.PORTMAPPED and isinstance(c.address, Direct)
        }
        if kind is CandidateKind.PORTMAPPED or (p is not None and p.observed in mapped):
            return "direct-portmapped"
        return "direct-v4"

    def _announce(self) -> None:
        new = self.primary
        if new == self._reported:
            return
        cause = self._cause
        if cause is None or (isinstance(new, ViaRelay) and cause == "back to direct"):
            if isinstance(new, ViaRelay):
                cause = "through " + str(new) if self._reported is None else "direct path lost"
            elif new is None:
                cause = "no path"
            else:
                cause = "direct path found"
        rtt = None
        if isinstance(new, Direct) and (p := self._paths.get(new)) is not None:
            rtt = p.srtt
        self._outputs.append(PathChanged(self._reported, new, cause, self._kind_of(new), rtt))
        self._reported = new
        self._cause = None

    def _compute_due(self, now: float) -> float | None:
        cfg = self.config
        active = self.is_active(now)
        due = self._active_until if active else math.inf
        for p in self._paths.values():
            s = p.state
            if s is PathState.WAITING:
                due = min(due, p.start_at)
            elif s is PathState.DOWN:
                due = min(due, p.retry_at)
            elif s is not PathState.UP:
                due = min(due, p.next_probe if p.probes_left > 0 else p.round_ends)
            else:
                due = min(due, self._trust_deadline(p, active))
                if p is self._active and active:
                    due = min(due, p.last_probe + cfg.heartbeat)
                else:
                    due = min(due, p.last_sent + cfg.keepalive)
        return None if math.isinf(due) else due
