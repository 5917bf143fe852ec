from ipaddress import IPv4Address, IPv6Address, IPv6Network
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport import addressing
from transport.addressing import (
    CLIENT_LOCAL,
    OVERLAY,
    RESOLVER,
    AddressExhausted,
    Role,
    box_address,
    box_index,
    box_prefix,
    device_address,
    in_box_prefix,
    is_overlay,
    role_of,
    service_address,
)

BOX_KEY = bytes(range(32))
DEVICE_KEY = bytes(range(32, 64))
SERVICE_ID = "6f1c2b9e-3d4a-4c5b-8e7f-0a1b2c3d4e5f"
DOC = Path(__file__).resolve().parents[2] / "docs" / "addressing.md"

keys = st.binary(min_size=32, max_size=32)


class Everything:
    """A ``taken`` that holds every address, to drive derivation to exhaustion."""

    def __contains__(self, item: object) -> bool:
        return True


def test_doc_worked_example() -> None:
    """The numbers in docs/addressing.md are the ones the code computes."""
    prefix = box_prefix(BOX_KEY)
    first = device_address(BOX_KEY, DEVICE_KEY, taken=set())
    expected = {
        "index                 = 6600184 = 0x64b5f8": box_index(BOX_KEY) == 0x64B5F8,
        "box prefix            = fc03:1136:3864:b5f8::/64": str(prefix)
        == "fc03:1136:3864:b5f8::/64",
        "box address           = fc03:1136:3864:b5f8::1": str(box_address(prefix))
        == "fc03:1136:3864:b5f8::1",
        "device address         = fc03:1136:3864:b5f8:1:596b:cff2:8dba": str(first)
        == "fc03:1136:3864:b5f8:1:596b:cff2:8dba",
        "device address         = fc03:1136:3864:b5f8:1:39d8:8dd3:75d0": str(
            device_address(BOX_KEY, DEVICE_KEY, taken={first})
        )
        == "fc03:1136:3864:b5f8:1:39d8:8dd3:75d0",
        "service address        = fc03:1136:3864:b5f8:2:335e:c0a:a043": str(
            service_address(BOX_KEY, SERVICE_ID, taken=set())
        )
        == "fc03:1136:3864:b5f8:2:335e:c0a:a043",
    }
    doc = DOC.read_text(encoding="utf-8")
    for line, computed_matches in expected.items():
        assert computed_matches, line
        assert line in doc, f"docs/addressing.md no longer shows {line!r}"


@given(keys)
def test_box_prefix_is_a_nonzero_64_inside_the_overlay(key: bytes) -> None:
    prefix = box_prefix(key)
    assert prefix.prefixlen == 64
    assert prefix.subnet_of(OVERLAY)
    assert prefix != CLIENT_LOCAL
    assert 1 <= box_index(key) < 2**24
    assert box_prefix(key) == prefix  # deterministic


@pytest.mark.parametrize(
    ("value", "index"), [(0, 1), ((2**24 - 1) * 5, 1), (2**24 - 2, 2**24 - 1), (2**64 - 1, 2**16)]
)
def test_index_zero_is_never_produced(value: int, index: int) -> None:
    """A hash that is 0 modulo 2**24 - 1 still gives a non-zero index."""
    assert addressing._index_from_hash(value) == index


def test_box_address_is_prefix_one() -> None:
    prefix = box_prefix(BOX_KEY)
    assert box_address(prefix) == prefix.network_address + 1
    assert role_of(box_address(prefix)) is Role.INFRA


@pytest.mark.parametrize(
    "prefix",
    [CLIENT_LOCAL, IPv6Network("fc03:1136:3801::/48"), IPv6Network("2001:db8::/64")],
)
def test_box_address_rejects_non_box_prefixes(prefix: IPv6Network) -> None:
    with pytest.raises(ValueError, match="not a box prefix"):
        box_address(prefix)


@given(keys, keys)
def test_device_address_is_deterministic_and_well_formed(box_key: bytes, device_key: bytes) -> None:
    address = device_address(box_key, device_key, taken=set())
    assert address == device_address(box_key, device_key, taken=frozenset())
    assert in_box_prefix(address, box_prefix(box_key))
    assert role_of(address) is Role.DEVICE
    assert address != box_address(box_prefix(box_key))


