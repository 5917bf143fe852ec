"""transport/negotiation.py: the control messages' codecs, the pairing of candidates, timing."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport import negotiation as neg
from transport.paths import Candidate, CandidateKind, Direct, ViaRelay

C = CandidateKind

BOX = [
    Candidate(C.EGRESS, Direct("192.168.1.10", 7483)),
    Candidate(C.REFLEXIVE, Direct("203.0.113.7", 7483)),
    Candidate(C.IPV6, Direct("2001:db8:1::10", 7483)),
    Candidate(C.PORTMAPPED, Direct("203.0.113.7", 40000), priority=1),
    Candidate(C.RELAY, ViaRelay("eu")),
    Candidate(C.RELAY, ViaRelay("us")),
]
DEVICE_V4 = [
    Candidate(C.EGRESS, Direct("10.0.0.5", 51000)),
    Candidate(C.REFLEXIVE, Direct("198.51.100.9", 61000)),
    Candidate(C.RELAY, ViaRelay("eu")),
]


def roundtrip(message: dict) -> object:
    return json.loads(json.dumps(message))


def test_candidates_survive_json_both_ways():
    assert neg.candidates_from_json(roundtrip(neg.candidates_to_json(BOX))) == BOX


def test_hello_parses_back_to_what_was_sent():
    message = roundtrip(neg.hello(DEVICE_V4, network_changed=True, version="0.1.0"))
    parsed = neg.parse_client_message(message)
    assert parsed == neg.Hello(tuple(DEVICE_V4), True, "0.1.0")


def test_punch_and_config_parse_back():
    punch = neg.Punch(tuple(BOX), 0.125, "eu", 3)
    assert neg.parse_box_message(roundtrip(neg.punch_message(punch))) == punch
    config = neg.Config({"mybox.heiyu.space": ["fc03:1136:38aa:bbcc::1"]}, b"\x01" * 104, 7480)
    assert neg.parse_box_message(roundtrip(neg.config_message(config))) == config


@pytest.mark.parametrize(
    ("candidate", "why"),
    [
        ({"kind": "teleport", "ip": "203.0.113.1", "port": 1}, "unknown candidate kind"),
        ({"kind": "reflexive", "ip": "203.0.113.1", "port": 0}, "port 1-65535"),
        ({"kind": "reflexive", "ip": "203.0.113.1", "port": True}, "port 1-65535"),
        ({"kind": "reflexive", "ip": "not-an-ip", "port": 5}, "not an IP address"),
        ({"kind": "reflexive", "ip": "127.0.0.1", "port": 5}, "cannot be a candidate"),
        ({"kind": "reflexive", "ip": "0.0.0.0", "port": 5}, "cannot be a candidate"),  # noqa: S104
        ({"kind": "lan", "ip": "ff02::1", "port": 5}, "cannot be a candidate"),
        ({"kind": "relay"}, "names its relay"),
        ({"kind": "relay", "relay": "x" * 65}, "names its relay"),
        ({"kind": "lan", "ip": "10.0.0.1", "port": 5, "priority": -1}, "priority"),
    ],
)
def test_bad_candidates_are_refused_with_the_reason(candidate, why):
    with pytest.raises(neg.NegotiationError, match=why):
        neg.candidate_from_json(candidate)


def test_too_many_candidates_are_refused():
    many = [{"kind": "lan", "ip": f"10.0.0.{i}", "port": 1} for i in range(1, 40)]
    with pytest.raises(neg.NegotiationError, match="more than 32"):
        neg.candidates_from_json(many)


def test_duplicate_candidates_are_merged():
    one = {"kind": "lan", "ip": "10.0.0.1", "port": 1}
    assert len(neg.candidates_from_json([one, one])) == 1


def test_records_must_be_ipv6_addresses():
    with pytest.raises(neg.NegotiationError, match="IPv6"):
        neg.parse_records({"a.heiyu.space": ["192.0.2.1"]})
    with pytest.raises(neg.NegotiationError, match="1-8 addresses"):
        neg.parse_records({"a.heiyu.space": []})
    assert neg.parse_records({"A.Heiyu.Space.": ["fc03:1136:3800::5"]}) == {
        "a.heiyu.space": ["fc03:1136:3800::5"]
    }


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=25,
)
message_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["hello", "netcheck", "punch", "config", "other"])},
    optional={
        "candidates": json_values,
        "delay": json_values,
        "relay": json_values,
        "attempt": json_values,
        "records": json_values,
        "ticket": json_values,
        "control_port": json_values,
        "network_changed": json_values,
        "version": json_values,
        "report": json_values,
    },
)


@given(st.one_of(json_values, message_like))
def test_parsers_raise_only_negotiation_error(data):
    for parse in (neg.parse_client_message, neg.parse_box_message):
        with contextlib.suppress(neg.NegotiationError):
            parse(data)


# --- the plan -----------------------------------------------------------------------------------


def test_an_ipv4_only_device_is_not_given_the_box_ipv6_address():
    plan = neg.plan(BOX, DEVICE_V4)
    assert Candidate(C.IPV6, Direct("2001:db8:1::10", 7483)) not in plan.to_device
    assert Candidate(C.REFLEXIVE, Direct("203.0.113.7", 7483)) in plan.to_device
    assert Candidate(C.PORTMAPPED, Direct("203.0.113.7", 40000), priority=1) in plan.to_device
    assert plan.to_box == tuple(DEVICE_V4)


def test_a_dual_stack_device_gets_ipv6_too():
    device = [*DEVICE_V4, Candidate(C.IPV6, Direct("2001:db8:2::5", 51000))]
    assert Candidate(C.IPV6, Direct("2001:db8:1::10", 7483)) in neg.plan(BOX, device).to_device


def test_the_relay_with_the_lowest_round_trip_through_it_is_chosen():
    box_latency = {"eu": 0.010, "us": 0.090}
    device_latency = {"eu": 0.150, "us": 0.020}  # the device is in America
    plan = neg.plan(BOX, DEVICE_V4, box_latency=box_latency, device_latency=device_latency)
    assert plan.relay == "us"  # 110 ms through us, 160 ms through eu


def test_unmeasured_relays_keep_the_box_order():
    assert neg.plan(BOX, DEVICE_V4).relay == "eu"


def test_the_box_starts_later_by_the_messages_travel_to_the_device():
    plan = neg.plan(BOX, DEVICE_V4, box_latency={"eu": 0.020}, device_latency={"eu": 0.060})
    assert plan.device_delay == pytest.approx(neg.START_BASE)
    assert plan.box_delay == pytest.approx(neg.START_BASE + 0.040)  # half of 20 + 60 ms


def test_the_start_never_waits_past_the_cap():
    slow = {"eu": 5.0, "us": 5.0}
    plan = neg.plan(BOX, DEVICE_V4, box_latency=slow, device_latency=slow)
    assert plan.box_delay == pytest.approx(neg.START_MAX)


def test_retries_back_off_from_5_s_to_5_min():
    assert [neg.retry_delay(n) for n in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
    assert neg.retry_delay(20) == neg.RETRY_MAX
