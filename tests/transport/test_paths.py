"""The path manager's timers and choices on a fake clock, then two path managers punching
through the NAT simulator with a relay beside them."""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport import natsim
from transport.natsim import NAT1, NAT3, NAT4, Datagram, Network
from transport.paths import (
    Candidate,
    CandidateKind,
    Destination,
    Direct,
    Output,
    PathChanged,
    PathConfig,
    PathManager,
    PathState,
    SendKeepalive,
    SendProbe,
    ViaRelay,
)

K = CandidateKind
OBSERVED = ("203.0.113.10", 41641)
RELAY = ViaRelay("eu")
A4 = Direct("198.51.100.20", 41641)  # the peer's reflexive address
B4 = Direct("198.51.100.21", 5555)  # another (e.g. a second NAT mapping)
LAN = Direct("192.168.1.20", 41641)
V6 = Direct("2001:db8:2::20", 41641)
LOCAL = [
    Candidate(K.LAN, Direct("192.168.1.10", 41641)),
    Candidate(K.REFLEXIVE, Direct("203.0.113.10", 41641)),
    Candidate(K.IPV6, Direct("2001:db8:1::10", 41641)),
    Candidate(K.RELAY, RELAY),
]


class Harness:
    """One PathManager on a fake clock; a scripted far side answers probes on live paths.

    ``answers`` maps a path to its RTT (seconds); a path missing from it is dead. Acks already
    in flight when a path dies still arrive, as on a real wire.
    """

    def __init__(
        self,
        answers: dict[Direct, float] | None = None,
        *,
        config: PathConfig | None = None,
        jitter: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.pm = PathManager(config, random_bytes=random.Random(seed).randbytes)
        self.answers = dict(answers or {})
        self.jitter = jitter
        self.rng = random.Random(seed + 1)
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.log: list[tuple[float, Output]] = []
        self.routes: list[tuple[float, list[Destination]]] = []
        self.acked: list[tuple[float, Direct]] = []
        self._data: float | None = None

    def at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._seq), fn))

    def send_data(self, every: float | None) -> None:
        """Route one data packet every ``every`` seconds from now on (None: stop)."""
        self._data = every
        if every is not None:
            self.at(self.now, self._data_tick)

    def _data_tick(self) -> None:
        if self._data is None:
            return
        self.routes.append((self.now, self.pm.route(self.now)))
        self.at(self.now + self._data, self._data_tick)

    def run_until(self, t: float) -> None:
        for _ in range(2_000_000):
            timer = self.pm.next_timer()
            nxt = min(
                timer if timer is not None else math.inf,
                self._events[0][0] if self._events else math.inf,
            )
            if nxt > t:
                break
            self.now = max(self.now, nxt)
            if self._events and self._events[0][0] <= self.now:
                _, _, fn = heapq.heappop(self._events)
                fn()
            else:
                self.pm.handle_timer(self.now)
            self._collect()
        else:
            raise AssertionError("busy loop")
        self.now = t

    def _collect(self) -> None:
        for out in self.pm.take_outputs():
            self.log.append((self.now, out))
            if isinstance(out, SendProbe) and out.destination in self.answers:
                rtt = self.answers[out.destination]
                rtt *= 1 + self.rng.uniform(-self.jitter, self.jitter)
                self.at(self.now + rtt, self._acker(out))

    def _acker(self, probe: SendProbe) -> Callable[[], None]:
        def ack() -> None:
            self.acked.append((self.now, probe.destination))
            self.pm.probe_acked(probe.txid, probe.destination, OBSERVED, self.now)

        return ack

    def call(self, fn: Callable[[float], None]) -> None:
        """Feed an event now, then collect what it produced."""
        fn(self.now)
        self._collect()

    # -- reading the log --

    def probes(self, dest: Direct | None = None, after: float = -1.0) -> list[float]:
        return [
            t
            for t, o in self.log
            if isinstance(o, SendProbe) and (dest is None or o.destination == dest) and t > after
        ]

    def keepalives(self, dest: Direct) -> list[float]:
        return [t for t, o in self.log if isinstance(o, SendKeepalive) and o.destination == dest]

    def changes(self) -> list[tuple[float, PathChanged]]:
        return [(t, o) for t, o in self.log if isinstance(o, PathChanged)]

    def route_at(self, t: float) -> list[Destination]:
        return next(r for when, r in self.routes if when >= t)


