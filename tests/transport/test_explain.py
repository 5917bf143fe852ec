"""explain_relay against docs/nat-matrix.md: every relay cell has a reason, no direct cell has."""

from __future__ import annotations

from pathlib import Path

import pytest

from transport.explain import BOX_PORT, NatFacts, describe_nat, explain_relay
from transport.netcheck import NatType

MATRIX = Path(__file__).resolve().parents[2] / "docs" / "nat-matrix.md"

# The grid's networks as netcheck would see them (docs/nat-matrix.md, "How each case runs").
CLIENTS = {
    "NONE": NatFacts(NatType.OPEN),
    "NAT1": NatFacts(NatType.NAT1),
    "NAT2": NatFacts(NatType.NAT2),
    "NAT3": NatFacts(NatType.NAT3),
    "NAT4": NatFacts(NatType.NAT4),
    "FIREWALL": NatFacts(NatType.OPEN, firewall=True),
    "CGNAT": NatFacts(NatType.NAT3),  # EIM + APDF, behind a home NAT3: NAT3 from outside
    "BLOCKED": NatFacts(NatType.BLOCKED, udp_blocked=True),
    "IPv6": NatFacts(NatType.NAT4, ipv6=True),
}
BOXES = {"NONE": NatType.OPEN, **{f"NAT{n}": NatType(f"NAT{n}") for n in range(1, 5)}}


def _tables() -> dict[str, list[tuple[str, str, str]]]:
    """(client, box, outcome) per cell, for each of the document's two tables."""
    tables: dict[str, list[tuple[str, str, str]]] = {}
    section = ""
    columns: list[str] = []
    for line in MATRIX.read_text().splitlines():
        if line.startswith("## "):
            section, columns = line[3:].strip(), []
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 2:
            continue
        if cells[0] == "client \\ box":
            columns = cells[1:]
        elif columns and not set(cells[0]) <= {"-"}:
            client = cells[0].strip("*")
            for box, outcome in zip(columns, cells[1:], strict=True):
                tables.setdefault(section, []).append((client, box, outcome))
    return tables


TABLES = _tables()
CELLS = [
    (mapped, client, box, outcome)
    for section, mapped in (("Without port mapping", False), ("The box has a port mapping", True))
    for client, box, outcome in TABLES[section]
]


def test_both_tables_were_read():
    assert {len(TABLES[s]) for s in TABLES} == {45}
    assert {c[1] for c in CELLS} == set(CLIENTS)
    assert {c[2] for c in CELLS} == set(BOXES)
    assert sum(c[3] == "relay" for c in CELLS) == 5 + 5 + 2 + 1 + 1 + 1  # the grid's relay cells


@pytest.mark.parametrize(("mapped", "client", "box", "outcome"), CELLS)
def test_explain_relay_agrees_with_the_nat_matrix(mapped, client, box, outcome):
    device = CLIENTS[client]
    box_facts = NatFacts(
        BOXES[box],
        ipv6=client == "IPv6",  # that row is dual-stack on both sides
        port_mapping=mapped and box != "NONE",  # a router that does not translate maps nothing
    )
    reasons = explain_relay(box_facts, device)
    if outcome == "relay":
        assert reasons, f"{client} x {box} is relayed but no reason was given"
        assert all(r.text and r.fix for r in reasons)
    else:
        assert reasons == [], f"{client} x {box} is {outcome} but got {reasons}"


def test_symmetric_box_says_to_map_a_port():
    (reason,) = explain_relay(NatFacts(NatType.NAT4), NatFacts(NatType.NAT3))
    assert reason.text.startswith("Your NAT is symmetric (NAT4) and the box has no port mapping")
    assert reason.fix == (
        f"Enable UPnP or NAT-PMP on the box's router, or forward UDP port {BOX_PORT} to the box."
    )


def test_both_symmetric_and_dual_nat4_nat3_are_told_apart():
    (both,) = explain_relay(NatFacts(NatType.NAT4), NatFacts(NatType.NAT4))
    assert both.text.startswith("Both sides are behind symmetric NATs")
    (dual,) = explain_relay(NatFacts(NatType.NAT3), NatFacts(NatType.NAT4))
    assert dual.text.startswith("The device is behind a symmetric NAT (NAT4)")
    assert "port-restricted cone NAT (NAT3)" in dual.text
    (firewalled,) = explain_relay(NatFacts(NatType.OPEN, firewall=True), NatFacts(NatType.NAT4))
    assert "firewall" in firewalled.text


def test_blocked_udp_names_the_side_and_the_tcp_relay():
    (reason,) = explain_relay(NatFacts(NatType.NAT1), NatFacts(NatType.BLOCKED, udp_blocked=True))
    assert reason.text == "UDP is blocked on the device's network."
    assert reason.fix.startswith("The device uses the relay over TCP")
    reasons = explain_relay(
        NatFacts(NatType.BLOCKED, udp_blocked=True), NatFacts(NatType.BLOCKED, udp_blocked=True)
    )
    assert [r.text for r in reasons] == [
        "UDP is blocked on the device's network.",
        "UDP is blocked on the box's network.",
    ]


def test_unknown_types_are_reasons_only_when_they_could_relay():
    not_measured = NatFacts.not_measured()
    (reason,) = explain_relay(NatFacts(NatType.NAT4), not_measured)
    assert "not measured yet" in reason.text
    # A full cone box goes direct with every device, whatever the device turns out to be.
    assert explain_relay(NatFacts(NatType.NAT1), not_measured) == []
    (box_reason,) = explain_relay(NatFacts.not_measured(), NatFacts(NatType.NAT3))
    assert "not been checked yet" in box_reason.text and "Check now" in box_reason.fix
    measured_unknown = explain_relay(NatFacts(NatType.UNKNOWN), NatFacts(NatType.NAT4))
    assert "could not be measured" in measured_unknown[0].text


def _report(nat: str, *, udp: bool = True, filtering: str | None = None, v6: bool = False) -> dict:
    return {
        "udp": udp,
        "nat_type": nat,
        "ipv4": {"tested": True, "reachable": udp, "open": nat == "open", "filtering": filtering},
        "ipv6": {"tested": v6, "reachable": v6},
    }


def test_facts_from_a_stored_report():
    assert NatFacts.from_report(None) == NatFacts.not_measured()
    assert NatFacts.from_report(_report("NAT3")) == NatFacts(NatType.NAT3)
    blocked = NatFacts.from_report(_report("blocked", udp=False))
    assert blocked.udp_blocked and blocked.nat_type is NatType.BLOCKED
    firewall = NatFacts.from_report(_report("open", filtering="address-and-port-dependent"))
    assert firewall.firewall and firewall.candidates() == (NatType.NAT3,)
    assert not NatFacts.from_report(_report("open", filtering="endpoint-independent")).firewall
    assert NatFacts.from_report(_report("NAT4", v6=True), port_mapping=True) == NatFacts(
        NatType.NAT4, ipv6=True, port_mapping=True
    )
    # Garbage from a device is "unknown", not an exception.
    junk = NatFacts.from_report({"nat_type": 7, "ipv4": "x", "udp": "yes"})
    assert junk.nat_type is NatType.UNKNOWN and not junk.udp_blocked


def test_describe_nat_in_plain_words():
    assert describe_nat("NAT4").startswith("Symmetric NAT (NAT4)")
    assert describe_nat(None) == "Not measured yet"
    assert describe_nat("bogus").startswith("Unknown")
