"""The NAT lab proves itself: every router kind maps and filters exactly as RFC 4787 says.

One lab for the module (``tests/natlab/lab.py``, drawn in ``docs/natlab.md``): the relay host
answers probes on two IPv4 (and two IPv6) addresses and two ports each, so each site's host can
measure its router the way RFC 4787 defines it:

* **mapping** (section 4.1): from one local port, ask ``A:p1``, ``A:p2`` and ``B:p1`` which
  source they saw. One answer for all three: endpoint-independent; different answers for two
  ports of one IP: address-and-port-dependent ("symmetric");
* **filtering** (section 5): from a fresh local port, send only to ``A:p1``, and have ``A:p2``
  (same IP, other port), ``B:p1`` and ``B:p2`` (other IP) send to the reflexive address
  unsolicited. All arrive: endpoint-independent; only ``A:p2``: address-dependent; none:
  address-and-port-dependent.

Then the rest of what the lab promises (INPUT drops, CGNAT's two translations, UDP blocked but
TCP passing, the IPv6 firewall, miniupnpd's NAT-PMP mapping, short conntrack timeouts, reboot,
block/unblock, a new WAN address), and the cross-check: our own netcheck, run in each site
against our RFC 5780 STUN server on the relay, names the NAT type each router emulates.

Needs root, ``ip``, ``nft`` and ``miniupnpd``: skipped without them, failing as root or under
CI (``lab_or_skip``).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.natlab.lab import (
    PROBE_PORTS,
    PYTHON,
    RELAY_IP6S,
    RELAY_IPS,
    REPO,
    STUN_PORTS,
    UDPPROBE,
    Host,
    Lab,
    lab_or_skip,
    read_line,
)

pytestmark = [pytest.mark.natlab, pytest.mark.timeout(90)]

A1, A2 = f"{RELAY_IPS[0]}:{PROBE_PORTS[0]}", f"{RELAY_IPS[0]}:{PROBE_PORTS[1]}"
B1, B2 = f"{RELAY_IPS[1]}:{PROBE_PORTS[0]}", f"{RELAY_IPS[1]}:{PROBE_PORTS[1]}"
A1_6, A2_6 = f"[{RELAY_IP6S[0]}]:{PROBE_PORTS[0]}", f"[{RELAY_IP6S[0]}]:{PROBE_PORTS[1]}"
B1_6, B2_6 = f"[{RELAY_IP6S[1]}]:{PROBE_PORTS[0]}", f"[{RELAY_IP6S[1]}]:{PROBE_PORTS[1]}"

# kind -> (mapping, sources that get in unsolicited after we sent to A1 only)
RFC4787 = {
    "none": ("own address", {A2, B1, B2}),
    "firewall": ("own address", set()),
    "NAT1": ("endpoint-independent", {A2, B1, B2}),
    "NAT2": ("endpoint-independent", {A2}),
    "NAT3": ("endpoint-independent", set()),
    "NAT4": ("address-and-port-dependent", set()),
    "CGNAT": ("endpoint-independent", set()),
}
SITES = [*RFC4787, "udp-blocked", "ipv6"]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab_or_skip(need_miniupnpd=True)
    with Lab() as made:
        for kind in SITES:
            made.add_site(kind, kind).add_host("client")  # type: ignore[arg-type]
        box = made.add_site("box", "NAT3", portmap=True)
        box.add_host("box")
        box.add_host("vm", ipv6=False)
        box.add_host("client")  # a client on the box's LAN
        made.add_site("short", "NAT3", udp_timeout=2).add_host("client")
        made.add_site("roam", "NAT3").add_host("client")
        made.add_site("cut", "NAT3").add_host("client")
        yield made


def client(lab: Lab, site: str) -> Host:
    return lab.sites[site].hosts[0]


def mapping_of(host: Host, port: int, targets: list[str], family: int = 4) -> dict[str, str]:
    out = host.probe("map", "--bind", host.addr(port, family), *targets)
    mapped: dict[str, str] = out["mapped"]
    return mapped


def filtering_of(
    host: Host,
    port: int,
    server: str,
    also: list[str],
    *,
    family: int = 4,
    delay: float = 0.0,
    wait: float = 0.6,
) -> tuple[str | None, set[str]]:
    out = host.probe(
        "filter",
        "--bind",
        host.addr(port, family),
        "--server",
        server,
        "--also",
        *also,
        "--delay",
        str(delay),
        "--wait",
        str(wait),
    )
    return out["mapped"], set(out["received"])


@pytest.mark.parametrize("kind", list(RFC4787))
def test_router_maps_and_filters_per_rfc4787(lab: Lab, kind: str) -> None:
    site = lab.sites[kind]
    host = client(lab, kind)
    expected_mapping, expected_in = RFC4787[kind]
    mapped = mapping_of(host, 5000, [A1, A2, B1])
    assert None not in mapped.values(), mapped
    if expected_mapping == "own address":
        assert set(mapped.values()) == {f"{host.ip}:5000"}
    elif expected_mapping == "endpoint-independent":
        # one external endpoint for every destination, on the public router's address, port
        # preserved (Linux masquerade keeps the source port when it is free)
        assert set(mapped.values()) == {f"{site.public_ip}:5000"}, mapped
    else:
        assert {m.rsplit(":", 1)[0] for m in mapped.values()} == {site.public_ip}
        assert mapped[A1] != mapped[A2], mapped  # same IP, other port: a new mapping
        assert len(set(mapped.values())) == 3, mapped
    reflexive, received = filtering_of(host, 5001, A1, [A2, B1, B2])
    assert reflexive is not None
    assert received == expected_in


def test_udp_blocked_site_drops_udp_both_families_but_passes_tcp(lab: Lab) -> None:
    host = client(lab, "udp-blocked")
    assert mapping_of(host, 5000, [A1]) == {A1: None}
    assert mapping_of(host, 5002, [A1_6], family=6) == {A1_6: None}
    assert lab.sites["udp-blocked"].router.counter("udp_blocked") >= 2
    tcp = host.probe("tcp", "--to", A1)
    assert tcp["ok"], tcp
    public = lab.sites["udp-blocked"].public_ip
    assert str(tcp["line"]).startswith(f"seen {public}:"), tcp  # translated, like NAT3
    tcp6 = host.probe("tcp", "--to", A1_6)
    assert tcp6["ok"] and str(tcp6["line"]).startswith(f"seen [{host.ip6}]:"), tcp6


def test_unsolicited_inbound_is_dropped_at_the_routers_input(lab: Lab) -> None:
    site = lab.sites["NAT3"]
    host = client(lab, "NAT3")
    before = site.router.counter("wan_input_drop")
    listener = host.popen(
        [PYTHON, str(UDPPROBE), "listen", "--bind", host.addr(6000), "--wait", "1.5"],
        stdout=subprocess.PIPE,
    )
    assert read_line(listener, 5).strip() == "ready"
    lab.relay.run(
        [
            PYTHON,
            str(UDPPROBE),
            "send",
            "--bind",
            f"{RELAY_IPS[0]}:6001",
            "--to",
            f"{site.public_ip}:6000",
            "--count",
            "3",
            "--interval",
            "0.05",
        ]
    )
    assert json.loads(read_line(listener, 5)) == []
    assert site.router.counter("wan_input_drop") >= before + 3


def test_cgnat_translates_twice(lab: Lab) -> None:
    site = lab.sites["CGNAT"]
    assert site.carrier is not None
    host = client(lab, "CGNAT")
    mapped = mapping_of(host, 5003, [A1])
    assert mapped[A1] == f"{site.carrier.wan_ip}:5003"
    home = [ln for ln in site.router.conntrack().splitlines() if "sport=5003" in ln]
    carrier = [ln for ln in site.carrier.conntrack().splitlines() if "sport=5003" in ln]
    # home NAT: 10.k.1.10 -> 100.64.k.2 ; carrier NAT: 100.64.k.2 -> its public address
    assert any(f"src={host.ip}" in ln and f"dst={site.router.wan_ip} " in ln for ln in home)
    assert any(
        f"src={site.router.wan_ip}" in ln and f"dst={site.carrier.wan_ip} " in ln for ln in carrier
    ), carrier


@pytest.mark.parametrize(("kind", "opens"), [("NAT3", False), ("ipv6", False), ("none", True)])
def test_ipv6_is_not_translated_and_filtered_statefully(lab: Lab, kind: str, opens: bool) -> None:
    host = client(lab, kind)
    mapped = mapping_of(host, 5004, [A1_6, B1_6], family=6)
    assert set(mapped.values()) == {f"[{host.ip6}]:5004"}  # no NAT66
    reflexive, received = filtering_of(host, 5005, A1_6, [A2_6, B1_6, B2_6], family=6)
    assert reflexive == f"[{host.ip6}]:5005"  # the reply got in
    assert received == ({A2_6, B1_6, B2_6} if opens else set())


def test_ipv6_only_site_has_no_ipv4(lab: Lab) -> None:
    host = client(lab, "ipv6")
    assert mapping_of(host, 5006, [A1]) == {A1: None}


def test_box_lan_hosts_share_a_lan_and_the_vm_is_ipv4_only(lab: Lab) -> None:
    box, vm, other = lab.sites["box"].hosts
    assert vm.ip6 is None
    assert "inet6 2001:db8" not in vm.run(["ip", "addr"]).stdout
    listener = box.popen(
        [PYTHON, str(UDPPROBE), "listen", "--bind", box.addr(6100), "--wait", "1.0"],
        stdout=subprocess.PIPE,
    )
    assert read_line(listener, 5).strip() == "ready"
    other.run([PYTHON, str(UDPPROBE), "send", "--bind", other.addr(6101), "--to", box.addr(6100)])
    vm.run([PYTHON, str(UDPPROBE), "send", "--bind", vm.addr(6102), "--to", box.addr(6100)])
    got = {src for src, _ in json.loads(read_line(listener, 5))}
    assert got == {other.addr(6101), vm.addr(6102)}  # straight over the LAN, untranslated


def test_miniupnpd_grants_a_nat_pmp_mapping_reachable_from_the_internet(lab: Lab) -> None:
    site = lab.sites["box"]
    box = site.hosts[0]
    mapper = box.popen(
        [
            "env",
            f"PYTHONPATH={REPO}",
            PYTHON,
            "-m",
            "transport.portmap_aio",
            "--stdin",
            "--port",
            "41800",
            "--methods",
            "nat-pmp",
            "--lifetime",
            "60",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    events: list[dict[str, Any]] = []
    for _ in range(2):
        line = read_line(mapper, 10)
        assert line, f"no event from the mapper; had {events}"
        events.append(json.loads(line))
    assert events[0]["event"] == "started", events
    acquired = events[1]
    assert acquired["event"] == "acquired", (events, site.router.miniupnpd_log.read_text())  # type: ignore[attr-defined]
    assert acquired["protocol"] == "nat-pmp"
    assert acquired["external_ip"] == site.router.wan_ip
    port = int(acquired["external_port"])
    listener = box.popen(
        [PYTHON, str(UDPPROBE), "listen", "--bind", box.addr(41800), "--wait", "1.5"],
        stdout=subprocess.PIPE,
    )
    assert read_line(listener, 5).strip() == "ready"
    lab.relay.run(
        [
            PYTHON,
            str(UDPPROBE),
            "send",
            "--bind",
            f"{RELAY_IPS[1]}:6200",
            "--to",
            f"{site.router.wan_ip}:{port}",
            "--count",
            "3",
            "--interval",
            "0.05",
        ]
    )
    got = json.loads(read_line(listener, 5))
    assert got and got[0][0] == f"{RELAY_IPS[1]}:6200", got  # unsolicited, yet it got in
    assert mapper.stdin is not None
    mapper.stdin.close()
    assert mapper.wait(timeout=10) == 0


def test_short_conntrack_timeout_expires_the_mapping(lab: Lab) -> None:
    host = client(lab, "short")  # udp_timeout=2 on its router
    # the same server answers again later: within the timeout it gets in, after it does not
    _, early = filtering_of(host, 5007, A1, [A1], delay=1.0, wait=1.3)
    assert early == {A1}
    _, late = filtering_of(host, 5008, A1, [A1], delay=3.0, wait=3.3)
    assert late == set()


def test_reboot_nat_forgets_mappings(lab: Lab) -> None:
    site = lab.sites["cut"]
    host = client(lab, "cut")
    probe = host.popen(
        [
            PYTHON,
            str(UDPPROBE),
            "filter",
            "--bind",
            host.addr(5009),
            "--server",
            A1,
            "--also",
            A1,
            "--delay",
            "1.5",
            "--wait",
            "1.8",
        ],
        stdout=subprocess.PIPE,
    )
    time.sleep(0.8)  # the answer came back well before this; the delayed send has not
    site.reboot_nat()
    out = json.loads(read_line(probe, 10))
    assert out["mapped"] == f"{site.public_ip}:5009"
    assert out["received"] == []


def test_block_cuts_one_peer_and_unblock_mends_it(lab: Lab) -> None:
    site = lab.sites["cut"]
    host = client(lab, "cut")
    lab.block(site.router, RELAY_IPS[0])
    try:
        assert mapping_of(host, 5010, [A1, B1]) == {A1: None, B1: f"{site.public_ip}:5010"}
    finally:
        lab.unblock(site.router, RELAY_IPS[0])
    assert mapping_of(host, 5011, [A1]) == {A1: f"{site.public_ip}:5011"}


def test_change_wan_address_moves_the_mapping(lab: Lab) -> None:
    site = lab.sites["roam"]
    host = client(lab, "roam")
    old = site.public_ip
    assert mapping_of(host, 5012, [A1]) == {A1: f"{old}:5012"}
    new = site.change_wan_address()
    assert new != old
    assert mapping_of(host, 5012, [A1]) == {A1: f"{new}:5012"}  # same socket, new address


NETCHECK = {
    "none": "open",
    "firewall": "open",
    "NAT1": "NAT1",
    "NAT2": "NAT2",
    "NAT3": "NAT3",
    "NAT4": "NAT4",
    "CGNAT": "NAT3",
    "udp-blocked": "blocked",
    "ipv6": "blocked",  # IPv4 only is classified: no IPv4 at all
}


def test_our_netcheck_names_each_router_kind(lab: Lab) -> None:
    server = f"{RELAY_IPS[0]}:{STUN_PORTS[0]}"
    procs = {
        kind: client(lab, kind).python_popen(
            [str(REPO / "tests" / "natlab" / "netcheck_probe.py"), server],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for kind in NETCHECK
    }
    found, details = {}, {}
    for kind, proc in procs.items():
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        result = json.loads(out)
        found[kind] = result["nat_type"]
        ipv4 = result["report"]["ipv4"]
        details[kind] = (ipv4.get("mapping"), ipv4.get("filtering"))
    assert found == NETCHECK, details
    assert details["firewall"][1] == "address-and-port-dependent"  # open, but filtered
    assert details["none"][1] == "endpoint-independent"
