"""Unit tests of transport.exposure: the Exposure record, ruleset() text and revoked().

The ruleset's behaviour in a kernel is proven in test_exposure_linux.py; here, what the text must
contain (and must not), and the set arithmetic of revocation."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport.exposure import Exposure, ExposureError, revoked, ruleset, uses_nat66

S1 = IPv6Address("fc03:1136:3864:b5f8:2::1")
S2 = IPv6Address("fc03:1136:3864:b5f8:2::2")
D1 = IPv6Address("fc03:1136:3864:b5f8:1::1")
D2 = IPv6Address("fc03:1136:3864:b5f8:1::2")
V4 = IPv4Address("192.0.2.7")
V6 = IPv6Address("2001:db8::7")


def make(
    address: IPv6Address = S1,
    target: IPv4Address | IPv6Address = V4,
    devices: tuple[IPv6Address, ...] = (D1,),
    tcp: tuple[tuple[int, int], ...] = ((22, 22), (8000, 8100)),
    udp: tuple[tuple[int, int], ...] = ((53, 53),),
    name: str = "devvm",
) -> Exposure:
    return Exposure(name, address, target, tcp, udp, frozenset(devices))


def rules(*exposures: Exposure) -> str:
    return ruleset(exposures, tun="lzc0", tproxy_port=7481, mark=0x1136)


def test_nat66_is_for_routable_ipv6_targets_only() -> None:
    assert uses_nat66(make(target=V6))
    assert not uses_nat66(make(target=V4))
    assert not uses_nat66(make(target=IPv6Address("::1")))  # the kernel will not route to ::1
    assert not uses_nat66(make(target=IPv4Address("127.0.0.1")))
    assert not uses_nat66(make(target=IPv6Address("::ffff:192.0.2.7")))


@pytest.mark.parametrize(
    "target",
    [IPv6Address("fe80::1"), IPv6Address("::"), IPv4Address(0), IPv6Address("ff02::1")],
)
def test_targets_that_cannot_be_reached_are_refused(target: IPv4Address | IPv6Address) -> None:
    with pytest.raises(ExposureError, match="cannot be a target"):
        make(target=target)


def test_bad_port_ranges_are_refused() -> None:
    with pytest.raises(ExposureError, match="not a port range"):
        make(tcp=((0, 10),))
    with pytest.raises(ExposureError, match="not a port range"):
        make(udp=((20, 10),))


def test_allows_checks_device_protocol_and_port() -> None:
    e = make()
    assert e.allows(D1, "tcp", 22) and e.allows(D1, "tcp", 8050) and e.allows(D1, "udp", 53)
    assert not e.allows(D2, "tcp", 22)
    assert not e.allows(D1, "tcp", 23)
    assert not e.allows(D1, "udp", 22)
    assert not e.allows(D1, "sctp", 22)


def test_ruleset_lists_services_access_and_ports() -> None:
    text = rules(make(), make(address=S2, target=V6, devices=(D1, D2), tcp=((1, 65535),), udp=()))
    assert f"elements = {{ {S1}, {S2} }}" in text
    assert f"elements = {{ {S2} }}" in text  # the nat66 set: S2 only
    assert f"{S1} . {D1}" in text and f"{S2} . {D1}" in text and f"{S2} . {D2}" in text
    assert f"{S1} . {D2}" not in text
    for element in (f"{S1} . tcp . 22", f"{S1} . tcp . 8000-8100", f"{S1} . udp . 53"):
        assert element in text
    assert f"{S2} . tcp . 1-65535" in text and f"{S2} . udp" not in text
    assert f"dnat ip6 to ip6 daddr map {{ {S2} : {V6} }}" in text
    assert "tproxy ip6 to :7481" in text and "meta mark set 0x1136" in text


def test_ruleset_replaces_the_table_in_one_transaction() -> None:
    text = rules(make())
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[:3] == [
        "add table inet lazycat",
        "delete table inet lazycat",
        "table inet lazycat {",
    ]
    assert text.count("table inet lazycat {") == 1


def test_every_packet_to_a_service_is_checked_before_nat() -> None:
    text = rules(make(), make(address=S2, target=V6))
    pre = text[text.index("chain svc_pre") :]
    assert "priority mangle" in pre.splitlines()[1]  # -150: before dstnat (-100) rewrites
    # No "ct state new" anywhere in the access path: revocation stops open connections too.
    assert "ct state new" not in text
    deny = text[text.index("chain svc_deny") :]
    assert "reject with tcp reset" in deny and "reject with icmpx admin-prohibited" in deny


def test_without_forwarder_services_there_is_no_tproxy_and_without_nat66_no_nat() -> None:
    only_v6 = rules(make(target=V6))
    assert "tproxy" not in only_v6 and "nat66_in" in only_v6
    only_v4 = rules(make(target=V4))
    assert "tproxy" in only_v4 and "nat66_in" not in only_v4 and "masquerade" not in only_v4


def test_an_empty_state_keeps_the_box_from_routing_devices() -> None:
    text = rules()
    assert "elements" not in text  # nft refuses "elements = { }"
    assert 'iifname "lzc0" reject with icmpx admin-prohibited' in text
    assert 'oifname "lzc0" drop' in text


def test_chain_names_are_not_nft_keywords() -> None:
    text = rules(make(), make(address=S2, target=V6))
    names = re.findall(r"chain (\S+) \{", text)
    assert names and not {"fwd", "nat", "forward", "input", "filter"} & set(names)


def test_service_names_cannot_inject_nft_syntax() -> None:
    text = rules(make(name='x" }\ndelete table inet filter\n#'))
    # The name only ever lands in a comment line, with anything but [A-Za-z0-9._-] replaced.
    assert "delete table inet filter" not in text.replace("\n#", "")
    assert [line for line in text.splitlines() if "devvm" in line or "x_" in line] == [
        f"# {S1} x____delete_table_inet_filter__ -> {V4} (forwarder)"
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tun": "lzc0; flush ruleset"}, "interface name"),
        ({"table": "lazy cat"}, "table name"),
        ({"tproxy_port": 0}, "tproxy port"),
        ({"mark": 0}, "mark"),
    ],
)
def test_ruleset_refuses_bad_parameters(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"tun": "lzc0", "tproxy_port": 7481, "mark": 0x1136} | kwargs
    with pytest.raises(ExposureError, match=message):
        ruleset([make()], **args)  # type: ignore[arg-type]


def test_two_services_cannot_share_an_address() -> None:
    with pytest.raises(ExposureError, match="share the address"):
        rules(make(), make(name="other"))


def test_revoked_pairs() -> None:
    base = make(devices=(D1, D2))
    assert revoked([base], [base]) == set()
    assert revoked([base], [make(devices=(D2,))]) == {(S1, D1)}
    assert revoked([base], []) == {(S1, D1), (S1, D2)}
    assert revoked([], [base]) == set()
    # Widening keeps everything; narrowing ports or changing the target revokes the pair.
    assert revoked([base], [make(devices=(D1, D2), tcp=((1, 65535),))]) == set()
    assert revoked([base], [make(devices=(D1, D2), tcp=((22, 22),))]) == {(S1, D1), (S1, D2)}
    assert revoked([base], [make(devices=(D1, D2), udp=())]) == {(S1, D1), (S1, D2)}
    assert revoked([base], [make(devices=(D1, D2), target=V6)]) == {(S1, D1), (S1, D2)}
    # A new device or a new service revokes nothing.
    assert revoked([base], [base, make(address=S2)]) == set()


ranges = st.lists(st.tuples(st.integers(1, 65535), st.integers(0, 50)), max_size=4).map(
    lambda items: tuple(sorted({(a, min(a + n, 65535)) for a, n in items}))
)
devices = st.frozensets(st.sampled_from([D1, D2]))


@given(devices, ranges, devices, ranges)
def test_revoked_is_exactly_the_pairs_that_lost_a_port(
    old_devices: frozenset[IPv6Address],
    old_tcp: tuple[tuple[int, int], ...],
    new_devices: frozenset[IPv6Address],
    new_tcp: tuple[tuple[int, int], ...],
) -> None:
    old = Exposure("s", S1, V4, old_tcp, (), old_devices)
    new = Exposure("s", S1, V4, new_tcp, (), new_devices)
    lost_port = any(
        old.allows(d, "tcp", p) and not new.allows(d, "tcp", p)
        for d in old_devices & new_devices
        for first, last in old_tcp
        for p in range(first, last + 1)
    )
    expected = {(S1, d) for d in old_devices - new_devices}
    if lost_port:
        expected |= {(S1, d) for d in old_devices}
    assert revoked([old], [new]) == expected


def test_access_is_checked_before_related_icmp_is_let_through() -> None:
    # Conntrack relates an ICMPv6 error to whatever flow it quotes, whoever sends it: a device
    # without access must not get one into another device's flow.
    pre = rules(make(), make(address=S2, target=V6)).split("chain svc_pre")[1].split("}")[0]
    access = pre.index("ip6 daddr . ip6 saddr != @access goto svc_deny")
    assert "ct state related" in pre
    assert all(access < m.start() for m in re.finditer("ct state related", pre))


def test_nat66_flows_carry_a_conntrack_mark() -> None:
    text = rules(make(address=S2, target=V6))
    nat_in = text.split("chain nat66_in")[1].split("}")[0]
    assert "ip6 daddr @nat66 ct mark set ct mark or 0x1136 dnat ip6 to" in nat_in


def test_a_broken_path_is_refused_not_left_open() -> None:
    both = (make(), make(address=S2, target=V6))
    no_fwd = ruleset(both, tun="lzc0", tproxy_port=7481, mark=0x1136, refuse_forwarder=True)
    pre = no_fwd.split("chain svc_pre")[1].split("\t}")[0]
    assert "tproxy" not in pre and "meta mark set" not in pre  # falls to the last rule:
    assert pre.rstrip().endswith("goto svc_deny")
    assert "ip6 daddr @nat66 accept" in pre  # the other path still works
    no_nat = ruleset(both, tun="lzc0", tproxy_port=7481, mark=0x1136, refuse_nat66=True)
    pre = no_nat.split("chain svc_pre")[1].split("\t}")[0]
    refuse = pre.index("ip6 daddr @nat66 goto svc_deny")
    assert pre.index("@access goto svc_deny") < refuse < pre.index("ip6 daddr @nat66 accept")
    assert "ct state related ip6 daddr @nat66 accept" not in pre
    assert "tproxy" in pre
