"""transportd's view of the services: what ``load_exposures`` makes of the database.

The kernel side (nftables, the forwarder) is tested in tests/transport/test_exposure_linux.py
and end to end in tests/natlab/test_services_lab.py; here only the translation, against the real
database: who may reach what, and on which ports.
"""

from __future__ import annotations

import uuid
from ipaddress import IPv4Address, IPv6Address

import pytest

from lazycat.devices import actions as device_actions
from lazycat.devices.actions import DeviceFacts
from lazycat.devices.models import Device
from lazycat.services.models import Service
from lazycat.tunnel.services import load_exposures
from transport import addressing

pytestmark = pytest.mark.django_db


def device(box, owner, n: int, approve: bool = True) -> Device:
    _, bundle = device_actions.do_create_pairing_code(box, owner)
    outcome = device_actions.do_request_pairing(
        bundle.secret, n.to_bytes(32, "big"), DeviceFacts(name=f"Device {n}"), "192.0.2.1"
    )
    assert outcome.device is not None
    if approve:
        return device_actions.do_approve_device(outcome.device, owner)
    return outcome.device


def service(box, name: str, target: str, ports: str = "all", exclude: str = "", **kw) -> Service:
    uid = uuid.uuid4()
    allowed = kw.pop("allowed", None)
    made = Service.objects.create(
        uid=uid,
        kind=kw.pop("kind", "vm"),
        name=name,
        target=target,
        ports=ports,
        exclude_ports=exclude,
        access_all=allowed is None,
        overlay_address=str(addressing.service_address(box.key, str(uid), taken=set())),
    )
    if allowed:
        made.allowed_devices.set(allowed)
    return made


def test_everyone_means_every_approved_device_and_nobody_else(box, owner):
    a, b = device(box, owner, 1), device(box, owner, 2)
    device(box, owner, 3, approve=False)  # pending: in no set
    revoked = device(box, owner, 4)
    device_actions.do_revoke_device(revoked, owner)
    made = service(box, "devvm", "192.168.1.50")

    (exposure,) = load_exposures()

    assert exposure.name == "devvm"
    assert exposure.address == IPv6Address(made.overlay_address)
    assert exposure.target == IPv4Address("192.168.1.50")
    assert exposure.devices == {IPv6Address(a.overlay_address), IPv6Address(b.overlay_address)}
    assert exposure.tcp == ((1, 65535),) and exposure.udp == ((1, 65535),)


def test_chosen_devices_only_while_they_are_approved(box, owner):
    a, b, c = (device(box, owner, n) for n in (1, 2, 3))
    service(box, "nas", "fd00::20", "tcp 445, 80; udp 53", allowed=[a, b], kind="dev-app")
    device_actions.do_revoke_device(b, owner)

    (exposure,) = load_exposures()

    assert exposure.devices == {IPv6Address(a.overlay_address)}
    assert IPv6Address(c.overlay_address) not in exposure.devices
    assert exposure.tcp == ((80, 80), (445, 445)) and exposure.udp == ((53, 53),)


def test_exclusions_are_cut_out_of_the_ranges(box, owner):
    service(box, "vm2", "192.168.1.51", "all", "tcp 25; udp 1-1023")

    (exposure,) = load_exposures()

    assert exposure.tcp == ((1, 24), (26, 65535))
    assert exposure.udp == ((1024, 65535),)
    assert exposure.devices == frozenset()


def test_a_row_the_form_would_refuse_costs_only_that_service(box, owner):
    """Written by hand or by an older version: a link-local target needs an interface scope the
    model does not carry. That service is left out (and logged); the others are forwarded."""
    service(box, "good", "192.168.1.50")
    service(box, "scoped", "fe80::1")

    assert [e.name for e in load_exposures()] == ["good"]
