"""The NAT-pair acceptance grid (issue 3's proof), read from ``docs/nat-matrix.md``.

Every cell of the doc's two tables runs here: a relay, a box and a client on ``natsim`` with a
fake clock, real Noise, real tickets, real relay registration (``tests/transport/natlab.py``).
Then the path scenarios beyond the grid: death, recovery, roaming, mapping timeouts, a relay
restart.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import replace
from pathlib import Path

import pytest

from tests.transport.natlab import (
    BOX_PUBLIC,
    CLIENT_PUBLIC,
    Lab,
    Node,
    host_candidates,
    make_lab,
    via,
)
from transport import natsim
from transport.paths import PathConfig
from transport.peer import Connected, Disconnected, PeerConfig

DOC = Path(__file__).parents[2] / "docs" / "nat-matrix.md"
COLUMNS = ["NONE", "NAT1", "NAT2", "NAT3", "NAT4"]
ROWS = ["NONE", "NAT1", "NAT2", "NAT3", "NAT4", "FIREWALL", "CGNAT", "BLOCKED", "IPv6"]
TABLES = {"Without port mapping": False, "The box has a port mapping": True}
KINDS = {"direct-v4", "direct-portmapped", "direct-v6", "lan", "relay"}
END = 8.0  # fake seconds each case runs


def read_grid(text: str) -> dict[tuple[bool, str, str], str]:
    """{(box mapped, client row, box column): expected PathKind} from the doc's tables."""
    grid: dict[tuple[bool, str, str], str] = {}
    for heading, mapped in TABLES.items():
        match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
        assert match, f"docs/nat-matrix.md has no section {heading!r}"
        lines = [line for line in match.group(1).splitlines() if line.startswith("|")]
        header = [cell.strip() for cell in lines[0].strip("|").split("|")]
        assert header[1:] == COLUMNS, f"{heading}: columns {header[1:]}"
        rows = []
        for line in lines[2:]:
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            row = cells[0].strip("*")
            rows.append(row)
            assert len(cells) == len(COLUMNS) + 1, f"{heading}, row {row}: {cells}"
            for column, cell in zip(COLUMNS, cells[1:], strict=True):
                assert cell in KINDS, f"{heading}, {row} x {column}: {cell!r} is no PathKind"
                grid[(mapped, row, column)] = cell
        assert rows == ROWS, f"{heading}: rows {rows}"
    return grid


GRID = read_grid(DOC.read_text())


def lab_for(row: str, column: str, mapped: bool, seed: int) -> Lab:
    box_nat = natsim.PRESETS[column]
    if row == "CGNAT":
        return make_lab(natsim.NAT3, box_nat, cgnat=True, map_box=mapped, seed=seed)
    if row == "IPv6":
        return make_lab(natsim.NAT4, box_nat, ipv6=True, map_box=mapped, seed=seed)
    return make_lab(natsim.PRESETS[row], box_nat, map_box=mapped, seed=seed)


def arrivals(node: Node, after: float = 0.0) -> list[float]:
    return sorted(t for t, _, _ in node.received if t > after)


