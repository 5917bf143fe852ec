import contextlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport.ports import PortPolicy, PortPolicyError, Range


def test_parse_the_console_example() -> None:
    policy = PortPolicy.parse("tcp 22, 80, 8000-8100; udp 53", "tcp 8050")
    assert policy.allow_tcp == ((22, 22), (80, 80), (8000, 8100))
    assert policy.allow_udp == ((53, 53),)
    assert policy.exclude_tcp == ((8050, 8050),)
    assert policy.effective_ranges("tcp") == [(22, 22), (80, 80), (8000, 8049), (8051, 8100)]
    assert policy.effective_ranges("UDP") == [(53, 53)]
    assert policy.allows("tcp", 8049)
    assert not policy.allows("tcp", 8050)
    assert not policy.allows("udp", 22)
    assert str(policy) == "tcp 22, 80, 8000-8100; udp 53 except tcp 8050"


def test_all_means_every_tcp_and_udp_port() -> None:
    policy = PortPolicy.parse("all")
    for proto in ("tcp", "udp"):
        assert policy.effective_ranges(proto) == [(1, 65535)]
        assert policy.allows(proto, 1)
        assert policy.allows(proto, 65535)
        assert not policy.allows(proto, 0)
        assert not policy.allows(proto, 65536)
    assert policy.allow_text == "all"
    assert PortPolicy.parse("tcp all; udp 1-65535") == policy


def test_tcp_all_with_udp_port() -> None:
    policy = PortPolicy.parse("TCP all; Udp 53")
    assert policy.allow_text == "tcp all; udp 53"
    assert policy.allows("tcp", 65535)
    assert not policy.allows("udp", 54)


def test_whitespace_commas_and_order_are_tolerated() -> None:
    messy = PortPolicy.parse("  udp 53 ;tcp   80,,22  8000 - 8100 ; ", " tcp 8050 ")
    tidy = PortPolicy.parse("tcp 22, 80, 8000-8100; udp 53", "tcp 8050")
    assert messy == tidy
    assert messy.allow_text == "tcp 22, 80, 8000-8100; udp 53"


def test_one_line_form_with_except() -> None:
    assert PortPolicy.parse("tcp all EXCEPT tcp 8050") == PortPolicy.parse("tcp all", "tcp 8050")
    with pytest.raises(PortPolicyError, match="not both"):
        PortPolicy.parse("tcp all except tcp 1", "tcp 2")


@pytest.mark.parametrize(
    ("allow", "exclude", "expected"),
    [
        ("tcp 1-10", "tcp 1", [(2, 10)]),
        ("tcp 1-10", "tcp 10", [(1, 9)]),
        ("tcp 1-10", "tcp 5", [(1, 4), (6, 10)]),
        ("tcp 1-10", "tcp 2-3, 5-6", [(1, 1), (4, 4), (7, 10)]),
        ("tcp all", "tcp 1, 65535", [(2, 65534)]),
        ("tcp 10-20, 21-30", "tcp 18-23", [(10, 17), (24, 30)]),  # exclusion spans two items
        ("tcp 80, 81, 82", "", [(80, 82)]),  # adjacent items are merged for forwarding
    ],
)
def test_effective_ranges_at_edges(allow: str, exclude: str, expected: list[Range]) -> None:
    assert PortPolicy.parse(allow, exclude).effective_ranges("tcp") == expected


@pytest.mark.parametrize(
    ("allow", "exclude", "message"),
    [
        ("tcp 80a", "", "'80a' is not a port number"),
        ("tcp 80-x", "", "'80-x' is not a port range"),
        ("tcp -5", "", "'-5' is not a port range"),
        ("tcp 0", "", "0 is out of range: ports are 1-65535"),
        ("tcp 65536", "", "65536 is out of range"),
        ("tcp 1-99999999999999", "", "99999999999999 is out of range"),
        ("tcp " + "9" * 5000, "", "is out of range"),
        ("tcp 8100-8000", "", "8100-8000: the range is reversed"),
        ("tcp 8000-8100, 8050-8200", "", "tcp 8000-8100 overlaps tcp 8050-8200"),
        ("tcp 8000-8100, 8100-8200", "", "tcp 8000-8100 overlaps tcp 8100-8200"),
        ("tcp 1-100, 50, 70-80", "", "tcp 1-100 overlaps tcp 50"),
        ("tcp 1-100, 90; tcp 95", "", "tcp 1-100 overlaps tcp 90"),
        ("tcp all, 22", "", "tcp all overlaps tcp 22"),
        ("udp 53, 53", "", "udp 53 is listed twice"),
        ("tcp 22; tcp 22", "", "tcp 22 is listed twice"),
        ("all; udp 53", "", "udp all overlaps udp 53"),
        ("", "", "choose ports or 'all'"),
        ("  ; ", "", "choose ports or 'all'"),
        ("tcp", "", "tcp: list ports or 'all'"),
        ("sctp 80", "", "'sctp' is not a protocol"),
        ("80", "", "'80' needs a protocol"),
        ("all 80", "", "'all' stands alone"),
        ("tcp 22, udp", "", "udp: list ports or 'all'"),
        ("tcp udp 53", "", "tcp: list ports or 'all'"),
        ("tcp 22", "udp 53", "udp 53 is excluded but not allowed"),
        ("tcp 20-30", "tcp 25-35", "tcp 25-35 is excluded but only partly allowed"),
        ("tcp 20-30", "tcp 21, 21", "tcp 21 is listed twice"),
        ("tcp 22", "tcp 22", "the exclusions leave no port open"),
        ("all", "all", "the exclusions leave no port open"),
    ],
)
def test_errors_say_what_is_wrong(allow: str, exclude: str, message: str) -> None:
    with pytest.raises(PortPolicyError, match=message):
        PortPolicy.parse(allow, exclude)