def established(
    answers: dict[Direct, float],
    remote: list[Candidate] | None = None,
    *,
    jitter: float = 0.0,
    seed: int = 0,
) -> Harness:
    """A harness whose manager was given candidates at t=0 and settled for 1 s."""
    h = Harness(answers, jitter=jitter, seed=seed)
    h.pm.local_candidates(LOCAL)
    h.pm.remote_candidates(
        remote if remote is not None else [Candidate(K.REFLEXIVE, A4), Candidate(K.RELAY, RELAY)]
    )
    h.run_until(1.0)
    return h


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


# --- establishing a path ----------------------------------------------------------------------


def test_probes_wait_for_the_scheduled_simultaneous_start() -> None:
    h = Harness({A4: 0.04})
    h.pm.local_candidates(LOCAL)
    h.pm.remote_candidates([Candidate(K.REFLEXIVE, A4), Candidate(K.RELAY, RELAY)])
    h.pm.schedule(5.0)
    h.run_until(4.999)
    assert h.probes() == []
    assert [(c.new, c.cause, c.kind) for _, c in h.changes()] == [
        (RELAY, "through relay eu", "relay")
    ]
    assert h.pm.route(4.999) == [RELAY]
    h.run_until(6)
    assert h.probes(A4)[0] == 5.0


def test_a_punched_path_takes_two_acks_then_carries_the_data() -> None:
    h = established({A4: 0.04})
    first_ack, second_ack = (t for t, _ in h.acked[:2])
    assert first_ack == pytest.approx(0.04)
    # the confirming probe left at the first ack, not at the next slot of the round
    assert second_ack == pytest.approx(0.08)
    [(_, to_relay), (t, punched)] = h.changes()
    assert to_relay.new == RELAY
    assert t == second_ack
    assert (punched.old, punched.new, punched.cause, punched.kind) == (
        RELAY,
        A4,
        "punched",
        "direct-v4",
    )
    assert punched.rtt == pytest.approx(0.04)
    assert h.pm.route(1.0) == [A4]
    assert h.pm.active is not None and h.pm.active.state is PathState.UP


def test_without_a_relay_the_first_answer_is_used_at_once() -> None:
    h = Harness({A4: 0.04})
    h.pm.local_candidates([c for c in LOCAL if c.kind is not K.RELAY])
    h.pm.remote_candidates([Candidate(K.REFLEXIVE, A4)])
    h.run_until(1)
    [(t, found)] = h.changes()
    assert t == pytest.approx(0.04) and found.new == A4 and found.old is None


def test_an_unanswered_candidate_leaves_the_data_on_the_relay() -> None:
    h = established({})
    h.send_data(0.1)
    h.run_until(30)
    assert {tuple(r) for _, r in h.routes} == {(RELAY,)}
    assert [c.new for _, c in h.changes()] == [RELAY]


def test_a_peer_reflexive_source_is_probed_at_once() -> None:
    h = established({B4: 0.03})
    h.run_until(2.0)
    h.call(lambda now: h.pm.received(B4, now))
    assert h.probes(B4) == [2.0]
    path = next(p for p in h.pm.paths if p.destination == B4)
    assert path.learned and path.kind is K.REFLEXIVE
    h.run_until(3)
    assert h.pm.primary == B4
    assert h.changes()[-1][1].cause == "punched"


def test_hearing_from_a_down_path_retries_it_at_once() -> None:
    h = established({})
    h.run_until(100)
    [path] = [p for p in h.pm.paths if p.destination == A4]
    assert path.state is PathState.DOWN and path.retry_at > 110  # the backoff is long by now
    h.answers[A4] = 0.03
    h.call(lambda now: h.pm.received(A4, now))  # the peer's probe got through
    assert h.probes(A4, after=99.9) == [100.0]
    h.run_until(101)
    assert h.pm.primary == A4


# --- timers -------------------------------------------------------------------------------------


def test_heartbeats_every_second_while_data_flows() -> None:
    h = established({A4: 0.04})
    h.send_data(0.05)
    h.run_until(20)
    beats = h.probes(A4, after=2.0)
    assert len(beats) >= 17
    assert set(gaps(beats)) == {1.0}
    assert all(r == [A4] for _, r in h.routes)  # never fell back: every heartbeat answered


def test_keepalives_every_25_s_when_idle() -> None:
    h = established({A4: 0.04})
    h.send_data(0.05)
    h.run_until(10)
    h.send_data(None)
    h.run_until(400)
    # 45 s after the last data the session is idle: heartbeats stop ...
    last_beat = h.probes(A4, after=5)[0]
    idle_probes = [t for t in h.probes(A4) if t > 56]
    # ... and something goes out every 25 s: a keepalive when we heard from the peer in
    # that time, else a probe (whose answer refreshes what we know). The peer here only answers.
    sent = sorted(h.keepalives(A4) + idle_probes)
    assert last_beat < 56
    assert set(gaps(sent)) == {25.0}
    assert len(h.keepalives(A4)) >= 6 and len(idle_probes) >= 6
    assert h.pm.primary == A4  # the idle path stayed up the whole time
    assert len(h.changes()) == 2


