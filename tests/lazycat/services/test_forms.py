"""ServiceForm: every rule a service must satisfy, each with the message the owner sees."""

from __future__ import annotations

import pytest

from lazycat.devices import actions as device_actions
from lazycat.devices.actions import DeviceFacts
from lazycat.devices.models import Device
from lazycat.services.actions import do_save_service
from lazycat.services.forms import ServiceForm
from lazycat.services.models import Service

pytestmark = pytest.mark.django_db

GOOD = {
    "kind": "dev-app",
    "name": "nas",
    "target": "192.168.1.20",
    "ports": "all",
    "exclude_ports": "",
    "access_all": "on",
}


def form(**changes: object) -> ServiceForm:
    data = {**GOOD, **changes}
    return ServiceForm(data={k: v for k, v in data.items() if v is not None})


def errors(**changes: object) -> dict[str, list[str]]:
    f = form(**changes)
    assert not f.is_valid()
    return dict(f.errors)


def pending_device(box, owner, n: int, name: str) -> Device:
    _, bundle = device_actions.do_create_pairing_code(box, owner)
    outcome = device_actions.do_request_pairing(
        bundle.secret, bytes([n]) * 32, DeviceFacts(name=name), "192.0.2.1"
    )
    assert outcome.device is not None
    return outcome.device


def approved_device(box, owner, n: int, name: str) -> Device:
    return device_actions.do_approve_device(pending_device(box, owner, n, name), owner)


def test_a_good_form_is_valid(box):
    f = form()
    assert f.is_valid(), f.errors
    assert f.cleaned_data["name"] == "nas"


def test_name_is_lower_cased(box):
    f = form(name="NAS")
    assert f.is_valid(), f.errors
    assert f.cleaned_data["name"] == "nas"


def test_name_taken_by_another_service(box, owner):
    do_save_service(form(), owner)
    assert errors(name="NAS") == {"name": ["A service is already called nas."]}


def test_a_service_keeps_its_own_name_when_edited(box, owner):
    service = do_save_service(form(), owner)
    edit = ServiceForm(data={**GOOD, "target": "192.168.1.21"}, instance=service)
    assert edit.is_valid(), edit.errors


def test_name_taken_by_an_approved_device(box, owner):
    device = approved_device(box, owner, 1, "Laptop")
    assert device.label == "laptop"
    assert errors(name="laptop") == {
        "name": [
            "A device is already called laptop (laptop.home.heiyu.space): choose another name or "
            "rename the device."
        ]
    }


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a_b", "the name may contain only letters a-z, digits and hyphens (found '_' in 'a_b')"),
        ("-nas", "the name cannot start or end with a hyphen ('-nas')"),
        ("8080", "the name cannot be all digits ('8080')"),
        ("a" * 64, "Ensure this value has at most 63 characters (it has 64)."),
    ],
)
def test_invalid_label_is_refused(box, name, message):
    assert errors(name=name) == {"name": [message]}


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nas.local", "Enter a valid IPv4 or IPv6 address."),
        ("192.168.1.300", "Enter a valid IPv4 or IPv6 address."),
        ("fd00::g", "This is not a valid IPv6 address."),
        ("", "This field is required."),
    ],
)
def test_target_must_be_an_ip_address(box, target, message):
    assert errors(target=target) == {"target": [message]}


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("0.0.0.0", "0.0.0.0 cannot be a service address."),  # noqa: S104
        ("::", ":: cannot be a service address."),
        ("224.0.0.251", "224.0.0.251 cannot be a service address."),
        ("ff02::fb", "ff02::fb cannot be a service address."),
        (
            "fc03:1136:3800::5",
            "fc03:1136:3800::5 is an overlay address; give the service's address on the box's LAN.",
        ),
        (
            "fe80::1",
            "fe80::1 is link-local: it means nothing without an interface. Give the target's "
            "global or unique-local IPv6 address, or its IPv4 address.",
        ),
    ],
)
def test_unusable_targets_are_refused(box, target, message):
    assert errors(target=target) == {"target": [message]}


@pytest.mark.parametrize("target", ["127.0.0.1", "::1"])
def test_the_box_itself_needs_its_ports_listed(box, target):
    assert errors(target=target, ports="all") == {
        "ports": [
            f"{target} is the box itself: 'all' would also expose everything that listens only "
            "on the box's loopback. List this app's ports, e.g. 'tcp 8080'."
        ]
    }
    assert errors(target=target, ports="", kind="vm")["ports"][0].startswith(target)
    listed = form(target=target, ports="tcp 8080")
    assert listed.is_valid(), listed.errors