def longest_gap(times: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def assert_all_arrived(sender: Node, receiver: Node, sent_from: float, sent_until: float) -> None:
    sent = {seq for t, seq in sender.sent if sent_from <= t <= sent_until}
    got = {seq for _, seq, _ in receiver.received}
    missing = sorted(sent - got)
    assert sent and not missing, f"{receiver.name} never got {missing[:10]} of {len(sent)}"


@pytest.mark.parametrize(
    ("mapped", "row", "column"),
    list(GRID),
    ids=[f"{'mapped-' if m else ''}{r}-{c}" for m, r, c in GRID],
)
def test_nat_pair(mapped: bool, row: str, column: str) -> None:
    expected = GRID[(mapped, row, column)]
    lab = lab_for(row, column, mapped, seed=len(GRID) + COLUMNS.index(column))
    lab.up()
    lab.net.run_until(END)
    both_connected = max(lab.client.connected_at() or END, lab.box.connected_at() or END)
    for node, other in ((lab.client, lab.box), (lab.box, lab.client)):
        changes = node.paths()
        kinds = [c.kind for _, c in changes]
        assert kinds and kinds[0] == "relay", f"{node.name} did not start on the relay: {kinds}"
        assert changes[0][1].cause == "through relay r1"
        assert "offline" not in kinds
        assert kinds[-1] == expected, f"{node.name}: {[(t, c.cause) for t, c in changes]}"
        assert node.peer.path(other.peer.keys.public).kind == expected  # type: ignore[union-attr]
        # Never no connection: every packet sent once both sides were up has arrived, through
        # the relay first, then on the direct path if there is one.
        assert_all_arrived(other, node, both_connected, END - 0.5)
        first_direct = next((t for t, c in changes if c.kind != "relay"), None)
        if expected != "relay":
            assert first_direct is not None
            assert any(via(p) == "relay" and t < first_direct for t, _, p in node.received)
        last = [p for t, _, p in node.received if t > END - 2]
        assert len(last) >= 35 and {via(p) for p in last} == {
            "relay" if expected == "relay" else "direct"
        }
    if lab.box_mapping is not None and expected == "direct-portmapped":
        [(_, found)] = [(t, c) for t, c in lab.client.paths() if c.kind == expected]
        assert found.endpoint == str(lab.box_mapping.address)


# --- beyond the grid ---------------------------------------------------------------------------


def direct_lab(client: natsim.Behavior, box: natsim.Behavior, **kwargs: object) -> Lab:
    lab = make_lab(client, box, **kwargs)  # type: ignore[arg-type]
    lab.up()
    lab.net.run_until(5)
    for node in (lab.client, lab.box):
        assert node.kinds()[-1] == "direct-v4", node.kinds()
    return lab


def test_path_death_falls_back_to_the_relay_within_3_s() -> None:
    lab = direct_lab(natsim.NAT3, natsim.NAT3)
    lab.net.run_until(10)
    lab.net.block(CLIENT_PUBLIC, BOX_PUBLIC)  # the direct path dies; the relay lives on
    lab.net.run_until(25)
    for node in (lab.client, lab.box):
        [(t, fell)] = [(t, c) for t, c in node.paths() if t > 10]
        assert fell.kind == "relay" and fell.cause.startswith("direct path silent")
        assert t - 10 < 3.0, f"{node.name} fell back after {t - 10:.2f} s"
    gap = longest_gap(arrivals(lab.box, after=5))
    assert gap < 3.0, f"the box heard nothing from the client for {gap:.2f} s"
    noticed = next(t for t, c in lab.client.paths() if t > 10)
    assert_all_arrived(lab.client, lab.box, noticed, 24.5)
    assert {via(p) for t, _, p in lab.box.received if t > 15} == {"relay"}


def test_path_recovery_goes_direct_again() -> None:
    lab = direct_lab(natsim.NAT3, natsim.NAT3)
    lab.net.run_until(10)
    lab.net.block(CLIENT_PUBLIC, BOX_PUBLIC)
    lab.net.run_until(25)
    assert lab.client.kinds()[-1] == "relay"
    lab.net.unblock(CLIENT_PUBLIC, BOX_PUBLIC)
    lab.net.run_until(50)
    for node in (lab.client, lab.box):
        t, back = node.paths()[-1]
        assert back.kind == "direct-v4" and back.cause == "back to direct"
        assert t - 25 < 20, f"{node.name} took {t - 25:.1f} s to go direct again"
    noticed = next(t for t, c in lab.client.paths() if t > 10)
    assert_all_arrived(lab.client, lab.box, noticed, 49.5)  # nothing lost on the way back
    assert {via(p) for t, _, p in lab.box.received if t > 48} == {"direct"}


def test_client_roaming_keeps_the_session() -> None:
    lab = direct_lab(natsim.NAT3, natsim.NAT1)
    box_session = lab.box.peer.session(lab.client_key)
    client_session = lab.client.peer.session(lab.box_key)
    lab.net.run_until(10)
    # Wi-Fi to mobile data: another router, another public address, another LAN address.
    router = lab.net.add_router("mobile-nat", natsim.NAT3, "203.0.113.50")
    phone = lab.net.add_host("client-mobile", "192.168.7.7", behind=router)
    lab.client.move(phone)
    lab.client.peer.set_local_candidates(host_candidates(phone), lab.client.now)
    lab.net.run_until(25)
    assert lab.box.peer.session(lab.client_key) is box_session
    assert lab.client.peer.session(lab.box_key) is client_session
    for node in (lab.client, lab.box):  # connected once, at the start, and never since
        ups_and_downs = [e for _, e in node.events if isinstance(e, (Connected, Disconnected))]
        assert [type(e) for e in ups_and_downs] == [Connected]
    assert lab.box.pairing_requests() == []
    _, found = lab.box.paths()[-1]
    assert found.kind == "direct-v4" and found.endpoint.startswith("203.0.113.50:")
    gap = longest_gap(arrivals(lab.box, after=5))
    assert gap < 3.0, f"the box heard nothing from the client for {gap:.2f} s"
    assert_all_arrived(lab.client, lab.box, 13, 24.5)
    assert_all_arrived(lab.box, lab.client, 13, 24.5)
    assert {via(p) for t, _, p in lab.box.received if t > 20} == {"direct"}


@pytest.mark.parametrize(("keepalive", "held"), [(25.0, True), (60.0, False)])
def test_keepalives_hold_a_direct_path_through_5_idle_minutes(keepalive: float, held: bool) -> None:
    short = replace(natsim.NAT3, mapping_timeout=30.0)  # Linux conntrack's unreplied-UDP timeout
    config = PeerConfig(paths=PathConfig(keepalive=keepalive, idle_trust=2 * keepalive + 5))
    lab = direct_lab(short, short, config=config)
    lab.client.stream(lab.box, None)
    lab.box.stream(lab.client, None)
    lab.net.run_until(6)
    drops_before = sum(lab.net.drops[r] for r in ("mapping expired", "no mapping", "filtered"))
    lab.net.run_until(6 + 300)
    drops = sum(lab.net.drops[r] for r in ("mapping expired", "no mapping", "filtered"))
    if not held:
        assert drops > drops_before  # without keepalives under 30 s, the routers forget us
        return
    assert drops == drops_before
    for node in (lab.client, lab.box):
        assert [c.kind for t, c in node.paths() if t > 6] == []
    lab.client.send(lab.box)
    lab.box.send(lab.client)
    lab.net.run_until(306.1)
    for node in (lab.client, lab.box):
        assert [via(p) for t, _, p in node.received if t > 306] == ["direct"]


def test_a_relay_restart_is_survived() -> None:
    lab = make_lab(natsim.NAT4, natsim.NAT4)
    lab.up()
    lab.net.run_until(10)
    assert lab.client.kinds() == ["relay"] and lab.relay.core.peer_count == 2
    lab.relay.restart()
    assert lab.relay.core.peer_count == 0
    lab.net.run_until(20)
    assert lab.relay.core.peer_count == 2
    for node, other in ((lab.box, lab.client), (lab.client, lab.box)):
        gap = longest_gap(arrivals(node, after=5))
        assert gap < 1.0, f"{node.name} heard nothing through the relay for {gap:.2f} s"
        assert_all_arrived(other, node, 10.5, 19.5)
        assert node.kinds() == ["relay"]
    assert lab.client.peer.relay_client("r1").registered  # type: ignore[union-attr]


def test_an_idle_box_is_back_at_a_restarted_relay_within_3_s_and_no_datagram_is_lost() -> None:
    """Nobody sends anything when the relay restarts. The box learns of it from its next relay
    ping (every 3 s; a device's is 20 s) and registers again; the device learns of it only when
    it sends: the relay answers HELLO and drops that datagram, which the device sends again once
    registered (it is often a TCP retransmission: losing it doubles the stall)."""
    lab = make_lab(natsim.NAT4, natsim.NAT4)
    lab.connect()
    lab.net.run_until(3)
    assert lab.client.kinds() == ["relay"] and lab.relay.core.box_count == 1
    lab.relay.restart()
    lab.net.run_until(3 + 3.2)
    assert lab.relay.core.box_count == 1, "the box registered again on its own"
    sent_at = lab.net.now
    lab.client.send(lab.box)
    lab.net.run_until(sent_at + 1)
    arrived = [(t, seq) for t, seq, _ in lab.box.received]
    assert [seq for _, seq in arrived] == [1]
    assert arrived[0][0] - sent_at < 0.5