def test_idle_keepalives_only_while_the_peer_keeps_talking() -> None:
    h = established({A4: 0.04})
    for i in range(1, 20):  # the peer's own keepalives arrive every 20 s
        h.at(i * 20.0, lambda: h.call(lambda now: h.pm.received(A4, now)))
    h.run_until(390)
    assert h.probes(A4, after=1.0) == []
    assert set(gaps(h.keepalives(A4))) == {25.0}


def test_trust_timeout_sends_both_ways_then_relay_only() -> None:
    h = established({A4: 0.04})
    h.send_data(0.05)
    h.run_until(10.5)
    del h.answers[A4]  # the direct path dies at 10.5 s
    h.run_until(30)
    [(t_fail, fail)] = [(t, c) for t, c in h.changes() if t > 10.5]
    assert fail.old == A4 and fail.new == RELAY and fail.kind == "relay"
    assert fail.cause.startswith("direct path silent for 2.")
    assert t_fail - 10.5 < 3.0
    assert h.route_at(t_fail - 0.1) == [A4]
    assert h.route_at(t_fail) == [A4, RELAY]  # dual sending while the path is suspect
    # the suspect round: 5 probes 250 ms apart, given up 1.5 s after the last one
    round_end = t_fail + 4 * 0.25 + 1.5
    assert h.route_at(round_end - 0.05) == [A4, RELAY]
    assert h.route_at(round_end + 0.05) == [RELAY]
    assert h.pm.active is None
    assert next(p for p in h.pm.paths if p.destination == A4).state is not PathState.UP


def test_recovery_goes_back_to_direct_after_two_confirmations() -> None:
    h = established({A4: 0.04})
    h.send_data(0.05)
    h.run_until(10.5)
    del h.answers[A4]
    h.run_until(40)
    assert h.pm.route(40) == [RELAY]
    h.answers[A4] = 0.04
    h.run_until(120)
    first_ack = next(t for t, dest in h.acked if t > 40)
    [(t_back, back)] = [(t, c) for t, c in h.changes() if t > 40]
    assert (back.old, back.new, back.cause) == (RELAY, A4, "back to direct")
    assert t_back == pytest.approx(first_ack + 0.04)  # the second ack, one RTT later
    assert h.route_at(first_ack) == [RELAY]
    assert h.route_at(t_back) == [A4]


def test_a_suspect_path_that_answers_again_is_trusted_at_once() -> None:
    h = established({A4: 0.04})
    h.send_data(0.05)
    h.run_until(10.5)
    del h.answers[A4]
    h.run_until(13.3)  # suspect since ~12.9 s
    assert h.pm.route(13.3) == [A4, RELAY]
    h.answers[A4] = 0.04
    h.run_until(20)
    [(_, down), (t_back, back)] = [(t, c) for t, c in h.changes() if t > 10.5]
    assert down.new == RELAY
    assert back.new == A4 and back.cause == "back to direct"
    assert t_back < 13.3 + 0.25 + 0.05  # the next probe of the round, answered once


def test_retries_back_off_from_1_s_doubling_to_60_s_and_reset() -> None:
    h = established({})
    h.run_until(400)
    probes = h.probes(A4)
    rounds = [[probes[0]]]
    for a, b in itertools.pairwise(probes):
        if b - a > 0.3:
            rounds.append([b])
        else:
            rounds[-1].append(b)
    assert all(len(r) == 5 for r in rounds[:-1])
    pauses = [round(nxt[0] - (cur[-1] + 1.5), 6) for cur, nxt in itertools.pairwise(rounds)]
    assert pauses[:8] == [1, 2, 4, 8, 16, 32, 60, 60]
    # a network change retries at once and starts the backoff over
    h.run_until(401)
    h.call(h.pm.network_changed)
    assert h.probes(A4, after=400.9) == [401.0]
    h.run_until(420)
    after = h.probes(A4, after=402.1)
    assert after[0] == pytest.approx(401 + 1.0 + 1.5 + 1.0)  # round, 1.5 s wait, 1 s pause


def test_new_candidates_and_a_schedule_reset_the_backoff() -> None:
    h = established({})
    h.run_until(200)  # the pause is at 60 s by now
    h.pm.schedule(201.0)
    h.run_until(210)
    assert h.probes(A4, after=200)[0] == 201.0


