"""Service pages over HTTP: add, list, edit, delete; the audit trail and the transportd message."""

from __future__ import annotations

import re
from ipaddress import IPv6Address

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from lazycat.core.live import TRANSPORTD_GROUP
from lazycat.core.models import AuditEvent
from lazycat.devices import actions as device_actions
from lazycat.devices.actions import DeviceFacts
from lazycat.devices.models import Device
from lazycat.services.actions import do_save_service
from lazycat.services.forms import ServiceForm
from lazycat.services.models import Service
from tests.layer import Listener
from transport import addressing

# Real commits: the transportd message is sent only once the write's transaction commits.
pytestmark = pytest.mark.django_db(transaction=True)

NAS = {
    "kind": "dev-app",
    "name": "nas",
    "target": "192.168.1.20",
    "ports": "tcp 445, 80",
    "exclude_ports": "",
    "access_all": "on",
}


def approved_device(box, owner, n: int) -> Device:
    _, bundle = device_actions.do_create_pairing_code(box, owner)
    outcome = device_actions.do_request_pairing(
        bundle.secret, n.to_bytes(32, "big"), DeviceFacts(name=f"Device {n}"), "192.0.2.1"
    )
    assert outcome.device is not None
    return device_actions.do_approve_device(outcome.device, owner)


def services_table(client) -> str:
    """The list page's table (the flash messages above it name services too)."""
    html = client.get(reverse("services:list")).content.decode()
    table = re.search(r'<table class="grid services">.*?</table>', html, re.S)
    assert table is not None
    return table.group(0)


def add(client, **changes: object) -> Service:
    response = client.post(reverse("services:add"), {**NAS, **changes})
    assert response.status_code == 302, response.context["form"].errors
    assert response["Location"] == reverse("services:list")
    return Service.objects.get(name=changes.get("name", NAS["name"]))


def test_add_then_list_shows_name_and_overlay_address(owner_client, box):
    service = add(owner_client)
    address = IPv6Address(service.overlay_address)
    assert address in box.prefix
    assert addressing.role_of(address) == addressing.Role.SERVICE
    assert address != box.address

    response = owner_client.get(reverse("services:list"))
    html = response.content.decode()
    row = re.search(rf'<tr id="service-{service.pk}"[^>]*>.*?</tr>', html, re.S)
    assert row is not None
    assert "nas.home.heiyu.space" in row.group(0)
    assert f"<code>{address}</code>" in row.group(0)
    assert "<code>tcp 80, 445</code>" in row.group(0)
    assert "all approved devices" in row.group(0)


def test_add_message_names_the_service(owner_client, box):
    response = owner_client.post(reverse("services:add"), NAS, follow=True)
    assert "nas.home.heiyu.space is saved." in response.content.decode()


def test_add_with_errors_shows_the_form_again(owner_client, box):
    response = owner_client.post(reverse("services:add"), {**NAS, "target": "fc03:1136:3800::5"})
    assert response.status_code == 200
    assert "is an overlay address" in response.content.decode()
    assert not Service.objects.exists()
    assert not AuditEvent.objects.filter(action__startswith="service.").exists()


def test_edit_keeps_the_overlay_address_when_renamed(owner_client, box):
    service = add(owner_client)
    response = owner_client.post(
        reverse("services:edit", args=[service.pk]),
        {**NAS, "name": "files", "target": "192.168.1.21"},
    )
    assert response.status_code == 302
    renamed = Service.objects.get(pk=service.pk)
    assert (renamed.name, renamed.target) == ("files", "192.168.1.21")
    assert renamed.overlay_address == service.overlay_address
    assert renamed.uid == service.uid
    table = services_table(owner_client)
    assert "files.home.heiyu.space" in table and "nas.home.heiyu.space" not in table


def test_two_services_get_different_addresses(owner_client, box):
    first = add(owner_client)
    second = add(owner_client, name="media", target="192.168.1.30")
    assert first.overlay_address != second.overlay_address
    assert IPv6Address(second.overlay_address) in box.prefix


def test_delete_removes_the_service(owner_client, box):
    service = add(owner_client)
    response = owner_client.post(reverse("services:delete", args=[service.pk]))
    assert response.status_code == 302
    assert not Service.objects.exists()
    table = services_table(owner_client)
    assert "nas.home.heiyu.space" not in table
    assert "The box exposes nothing yet." in table