@given(keys, st.uuids().map(str))
def test_service_address_is_deterministic_and_well_formed(box_key: bytes, service_id: str) -> None:
    address = service_address(box_key, service_id, taken=set())
    assert address == service_address(box_key, service_id, taken=set())
    assert in_box_prefix(address, box_prefix(box_key))
    assert role_of(address) is Role.SERVICE


def test_inputs_are_separated() -> None:
    """Same bytes as a different role, box or subject give a different address."""
    as_device = device_address(BOX_KEY, DEVICE_KEY, taken=set())
    as_service = service_address(BOX_KEY, DEVICE_KEY.decode("latin-1"), taken=set())
    other_box = device_address(DEVICE_KEY, DEVICE_KEY, taken=set())
    other_device = device_address(BOX_KEY, BOX_KEY, taken=set())
    assert as_device.packed[10:] != as_service.packed[10:]
    assert as_device.packed[10:] != other_box.packed[10:]
    assert as_device != other_device


def test_collision_rederives_a_different_valid_address() -> None:
    first = device_address(BOX_KEY, DEVICE_KEY, taken=set())
    second = device_address(BOX_KEY, DEVICE_KEY, taken={first})
    third = device_address(BOX_KEY, DEVICE_KEY, taken={first, second})
    assert len({first, second, third}) == 3
    for address in (second, third):
        assert in_box_prefix(address, box_prefix(BOX_KEY))
        assert role_of(address) is Role.DEVICE
    # Only what is in ``taken`` matters: an unrelated taken address changes nothing.
    assert device_address(BOX_KEY, DEVICE_KEY, taken={second}) == first


def test_service_collision_rederives() -> None:
    first = service_address(BOX_KEY, SERVICE_ID, taken=set())
    second = service_address(BOX_KEY, SERVICE_ID, taken={first})
    assert second != first
    assert role_of(second) is Role.SERVICE


def test_exhaustion_raises() -> None:
    with pytest.raises(AddressExhausted, match="64 attempts"):
        device_address(BOX_KEY, DEVICE_KEY, taken=Everything())
    with pytest.raises(AddressExhausted):
        service_address(BOX_KEY, SERVICE_ID, taken=Everything())


@pytest.mark.parametrize("bad", [b"", bytes(31), bytes(33)])
def test_keys_must_be_32_bytes(bad: bytes) -> None:
    with pytest.raises(ValueError, match="box public key must be exactly 32 bytes"):
        box_prefix(bad)
    with pytest.raises(ValueError, match="device public key must be exactly 32 bytes"):
        device_address(BOX_KEY, bad, taken=set())
    with pytest.raises(ValueError, match="box public key must be exactly 32 bytes"):
        service_address(bad, SERVICE_ID, taken=set())


def test_service_id_must_be_nonempty() -> None:
    with pytest.raises(ValueError, match="service id"):
        service_address(BOX_KEY, "", taken=set())


def test_role_of() -> None:
    prefix = box_prefix(BOX_KEY)
    base = int(prefix.network_address)
    assert role_of(RESOLVER) is Role.INFRA
    assert role_of(IPv6Address(base | (1 << 48) | 5)) is Role.DEVICE
    assert role_of(IPv6Address(base | (2 << 48) | 5)) is Role.SERVICE
    assert role_of(IPv6Address(base | (0xFFFF << 48))) is None
    assert role_of(IPv6Address("2001:db8::1:0:0:1")) is None
    assert role_of(IPv4Address("192.0.2.1")) is None


def test_overlay_membership() -> None:
    assert is_overlay(RESOLVER)
    assert is_overlay(IPv6Address("fc03:1136:38ff:ffff:ffff:ffff:ffff:ffff"))
    assert not is_overlay(IPv6Address("fc03:1136:3900::1"))
    assert not is_overlay(IPv4Address("192.0.2.1"))
    prefix = box_prefix(BOX_KEY)
    assert in_box_prefix(box_address(prefix), prefix)
    assert not in_box_prefix(box_address(box_prefix(DEVICE_KEY)), prefix)
    assert not in_box_prefix(IPv4Address("192.0.2.1"), prefix)