def test_network_change_suspects_the_active_path_and_retries_at_once() -> None:
    h = established({A4: 0.04, LAN: 0.002})
    h.pm.remote_candidates([Candidate(K.REFLEXIVE, A4), Candidate(K.RELAY, RELAY)])
    h.send_data(0.05)
    h.run_until(5)
    assert h.pm.primary == A4
    h.call(h.pm.network_changed)
    assert h.probes(A4, after=4.999) == [5.0]
    [change] = [c for t, c in h.changes() if t >= 5]
    assert (change.old, change.new, change.cause) == (A4, RELAY, "network changed")
    assert h.pm.route(5.0) == [A4, RELAY]
    h.run_until(6)
    back = h.changes()[-1][1]
    assert (back.new, back.cause) == (A4, "back to direct")
    assert h.changes()[-1][0] == pytest.approx(5.04)


# --- preference and hysteresis ------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_no_flapping_between_two_similar_paths_under_rtt_noise(seed: int) -> None:
    remote = [Candidate(K.REFLEXIVE, A4), Candidate(K.REFLEXIVE, B4), Candidate(K.RELAY, RELAY)]
    # equal paths, every RTT sample +-25 %: the first path to be confirmed keeps the data
    h = established({A4: 0.020, B4: 0.020}, remote, jitter=0.25, seed=seed)
    h.send_data(0.1)
    h.run_until(600)
    directs = [c for _, c in h.changes() if isinstance(c.new, Direct)]
    assert len(directs) == 1, [(c.old, c.new, c.cause) for c in directs]
    # 10 % apart: at most one move, towards the faster one, and never back
    h = established({A4: 0.022, B4: 0.020}, remote, jitter=0.25, seed=seed)
    h.send_data(0.1)
    h.run_until(600)
    directs = [c for _, c in h.changes() if isinstance(c.new, Direct)]
    assert len(directs) <= 2, [(c.old, c.new, c.cause) for c in directs]
    assert directs[-1].new == B4 or len(directs) == 1
    assert all(c.cause.startswith(("punched", "lower latency")) for c in directs)


def test_a_clearly_faster_path_wins_once_confirmed() -> None:
    remote = [Candidate(K.REFLEXIVE, A4), Candidate(K.REFLEXIVE, B4), Candidate(K.RELAY, RELAY)]
    h = established({A4: 0.040}, remote)
    h.send_data(0.1)
    h.run_until(5)
    assert h.pm.primary == A4
    h.answers[B4] = 0.010  # B4 starts answering; its retry finds it
    h.run_until(60)
    switch = h.changes()[-1][1]
    assert (switch.old, switch.new) == (A4, B4)
    assert switch.cause == "lower latency: 10 ms instead of 40 ms"
    h.run_until(600)
    assert h.changes()[-1][1] is switch


def test_ipv6_is_preferred_over_ipv4_even_when_slower() -> None:
    h = established({A4: 0.020, V6: 0.030})
    h.pm.remote_candidates(
        [Candidate(K.REFLEXIVE, A4), Candidate(K.IPV6, V6), Candidate(K.RELAY, RELAY)]
    )
    h.run_until(3)
    last = h.changes()[-1][1]
    assert (last.old, last.new, last.kind) == (A4, V6, "direct-v6")
    assert last.cause == "IPv6 preferred over IPv4"


def test_no_ipv6_probes_without_a_local_ipv6_candidate() -> None:
    h = Harness({V6: 0.01, A4: 0.02})
    h.pm.local_candidates([c for c in LOCAL if c.kind is not K.IPV6])
    h.pm.remote_candidates([Candidate(K.IPV6, V6), Candidate(K.REFLEXIVE, A4)])
    h.run_until(10)
    assert h.probes(V6) == []
    assert h.pm.primary == A4


def test_the_lan_is_preferred_over_a_punched_path() -> None:
    h = established({A4: 0.020})
    h.answers[LAN] = 0.001
    h.pm.remote_candidates(
        [Candidate(K.REFLEXIVE, A4), Candidate(K.LAN, LAN), Candidate(K.RELAY, RELAY)]
    )
    h.run_until(3)
    last = h.changes()[-1][1]
    assert (last.old, last.new, last.kind, last.cause) == (
        A4,
        LAN,
        "lan",
        "LAN preferred over IPv4",
    )