@pytest.mark.parametrize(
    ("target", "stored"),
    [
        ("192.168.1.20", "192.168.1.20"),
        ("10.0.0.5", "10.0.0.5"),
        ("fd00::20", "fd00::20"),
        ("FD00:0:0:0::20", "fd00::20"),
        ("2001:db8::1", "2001:db8::1"),
    ],
)
def test_lan_targets_are_accepted(box, target, stored):
    f = form(target=target)
    assert f.is_valid(), f.errors
    assert f.cleaned_data["target"] == stored


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        ("http 80", "'http' is not a protocol: use tcp or udp"),
        ("80", "'80' needs a protocol: write 'tcp 80' or 'udp 80'"),
        ("tcp 99999", "99999 is out of range: ports are 1-65535"),
        ("tcp 90-80", "90-80: the range is reversed"),
        ("tcp", "tcp: list ports or 'all'"),
        ("tcp 80-90, 85", "tcp 80-90 overlaps tcp 85"),
        ("tcp 22, 22", "tcp 22 is listed twice"),
        ("udp 1-100; udp 50-60", "udp 1-100 overlaps udp 50-60"),
    ],
)
def test_port_errors_land_on_ports(box, ports, message):
    assert errors(ports=ports) == {"ports": [message]}


def test_except_in_ports_and_separate_exclusions_are_refused(box):
    found = errors(ports="tcp all except tcp 22", exclude_ports="tcp 23")
    assert found == {"exclude_ports": ["give exclusions after 'except' or separately, not both"]}


def test_except_in_ports_is_split_into_both_fields(box):
    f = form(ports="tcp all except tcp 22")
    assert f.is_valid(), f.errors
    assert (f.cleaned_data["ports"], f.cleaned_data["exclude_ports"]) == ("tcp all", "tcp 22")


@pytest.mark.parametrize(
    ("ports", "exclude", "message"),
    [
        ("tcp 80", "tcp 81", "tcp 81 is excluded but not allowed"),
        ("tcp 80-90", "tcp 85-95", "tcp 85-95 is excluded but only partly allowed"),
        ("tcp 80", "tcp 80", "the exclusions leave no port open"),
        ("tcp all", "tcp x", "'x' is not a port number"),
        ("tcp all", "tcp 100-200, 150", "tcp 100-200 overlaps tcp 150"),
    ],
)
def test_exclusion_errors_land_on_exclude_ports(box, ports, exclude, message):
    assert errors(ports=ports, exclude_ports=exclude) == {"exclude_ports": [message]}


def test_canonical_port_text_is_saved(box, owner):
    f = form(ports="UDP 53;  TCP 8000 - 8100,22 80", exclude_ports="tcp 8051,8050")
    assert f.is_valid(), f.errors
    service = do_save_service(f, owner)
    service.refresh_from_db()
    assert service.ports == "tcp 22, 80, 8000-8100; udp 53"
    assert service.exclude_ports == "tcp 8050, 8051"
    assert service.policy.allows("tcp", 8049) and not service.policy.allows("tcp", 8050)


def test_all_ports_stays_all(box, owner):
    service = do_save_service(form(ports="tcp all; udp all"), owner)
    assert Service.objects.get(pk=service.pk).ports == "all"


def test_limited_access_needs_a_device(box, owner):
    message = "Choose at least one device, or let all approved devices reach it."
    assert errors(access_all=None) == {"allowed_devices": [message]}
    device = approved_device(box, owner, 1, "Laptop")
    f = form(access_all=None, allowed_devices=[device.pk])
    assert f.is_valid(), f.errors
    service = do_save_service(f, owner)
    assert list(service.allowed_devices.all()) == [device]
    assert service.access_all is False


def test_only_approved_devices_can_be_chosen(box, owner):
    waiting = pending_device(box, owner, 2, "Tablet")
    found = errors(access_all=None, allowed_devices=[waiting.pk])
    assert found["allowed_devices"][0] == (
        f"Select a valid choice. {waiting.pk} is not one of the available choices."
    )


def test_a_vm_left_without_ports_gets_all_ports(box):
    f = form(kind="vm", ports="")
    assert f.is_valid(), f.errors
    assert f.cleaned_data["ports"] == "all"


def test_a_vm_without_ports_still_honours_exclusions(box, owner):
    service = do_save_service(form(kind="vm", ports="", exclude_ports="tcp 22"), owner)
    assert (service.ports, service.exclude_ports) == ("all", "tcp 22")
    assert service.policy.allows("tcp", 23) and not service.policy.allows("tcp", 22)
    assert service.policy.allows("udp", 22)


def test_an_app_must_list_its_ports(box):
    assert errors(kind="dev-app", ports="  ") == {
        "ports": ["List the ports to expose, e.g. 'tcp 80, 443', or write 'all'."]
    }
