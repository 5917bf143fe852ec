"""The reachability checker against real listeners on loopback (no packet leaves the host).

Every probe has a timeout, so every test here is bounded; the slow cases use short timeouts."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from lazycat.services.reachability import (
    MAX_PORTS,
    Outcome,
    Probe,
    State,
    check,
    ports_to_check,
    summarise,
)
from transport.ports import PortPolicy


@pytest.fixture
def tcp_listener() -> Iterator[int]:
    """An open TCP port: the kernel completes handshakes into the backlog; nobody accepts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on, TCP or UDP (bound then released; the tests are quick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind(("127.0.0.1", 0))
        port = u.getsockname()[1]
    with socket.socket() as t:
        t.bind(("127.0.0.1", port))
    return port


@pytest.fixture
def udp_silent() -> Iterator[int]:
    """A bound UDP socket that never answers: the kernel sends no ICMP, the datagram waits."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def udp_echo() -> Iterator[int]:
    """A UDP echo server on a thread, stopped (bounded) at the end."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = s.recvfrom(2048)
            except TimeoutError:
                continue
            s.sendto(data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield s.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=2)
        s.close()


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A listener whose accept queue is full: Linux drops further SYNs, so connects time out.
    This is how "nothing answers" is tested without sending anything off loopback."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):  # until a connect no longer completes
        c = socket.socket()
        c.settimeout(0.2)
        try:
            c.connect(("127.0.0.1", port))
        except TimeoutError:
            c.close()
            break
        fillers.append(c)
    else:  # pragma: no cover - kernels that accept anyway
        pytest.skip("this kernel never filled the accept queue")
    try:
        yield port
    finally:
        for c in fillers:
            c.close()
        listener.close()


def test_open_tcp_port_is_reachable(tcp_listener):
    result = check("127.0.0.1", PortPolicy.parse(f"tcp {tcp_listener}"))
    assert result.state is State.OK
    assert result.summary == f"reachable (tcp {tcp_listener} open)"
    assert [(p.proto, p.port, p.outcome) for p in result.probes] == [
        ("tcp", tcp_listener, Outcome.OPEN)
    ]
    assert result.sampled is False


def test_refused_tcp_port_says_what_to_check(closed_port):
    result = check("127.0.0.1", PortPolicy.parse(f"tcp {closed_port}"))
    assert result.state is State.PROBLEM
    assert result.summary == (
        f"127.0.0.1 refuses tcp {closed_port}: is the service listening on that port?"
    )


def test_refused_on_ipv6_loopback(closed_port):
    result = check("::1", PortPolicy.parse(f"tcp {closed_port}"))
    assert result.probes[0].outcome is Outcome.REFUSED
    assert result.summary.startswith(f"::1 refuses tcp {closed_port}")


def test_one_listed_port_refused_is_a_problem_even_if_another_is_open(tcp_listener, closed_port):
    result = check("127.0.0.1", PortPolicy.parse(f"tcp {tcp_listener}, {closed_port}"))
    assert result.state is State.PROBLEM
    assert f"tcp {tcp_listener} open, but 127.0.0.1 refuses tcp {closed_port}" in result.summary


def test_closed_udp_port_is_refused_by_icmp(closed_port):
    result = check("127.0.0.1", PortPolicy.parse(f"udp {closed_port}"), timeout=2.0)
    assert result.probes[0].outcome is Outcome.REFUSED
    assert result.probes[0].ms < 1000  # ICMP came back; the timeout did not decide it
    assert result.state is State.PROBLEM
    assert result.summary == (
        f"127.0.0.1 refuses udp {closed_port}: is the service listening on that port?"
    )


def test_udp_echo_answers(udp_echo):
    result = check("127.0.0.1", PortPolicy.parse(f"udp {udp_echo}"))
    assert result.probes[0].outcome is Outcome.ANSWERED
    assert result.state is State.OK
    assert result.summary == f"reachable (udp {udp_echo} answered)"


def test_silent_udp_cannot_confirm_and_waits_only_the_timeout(udp_silent):
    started = time.monotonic()
    result = check("127.0.0.1", PortPolicy.parse(f"udp {udp_silent}"), timeout=0.3)
    elapsed = time.monotonic() - started
    assert result.probes[0].outcome is Outcome.SILENT
    assert result.state is State.UNCONFIRMED
    assert result.summary == (
        f"udp {udp_silent}: no answer — UDP cannot confirm (nothing refused it either)"
    )
    assert 0.25 < elapsed < 1.5


def test_tcp_open_and_udp_silent_is_reachable_with_a_note(tcp_listener, udp_silent):
    result = check(
        "127.0.0.1", PortPolicy.parse(f"tcp {tcp_listener}; udp {udp_silent}"), timeout=0.3
    )
    assert result.state is State.OK
    assert result.summary == (
        f"reachable (tcp {tcp_listener} open); udp {udp_silent}: no answer — UDP cannot confirm"
    )


def test_nothing_answering_times_out_with_advice(full_backlog):
    started = time.monotonic()
    result = check(
        "127.0.0.1", PortPolicy.parse(f"tcp {full_backlog}"), timeout=0.5, subject="the VM"
    )
    assert time.monotonic() - started < 2.0
    assert result.probes[0].outcome is Outcome.TIMEOUT
    assert result.state is State.PROBLEM
    assert result.summary == (
        f"nothing answers at 127.0.0.1: is the VM running? "
        f"(tcp {full_backlog}: timed out after 0.5 s)"
    )


def test_probes_run_concurrently(udp_silent):
    # Twelve silent UDP ports (the listener's port and its neighbours, most of them refused
    # at once); however many, the check lasts about one timeout, not twelve.
    policy = PortPolicy.parse(f"udp {udp_silent}-{udp_silent + MAX_PORTS - 1}")
    started = time.monotonic()
    result = check("127.0.0.1", policy, timeout=0.5)
    assert len(result.probes) == MAX_PORTS
    assert time.monotonic() - started < 1.5


def test_a_sample_with_one_open_port_is_reachable(tcp_listener):
    # A range too big to check port by port: its first port (the listener) is in the sample;
    # the others refuse, which only shows the host is up.
    policy = PortPolicy.parse(f"tcp {tcp_listener}-{tcp_listener + 100}")
    result = check("127.0.0.1", policy)
    assert result.sampled is True
    assert result.state is State.OK
    assert result.summary == f"reachable (tcp {tcp_listener} open)"


def test_a_sample_where_everything_refuses_says_the_host_is_up():
    result = check("127.0.0.1", PortPolicy.parse("tcp 1-1000"), timeout=0.5)
    if any(p.outcome is Outcome.OPEN for p in result.probes):
        pytest.skip("something on this host listens on a well-known port")
    assert result.state is State.PROBLEM
    assert result.summary.startswith("127.0.0.1 is up but refuses every port checked (tcp 22, ")


# --- which ports --------------------------------------------------------------------------------


def test_a_small_policy_is_checked_port_by_port():
    pairs, sampled = ports_to_check(PortPolicy.parse("tcp 22, 80, 8000-8002; udp 53"))
    assert sampled is False
    assert pairs == [
        ("tcp", 22),
        ("tcp", 80),
        ("tcp", 8000),
        ("tcp", 8001),
        ("tcp", 8002),
        ("udp", 53),
    ]


def test_all_ports_are_sampled_well_known_first_then_each_range_start():
    pairs, sampled = ports_to_check(PortPolicy.parse("all"))
    assert sampled is True
    assert pairs == [
        ("tcp", 22),
        ("tcp", 80),
        ("tcp", 443),
        ("tcp", 3389),
        ("tcp", 5900),
        ("tcp", 8080),
        ("udp", 53),
        ("tcp", 1),
        ("udp", 1),
    ]


def test_the_sample_honours_exclusions():
    pairs, _ = ports_to_check(PortPolicy.parse("all", "tcp 22, 3389; udp 53"))
    assert ("tcp", 22) not in pairs and ("tcp", 3389) not in pairs and ("udp", 53) not in pairs
    assert ("tcp", 23) in pairs  # the first port of the range after the hole
    assert ("tcp", 3390) in pairs


def test_the_sample_is_capped():
    ranges = ", ".join(f"{n * 100}-{n * 100 + 50}" for n in range(1, 40))
    pairs, sampled = ports_to_check(PortPolicy.parse(f"tcp {ranges}"))
    assert sampled is True and len(pairs) == MAX_PORTS
    pairs, _ = ports_to_check(PortPolicy.parse(f"tcp {ranges}"), max_ports=3)
    assert len(pairs) == 3


# --- what the owner reads, for errors loopback cannot produce ----------------------------------


def probe(outcome: Outcome, port: int = 22, proto: str = "tcp", detail: str = "") -> Probe:
    return Probe(proto, port, outcome, 1.0, detail)


def test_no_route_says_check_the_lan():
    state, summary = summarise("192.0.2.50", [probe(Outcome.NO_ROUTE)], sampled=False, timeout=2.0)
    assert state is State.PROBLEM
    assert summary == "no route to 192.0.2.50 from the box: is it on the box's LAN?"


def test_host_unreachable_asks_whether_it_runs():
    state, summary = summarise(
        "192.0.2.50", [probe(Outcome.HOST_UNREACHABLE)], sampled=True, timeout=2.0, subject="the VM"
    )
    assert state is State.PROBLEM
    assert summary == (
        "192.0.2.50 is unreachable from the box (nothing on the LAN has that address): "
        "is the VM running, and is the address right?"
    )


def test_sshd_is_named_for_port_22():
    _, summary = summarise("192.0.2.50", [probe(Outcome.REFUSED)], sampled=False, timeout=2.0)
    assert summary == "192.0.2.50 refuses tcp 22: is sshd listening on that port?"


def test_other_errors_are_quoted():
    state, summary = summarise(
        "192.0.2.50",
        [probe(Outcome.ERROR, detail="Permission denied")],
        sampled=False,
        timeout=2.0,
    )
    assert state is State.PROBLEM
    assert summary == "could not check 192.0.2.50 (tcp 22: Permission denied)"


def test_details_are_json_ready(tcp_listener):
    details = check("127.0.0.1", PortPolicy.parse(f"tcp {tcp_listener}")).to_json()
    assert details["state"] == "ok" and details["sampled"] is False
    assert details["probes"][0]["outcome"] == "open"
    assert details["probes"][0]["port"] == tcp_listener