def test_a_dead_active_path_hands_over_to_a_live_standby() -> None:
    h = established({A4: 0.020, LAN: 0.002})
    h.pm.remote_candidates(
        [Candidate(K.REFLEXIVE, A4), Candidate(K.LAN, LAN), Candidate(K.RELAY, RELAY)]
    )
    h.send_data(0.05)
    h.run_until(10)
    assert h.pm.primary == LAN
    del h.answers[LAN]
    h.run_until(60)
    [(t_relay, relay), (t_standby, standby)] = [(t, c) for t, c in h.changes() if t > 10]
    # the standby's last answer is too old to trust with the data at once: relay and LAN
    # both carry it while the standby is asked, and one answer later the standby takes over
    assert (relay.old, relay.new) == (LAN, RELAY)
    assert (standby.old, standby.new) == (RELAY, A4)
    assert t_standby == pytest.approx(t_relay + 0.02)
    assert standby.cause == "direct path silent for 2.5 s, moved to IPv4"


def test_port_mapped_paths_are_labelled_for_the_console() -> None:
    mapped = Candidate(K.PORTMAPPED, Direct("203.0.113.10", 41641))
    h = Harness({A4: 0.02})
    h.pm.local_candidates([*LOCAL, mapped])
    h.pm.remote_candidates([Candidate(K.REFLEXIVE, A4), Candidate(K.RELAY, RELAY)])
    h.run_until(1)
    # the peer saw our probes come from our port mapping (OBSERVED): a port-mapped path
    assert h.pm.kind == "direct-portmapped"
    assert h.changes()[-1][1].kind == "direct-portmapped"


def test_candidates_are_validated() -> None:
    with pytest.raises(ValueError, match="RELAY"):
        Candidate(K.RELAY, A4)
    with pytest.raises(ValueError, match="RELAY"):
        Candidate(K.LAN, RELAY)
    with pytest.raises(ValueError, match="port"):
        Candidate(K.LAN, Direct("192.168.1.1", 0))
    with pytest.raises(ValueError):
        Candidate(K.LAN, Direct("not an ip", 1))
    with pytest.raises(ValueError, match="trust_timeout"):
        PathConfig(heartbeat=3, trust_timeout=2)


# --- properties ---------------------------------------------------------------------------------

DESTS = [A4, B4, LAN, V6]
ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["timer", "ack", "heard", "data", "net", "cands", "sched", "kill"]),
        st.floats(min_value=0.0, max_value=30.0),
        st.integers(min_value=0, max_value=3),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ACTIONS)
def test_any_event_sequence_keeps_the_machine_sane(actions: list[tuple[str, float, int]]) -> None:
    pm = PathManager(random_bytes=random.Random(0).randbytes)
    pm.local_candidates(LOCAL)
    now = 0.0
    sent: list[SendProbe] = []
    reported: Destination | None = None
    for action, dt, i in actions:
        now += dt
        dest = DESTS[i]
        if action == "timer":
            pm.handle_timer(now)
            due = pm.next_timer()
            assert due is None or due > now  # handled means handled: no busy loop
        elif action == "ack" and sent:
            probe = sent[i % len(sent)]
            pm.probe_acked(probe.txid, probe.destination, OBSERVED, now)
        elif action == "heard":
            pm.received(dest, now, data=i % 2 == 0)
        elif action == "data":
            route = pm.route(now)
            assert len(route) <= 2 and len(set(route)) == len(route)
        elif action == "net":
            pm.network_changed(now)
        elif action == "cands":
            pm.remote_candidates(
                [Candidate(K.REFLEXIVE, d) for d in DESTS[: i + 1]] + [Candidate(K.RELAY, RELAY)]
            )
        elif action == "sched":
            pm.schedule(now + dt)
        elif action == "kill":
            sent.clear()
        for out in pm.take_outputs():
            if isinstance(out, SendProbe):
                assert out.destination in {p.destination for p in pm.paths}
                sent.append(out)
            elif isinstance(out, PathChanged):
                assert out.old == reported and out.new != out.old
                reported = out.new
        if action == "timer":
            assert pm.primary == reported  # every change of the primary path was announced
        assert len(pm.paths) <= pm.config.max_paths


# --- two path managers over the NAT simulator ------------------------------------------------
#
# Plain, unencrypted messages stand in for the session layer's inner frames:
#   b"W"                      -> the relay answers b"w" + "ip port" (a STUN stand-in)
#   b"R" + name               -> register at the relay under a one-byte name
#   b"S" + to + payload       -> relay: forward payload to peer ``to`` as b"V" + from + payload
#   payload: b"P" + txid (probe), b"A" + txid + "ip port" (ack), b"K" (keepalive),
#            b"D" + seq (data)

RELAY_IP = "192.0.2.1"
RELAY_PORT = 3478