def test_delete_needs_post(owner_client, box):
    service = add(owner_client)
    assert owner_client.get(reverse("services:delete", args=[service.pk])).status_code == 405
    assert Service.objects.filter(pk=service.pk).exists()


def test_each_write_is_audited_with_before_and_after(owner_client, box, owner):
    service = add(owner_client)
    created = AuditEvent.objects.get(action="service.created")
    assert created.actor == owner and created.target_id == str(service.pk)
    assert created.before is None
    assert created.after == {
        "kind": "dev-app",
        "name": "nas",
        "target": "192.168.1.20",
        "ports": "tcp 80, 445",
        "exclude_ports": "",
        "access_all": True,
        "allowed_devices": [],
        "overlay_address": service.overlay_address,
    }

    owner_client.post(reverse("services:edit", args=[service.pk]), {**NAS, "name": "files"})
    changed = AuditEvent.objects.get(action="service.changed")
    assert changed.before["name"] == "nas" and changed.after["name"] == "files"
    assert [c[0] for c in changed.changes] == ["name"]

    owner_client.post(reverse("services:delete", args=[service.pk]))
    deleted = AuditEvent.objects.get(action="service.deleted")
    assert deleted.before["name"] == "files" and deleted.after is None
    assert deleted.target_label == "files"


def test_limited_access_is_audited_by_device_label(owner_client, box, owner):
    device = approved_device(box, owner, 1)
    service = add(owner_client, access_all="", allowed_devices=[device.pk])
    assert list(service.allowed_devices.all()) == [device]
    event = AuditEvent.objects.get(action="service.created")
    assert event.after["access_all"] is False
    assert event.after["allowed_devices"] == ["device-1"]


def test_each_write_tells_transportd_after_commit(owner_client, box):
    # One listener per write: a channel-layer receive buffer belongs to one event loop, and
    # every async_to_sync call runs in a fresh one.
    transportd = Listener(TRANSPORTD_GROUP)
    service = add(owner_client)
    uid = str(service.uid)
    assert transportd.messages() == [{"type": "service.changed", "uid": uid, "deleted": False}]

    transportd = Listener(TRANSPORTD_GROUP)
    owner_client.post(reverse("services:edit", args=[service.pk]), {**NAS, "name": "files"})
    assert transportd.messages() == [{"type": "service.changed", "uid": uid, "deleted": False}]

    transportd = Listener(TRANSPORTD_GROUP)
    owner_client.post(reverse("services:delete", args=[service.pk]))
    assert transportd.messages() == [{"type": "service.changed", "uid": uid, "deleted": True}]


def test_a_rolled_back_write_tells_nobody(box, owner):
    transportd = Listener(TRANSPORTD_GROUP)
    form = ServiceForm(data=NAS)
    assert form.is_valid(), form.errors
    with pytest.raises(RuntimeError), transaction.atomic():
        do_save_service(form, owner)
        raise RuntimeError("the surrounding request failed")
    assert not Service.objects.exists()
    assert transportd.messages(timeout=0.3) == []


@pytest.mark.django_db  # no commits needed; a rolled-back test transaction is faster
def test_list_queries_do_not_grow_with_services(owner_client, box, owner):
    devices = [approved_device(box, owner, n) for n in range(1, 7)]

    def limited(n: int) -> None:
        chosen = [devices[(n + i) % len(devices)].pk for i in range(3)]
        data = {**NAS, "name": f"svc-{n}", "access_all": "", "allowed_devices": chosen}
        form = ServiceForm(data=data)
        assert form.is_valid(), form.errors
        do_save_service(form, owner)

    limited(0)
    owner_client.get(reverse("services:list"))  # the first request checks the box is set up
    with CaptureQueriesContext(connection) as one:
        assert owner_client.get(reverse("services:list")).status_code == 200
    for n in range(1, 20):
        limited(n)
    with CaptureQueriesContext(connection) as many:
        html = owner_client.get(reverse("services:list")).content.decode()
    assert html.count('<tr id="service-') == 20
    assert "Device 1, Device 2, Device 3" in html
    assert len(many) == len(one)
