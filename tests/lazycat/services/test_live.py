"""Which devices use each service: transportd's report, the list page, the live push."""

from __future__ import annotations

import re

import pytest
from django.core.cache import cache
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from lazycat.core.live import CONSOLE_GROUP
from lazycat.devices import actions as device_actions
from lazycat.devices.actions import DeviceFacts
from lazycat.devices.models import Device
from lazycat.services import live
from lazycat.services.actions import do_save_service
from lazycat.services.forms import ServiceForm
from lazycat.services.models import Service
from tests.layer import Listener

pytestmark = pytest.mark.django_db(transaction=True)


def approved_device(box, owner, n: int, name: str) -> Device:
    _, bundle = device_actions.do_create_pairing_code(box, owner)
    outcome = device_actions.do_request_pairing(
        bundle.secret, bytes([n]) * 32, DeviceFacts(name=name), "192.0.2.1"
    )
    assert outcome.device is not None
    device = device_actions.do_approve_device(outcome.device, owner)
    assert device.overlay_address
    return device


def service(owner, name: str) -> Service:
    data = {"kind": "dev-app", "name": name, "target": "192.0.2.80", "ports": "tcp 80"}
    form = ServiceForm(data={**data, "access_all": "on"})
    assert form.is_valid(), form.errors
    return do_save_service(form, owner)


def row(client, service: Service) -> str:
    html = client.get(reverse("services:list")).content.decode()
    found = re.search(rf'<tr id="service-{service.pk}"[^>]*>.*?</tr>', html, re.S)
    assert found is not None
    return found.group(0)


def pushed_rows(listener: Listener) -> list[str]:
    html = "".join(m["html"] for m in listener.messages(timeout=0.5))
    return re.findall(r'<tr id="(service-\d+)"', html)


@pytest.fixture
def world(box, owner):  # type: ignore[no-untyped-def]
    alice = approved_device(box, owner, 1, "alice-laptop")
    bob = approved_device(box, owner, 2, "bob-phone")
    web, ssh = service(owner, "web"), service(owner, "devvm")
    return alice, bob, web, ssh


def test_usage_shows_device_names_on_the_list(owner_client, world):
    alice, bob, web, ssh = world
    assert "not in use" in row(owner_client, web)
    live.report_usage({web.overlay_address: [bob.overlay_address, alice.overlay_address]})
    assert "in use by: alice-laptop, bob-phone" in row(owner_client, web)
    assert "not in use" in row(owner_client, ssh)


def test_only_rows_whose_devices_changed_are_pushed(world):
    alice, bob, web, ssh = world
    consoles = Listener(CONSOLE_GROUP)
    live.report_usage({web.overlay_address: [alice.overlay_address]})
    assert pushed_rows(consoles) == [f"service-{web.pk}"]

    consoles = Listener(CONSOLE_GROUP)
    live.report_usage({web.overlay_address: [alice.overlay_address]})  # the same picture
    assert pushed_rows(consoles) == []

    consoles = Listener(CONSOLE_GROUP)
    live.report_usage({ssh.overlay_address: [bob.overlay_address]})  # web ends, ssh starts
    assert sorted(pushed_rows(consoles)) == sorted([f"service-{web.pk}", f"service-{ssh.pk}"])


def test_pushed_row_names_the_devices(world):
    alice, _, web, _ = world
    consoles = Listener(CONSOLE_GROUP)
    live.report_usage({web.overlay_address: [alice.overlay_address]})
    html = "".join(m["html"] for m in consoles.messages())
    assert "in use by: alice-laptop" in html and 'hx-swap-oob="true"' in html


def test_addresses_are_compared_in_canonical_form(owner_client, world):
    alice, _, web, _ = world
    loud = web.overlay_address.upper().replace("::", ":0::")
    live.report_usage({loud: [alice.overlay_address.upper()]})
    assert cache.get(live.USAGE_KEY) == {web.overlay_address: [alice.overlay_address]}
    assert "in use by: alice-laptop" in row(owner_client, web)


def test_garbage_and_empty_entries_are_dropped(world):
    alice, _, web, ssh = world
    live.report_usage(
        {
            "not-an-address": [alice.overlay_address],
            web.overlay_address: ["nope"],
            ssh.overlay_address: [],
        }
    )
    assert live.current_usage() == {}


def test_an_unknown_device_is_shown_by_address(owner_client, world):
    _, _, web, _ = world
    live.report_usage({web.overlay_address: ["fc03:1136:3800:1:2::99"]})
    assert "in use by: fc03:1136:3800:1:2::99" in row(owner_client, web)


def test_list_queries_do_not_grow_with_usage(owner_client, world):
    alice, bob, web, ssh = world
    owner_client.get(reverse("services:list"))
    live.report_usage({web.overlay_address: [alice.overlay_address]})
    with CaptureQueriesContext(connection) as one:
        owner_client.get(reverse("services:list"))
    live.report_usage(
        {
            web.overlay_address: [alice.overlay_address, bob.overlay_address],
            ssh.overlay_address: [alice.overlay_address, bob.overlay_address],
        }
    )
    with CaptureQueriesContext(connection) as many:
        owner_client.get(reverse("services:list"))
    assert len(many) == len(one)