class SimRelay:
    def __init__(self, net: Network) -> None:
        self.sock = net.add_host("relay", RELAY_IP, latency=0.010).bind(RELAY_PORT)
        self.sock.on_receive = self.receive
        self.peers: dict[bytes, natsim.Address] = {}

    def receive(self, dg: Datagram) -> None:
        kind, body = dg.data[:1], dg.data[1:]
        if kind == b"W":
            self.sock.sendto(b"w" + f"{dg.src[0]} {dg.src[1]}".encode(), dg.src)
        elif kind == b"R":
            self.peers[body] = dg.src
        elif kind == b"S" and body[:1] in self.peers:
            source = next((n for n, a in self.peers.items() if a == dg.src), None)
            if source is not None:
                self.sock.sendto(b"V" + source + body[1:], self.peers[body[:1]])


class SimPeer:
    """A path manager with a socket: the part of a future ``Peer`` that this test needs."""

    def __init__(self, net: Network, name: str, host: natsim.Host, other: str, seed: int) -> None:
        self.net, self.name, self.other = net, name.encode(), other.encode()
        self.pm = PathManager(random_bytes=random.Random(seed).randbytes)
        self.sock = host.bind(41641)
        self.sock.on_receive = self.receive
        self.timer: natsim.Timer | None = None
        self.changes: list[tuple[float, PathChanged]] = []
        self.reflexive: Direct | None = None
        self.data_seen: list[tuple[float, int, Destination]] = []
        self._seq = 0

    # the socket side
    def send(self, payload: bytes, dest: Destination) -> None:
        if isinstance(dest, Direct):
            self.sock.sendto(payload, dest.addr)
        else:
            self.sock.sendto(b"S" + self.other + payload, (RELAY_IP, RELAY_PORT))

    def receive(self, dg: Datagram) -> None:
        now = self.net.now
        if dg.src == (RELAY_IP, RELAY_PORT):
            kind, body = dg.data[:1], dg.data[1:]
            if kind == b"w":
                ip, port = body.decode().split()
                self.reflexive = Direct(ip, int(port))
                return
            if kind != b"V":
                return
            self.payload(body[1:], RELAY, now)
        else:
            self.payload(dg.data, Direct(*dg.src), now)
        self.pump()

    def payload(self, data: bytes, source: Destination, now: float) -> None:
        kind, body = data[:1], data[1:]
        if kind == b"P":  # the session layer answers probes where they came from
            seen = source.addr if isinstance(source, Direct) else ("192.0.2.1", 0)
            self.send(b"A" + body + f"{seen[0]} {seen[1]}".encode(), source)
            self.pm.received(source, now)
        elif kind == b"A":
            ip, port = body[8:].decode().split()
            self.pm.probe_acked(body[:8], source, (ip, int(port)), now)
        elif kind == b"K":
            self.pm.received(source, now)
        elif kind == b"D":
            self.data_seen.append((now, int(body), source))
            self.pm.received(source, now, data=True)

    # the manager side
    def pump(self) -> None:
        for out in self.pm.take_outputs():
            if isinstance(out, SendProbe):
                self.send(b"P" + out.txid, out.destination)
            elif isinstance(out, SendKeepalive):
                self.send(b"K", out.destination)
            else:
                self.changes.append((self.net.now, out))
        due = self.pm.next_timer()
        if self.timer is not None and (due is None or self.timer.when != due):
            self.timer.cancel()
            self.timer = None
        if due is not None and self.timer is None:
            self.timer = self.net.call_at(due, self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        self.pm.handle_timer(self.net.now)
        self.pump()

    def send_data(self) -> None:
        self._seq += 1
        for dest in self.pm.route(self.net.now):
            self.send(b"D" + str(self._seq).encode(), dest)
        self.pump()

    def register(self) -> None:  # and keep the relay's NAT mapping alive
        self.sock.sendto(b"R" + self.name, (RELAY_IP, RELAY_PORT))
        self.sock.sendto(b"W", (RELAY_IP, RELAY_PORT))
        self.net.call_later(15, self.register)


def nat_pair(
    client_nat: natsim.Behavior,
    box_nat: natsim.Behavior,
    *,
    seed: int = 7,
    map_box: bool = False,
    ipv6: bool = False,
    same_lan: bool = False,
) -> tuple[Network, SimPeer, SimPeer]:
    """A client and a box behind their own NATs (or one NAT, ``same_lan``), a relay,
    candidates exchanged through a stand-in for the box's negotiation, and a simultaneous
    start at t = 1 s."""
    net = Network(seed=seed)
    SimRelay(net)
    client_router = net.add_router("client-nat", client_nat, "203.0.113.10")
    box_router = client_router if same_lan else net.add_router("box-nat", box_nat, "198.51.100.20")
    client_addrs = ["192.168.1.10"] + (["2001:db8:1::10"] if ipv6 else [])
    box_addrs = ["192.168.1.20" if same_lan else "10.0.0.2"] + (["2001:db8:2::2"] if ipv6 else [])
    client = SimPeer(net, "c", net.add_host("client", client_addrs, behind=client_router), "b", 1)
    box = SimPeer(net, "b", net.add_host("box", box_addrs, behind=box_router), "c", 2)
    box_mapping = box_router.add_port_mapping((box_addrs[0], 41641), 41641) if map_box else None
    for peer in (client, box):
        peer.register()
    net.run_until(0.5)
    assert client.reflexive is not None and box.reflexive is not None

    def candidates(peer: SimPeer, addrs: list[str]) -> list[Candidate]:
        assert peer.reflexive is not None
        found = [
            Candidate(K.LAN, Direct(addrs[0], 41641)),
            Candidate(K.REFLEXIVE, peer.reflexive),
            Candidate(K.RELAY, RELAY),
        ]
        found += [Candidate(K.IPV6, Direct(a, 41641)) for a in addrs[1:]]
        if peer is box and box_mapping is not None:
            found.append(Candidate(K.PORTMAPPED, Direct(*box_mapping), priority=1))
        return found

    client_cands, box_cands = candidates(client, client_addrs), candidates(box, box_addrs)
    for peer, mine, theirs in ((client, client_cands, box_cands), (box, box_cands, client_cands)):
        peer.pm.local_candidates(mine)
        peer.pm.remote_candidates(theirs)
        peer.pm.schedule(1.0)
        peer.pm.handle_timer(net.now)
        peer.pump()
    return net, client, box


def test_dual_stack_peers_settle_on_ipv6_through_both_firewalls() -> None:
    net, client, box = nat_pair(NAT3, NAT3, ipv6=True)
    net.run_until(10)
    for peer, far in ((client, "2001:db8:2::2"), (box, "2001:db8:1::10")):
        assert peer.pm.primary == Direct(far, 41641)
        assert peer.pm.kind == "direct-v6"
        assert "IPv6" in peer.changes[-1][1].cause


def test_peers_behind_one_nat_use_the_lan() -> None:
    net, client, box = nat_pair(NAT4, NAT4, same_lan=True)
    net.run_until(10)
    for peer, far in ((client, "192.168.1.20"), (box, "192.168.1.10")):
        assert peer.pm.primary == Direct(far, 41641)
        [(_, found)] = directs(peer)
        assert (found.kind, found.cause) == ("lan", "LAN path found")


def directs(peer: SimPeer) -> list[tuple[float, PathChanged]]:
    return [(t, c) for t, c in peer.changes if isinstance(c.new, Direct)]


def test_nat3_to_nat3_punches_with_a_simultaneous_start() -> None:
    net, client, box = nat_pair(NAT3, NAT3)
    net.run_until(5)
    for peer, far in ((client, "198.51.100.20"), (box, "203.0.113.10")):
        [(t, punched)] = directs(peer)
        assert punched.cause == "punched" and punched.kind == "direct-v4"
        assert isinstance(punched.new, Direct) and punched.new.ip == far
        assert 1.0 < t < 1.2  # one round trip and a confirmation after the start


def test_nat3_to_nat3_punches_even_when_one_side_starts_late() -> None:
    # Without a common start the first side's probes die at the far NAT (it has not sent
    # there yet); they open the near NAT, so the late side's probes get through and the
    # triggered answers finish the job.
    net, client, box = nat_pair(NAT3, NAT3)
    box.pm.schedule(3.0)
    net.run_until(6)
    assert net.drops["filtered"] >= 1
    for peer in (client, box):
        [(t, punched)] = directs(peer)
        assert punched.cause == "punched" and 3.0 < t < 3.2


def test_nat4_to_nat3_without_a_port_mapping_stays_on_the_relay() -> None:
    net, client, box = nat_pair(NAT4, NAT3)
    for i in range(300):
        net.call_at(1 + i * 0.1, client.send_data)
    net.run_until(120)
    assert directs(client) == [] and directs(box) == []
    assert [c.kind for _, c in client.changes] == ["relay"]
    seen = {seq for _, seq, _ in box.data_seen}
    assert len(seen) == 300 and {src for _, _, src in box.data_seen} == {RELAY}
    assert client.pm.route(net.now) == [RELAY]


def test_nat4_to_nat3_with_a_port_mapping_punches() -> None:
    net, client, _ = nat_pair(NAT4, NAT3, map_box=True)
    net.run_until(5)
    [(_, punched)] = directs(client)
    assert punched.new == Direct("198.51.100.20", 41641)
    assert punched.kind == "direct-portmapped"


def test_nat4_to_nat1_punches_through_a_peer_reflexive_address() -> None:
    net, client, box = nat_pair(NAT4, NAT1)
    net.run_until(5)
    [(_, c_direct)] = directs(client)
    [(_, b_direct)] = directs(box)
    assert c_direct.new == Direct("198.51.100.20", 41641)
    # the box reaches the symmetric NAT at the mapping it made for the box, not at the
    # reflexive address the relay saw: learned from the client's probes
    assert isinstance(b_direct.new, Direct) and b_direct.new != client.reflexive
    learned = next(p for p in box.pm.paths if p.destination == b_direct.new)
    assert learned.learned


def test_path_death_falls_back_to_the_relay_in_under_3_s_and_recovers() -> None:
    net, client, box = nat_pair(NAT3, NAT1)
    for i in range(1200):  # 20 packets a second for 60 s, each way
        net.call_at(1 + i * 0.05, client.send_data)
        net.call_at(1.025 + i * 0.05, box.send_data)
    net.run_until(10)
    assert client.pm.primary == Direct("198.51.100.20", 41641)
    net.block("203.0.113.10", "198.51.100.20")  # the direct path dies; the relay lives on
    net.run_until(25)
    for peer in (client, box):
        [(t, fell)] = [(t, c) for t, c in peer.changes if t > 10]
        assert fell.new == RELAY and t - 10 < 3.0
    # the longest silence the box saw in the client's data stream
    arrivals = sorted({seq: t for t, seq, _ in box.data_seen}.values())
    assert max(gaps(arrivals)) < 3.0
    # what the client sent into the dead path before it noticed is lost (TCP resends it);
    # everything from the moment it noticed arrived
    noticed = next(t for t, c in client.changes if t > 10)
    sent_after = {i + 1 for i in range(1200) if 1 + i * 0.05 >= noticed and 1 + i * 0.05 < 25}
    assert sent_after <= {seq for _, seq, _ in box.data_seen}
    net.unblock("203.0.113.10", "198.51.100.20")
    net.run_until(61)
    for peer in (client, box):
        last = peer.changes[-1][1]
        assert isinstance(last.new, Direct) and last.cause == "back to direct"
        assert peer.changes[-1][0] - 25 < 20  # the backoff had reached 8 s at most
    assert {seq for t, seq, _ in box.data_seen if t > 50} == set(range(981, 1201))


# Outcome of every pair of the four classic NATs at the path layer. Direct unless one side
# maps per destination (NAT4) and the other filters per port (NAT3, NAT4): then the
# symmetric side's probes leave from mappings the other side never sent to, and the other
# side's probes reach a mapping made for someone else.
GRID = {
    (client, box): not (
        (client is NAT4 and box in (NAT3, NAT4)) or (box is NAT4 and client in (NAT3, NAT4))
    )
    for client in (NAT1, natsim.NAT2, NAT3, NAT4)
    for box in (NAT1, natsim.NAT2, NAT3, NAT4)
}


@pytest.mark.parametrize(
    ("client_nat", "box_nat"), list(GRID), ids=[f"{a.name}-{b.name}" for a, b in GRID]
)
def test_nat_pair_grid_at_the_path_layer(
    client_nat: natsim.Behavior, box_nat: natsim.Behavior
) -> None:
    net, client, box = nat_pair(client_nat, box_nat)
    net.run_until(20)
    expected_direct = GRID[(client_nat, box_nat)]
    for peer in (client, box):
        assert isinstance(peer.pm.primary, Direct) is expected_direct, peer.changes
        assert peer.pm.kind == ("direct-v4" if expected_direct else "relay")


def test_a_peer_back_through_the_relay_makes_the_direct_path_suspect_at_once() -> None:
    """The peer's process restarted (new port): its new session came through the relay.
    Data must not go only to the old direct path until the trust timeout."""
    h = established({A4: 0.04})
    h.pm.remote_candidates([Candidate(K.REFLEXIVE, A4), Candidate(K.RELAY, RELAY)])
    h.send_data(0.05)
    h.run_until(5)
    assert h.pm.primary == A4
    h.call(h.pm.peer_moved)
    assert set(h.pm.route(h.now)) == {A4, RELAY}  # dual sending from this moment
    assert h.probes(A4, after=4.999) == [5.0]