def test_direct_construction_is_validated_and_sorted() -> None:
    policy = PortPolicy(allow_tcp=((80, 80), (22, 22)))
    assert policy.allow_tcp == ((22, 22), (80, 80))
    assert policy == PortPolicy.parse("tcp 80, 22")
    with pytest.raises(PortPolicyError, match="overlaps"):
        PortPolicy(allow_tcp=((1, 10), (5, 6)))
    with pytest.raises(PortPolicyError, match="choose ports"):
        PortPolicy()


def test_unknown_protocol_in_queries() -> None:
    policy = PortPolicy.parse("all")
    with pytest.raises(PortPolicyError, match="not a protocol"):
        policy.allows("icmp", 1)


@st.composite
def range_lists(draw: st.DrawFn) -> list[Range]:
    """Disjoint ranges and single ports in 1..65535, in random order."""
    cuts = sorted(draw(st.sets(st.integers(1, 65535), min_size=0, max_size=12)))
    ranges = [
        (cuts[i], cuts[i + 1] if draw(st.booleans()) else cuts[i])
        for i in range(0, len(cuts) - 1, 2)
    ]
    return draw(st.permutations(ranges))


@st.composite
def policies(draw: st.DrawFn) -> PortPolicy:
    tcp, udp = draw(range_lists()), draw(range_lists())
    if not tcp and not udp:
        tcp = [(1, 65535)]

    def holes(ranges: list[Range]) -> list[Range]:
        # Pick exclusions inside some of the allowed ranges.
        out = []
        for first, last in ranges:
            if draw(st.booleans()):
                a = draw(st.integers(first, last))
                out.append((a, draw(st.integers(a, last))))
        return out

    try:
        return PortPolicy(tuple(tcp), tuple(udp), tuple(holes(tcp)), tuple(holes(udp)))
    except PortPolicyError as exc:
        assert "no port open" in str(exc)
        return PortPolicy(tuple(tcp), tuple(udp))


@given(policies())
def test_canonical_text_round_trips(policy: PortPolicy) -> None:
    assert PortPolicy.parse(policy.allow_text, policy.exclude_text) == policy
    assert PortPolicy.parse(str(policy)) == policy


@given(policies(), st.sampled_from(["tcp", "udp"]), st.integers(0, 65536))
def test_allows_matches_allowed_minus_excluded(policy: PortPolicy, proto: str, port: int) -> None:
    allowed = policy.allow_tcp if proto == "tcp" else policy.allow_udp
    excluded = policy.exclude_tcp if proto == "tcp" else policy.exclude_udp
    expected = any(a <= port <= b for a, b in allowed) and not any(
        a <= port <= b for a, b in excluded
    )
    assert policy.allows(proto, port) is expected


@given(policies(), st.sampled_from(["tcp", "udp"]))
def test_effective_ranges_are_sorted_disjoint_and_merged(policy: PortPolicy, proto: str) -> None:
    ranges = policy.effective_ranges(proto)
    for (a1, b1), (a2, _) in itertools.pairwise(ranges):
        assert a1 <= b1 < a2 - 1
    assert all(1 <= a <= b <= 65535 for a, b in ranges)


@given(st.text(), st.text())
def test_arbitrary_text_raises_only_port_policy_error(allow: str, exclude: str) -> None:
    with contextlib.suppress(PortPolicyError):
        PortPolicy.parse(allow, exclude)


@given(
    st.lists(
        st.sampled_from(["tcp", "udp", "all", "22", "80-90", "1", "65535", ";", ",", " ", "-"])
    )
)
def test_grammar_soup_raises_only_port_policy_error(tokens: list[str]) -> None:
    try:
        policy = PortPolicy.parse(" ".join(tokens))
    except PortPolicyError:
        return
    assert PortPolicy.parse(str(policy)) == policy


@pytest.mark.parametrize("text", ["tcp 22, 80 udp 53", "tcp 22 80, udp 53", "TCP 22,80;UDP 53"])
def test_a_protocol_name_starts_its_own_list(text: str) -> None:
    assert PortPolicy.parse(text).allow_text == "tcp 22, 80; udp 53"
