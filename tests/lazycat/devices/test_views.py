"""Device pages: list with inbox, detail, pairing page, decisions over HTTP."""

from __future__ import annotations

import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from lazycat.devices import actions
from lazycat.devices.actions import DeviceFacts, PathReport
from lazycat.devices.models import Device, DeviceStatus, PairingCode, PathKind
from transport.bundle import PairingBundle

pytestmark = pytest.mark.django_db


def request_pairing(box, owner, n: int, name: str = "Phone") -> Device:
    _, bundle = actions.do_create_pairing_code(box, owner)
    outcome = actions.do_request_pairing(
        bundle.secret, n.to_bytes(32, "big"), DeviceFacts(name=name, os="Linux"), f"192.0.2.{n}"
    )
    assert outcome.device is not None
    return outcome.device


def approved(box, owner, n: int, name: str = "Phone") -> Device:
    return actions.do_approve_device(request_pairing(box, owner, n, name), owner)


def test_pair_page_shows_qr_and_bundle_once(owner_client, box):
    response = owner_client.post(reverse("devices:pair"))
    assert response.status_code == 200
    html = response.content.decode()
    assert "<svg" in html
    text = re.search(r"lazycat-client pair '(lazycat://[^']+)'", html)
    assert text is not None
    bundle = PairingBundle.parse(text.group(1).replace("&amp;", "&"))
    assert bundle.box == box.name and bundle.box_key == box.key
    assert f'data-expires="{bundle.expires_at}"' in html
    # Stored hashed: the page for a plain GET cannot show it again.
    again = owner_client.get(reverse("devices:pair")).content.decode()
    assert "lazycat://" not in again


def test_list_shows_inbox_and_devices(owner_client, box, owner):
    request_pairing(box, owner, 1, "Pending Pad")
    device = approved(box, owner, 2, "Laptop")
    actions.do_report_path(
        device.key,
        PathReport(PathKind.RELAY, relay="home", rtt_ms=31.0, last_handshake=timezone.now()),
    )
    html = owner_client.get(reverse("devices:list")).content.decode()
    assert "Waiting for your approval" in html and "Pending Pad" in html
    row = re.search(rf'<tr id="device-{device.pk}".*?</tr>', html, re.S)
    assert row is not None
    assert "dot-yellow" in row.group(0) and "relay home" in row.group(0)
    assert "31.0 ms" in row.group(0) and "laptop.home.heiyu.space" in row.group(0)


def test_device_list_has_no_n_plus_one(owner_client, box, owner):
    approved(box, owner, 1)
    owner_client.get(reverse("devices:list"))  # warm: the session and the box lookups settle
    with CaptureQueriesContext(connection) as one:
        owner_client.get(reverse("devices:list"))
    for n in range(2, 30):
        approved(box, owner, n)
    with CaptureQueriesContext(connection) as many:
        owner_client.get(reverse("devices:list"))
    assert len(many) == len(one)


def test_approve_and_reject_over_http(owner_client, box, owner):
    first = request_pairing(box, owner, 1, "First")
    second = request_pairing(box, owner, 2, "Second")
    response = owner_client.post(
        reverse("devices:approve", args=[first.pk]), {"expires_in": "86400"}, HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 200
    assert 'id="approval-inbox"' in response.content.decode()
    assert "First" not in response.content.decode() and "Second" in response.content.decode()
    first.refresh_from_db()
    assert first.status == DeviceStatus.APPROVED and first.approval_expires_at is not None

    response = owner_client.post(reverse("devices:reject", args=[second.pk]), {"note": "who?"})
    assert response.status_code == 302
    second.refresh_from_db()
    assert second.status == DeviceStatus.REJECTED and second.decision_note == "who?"

    # Approving twice says why it cannot.
    response = owner_client.post(reverse("devices:approve", args=[first.pk]), follow=True)
    assert "First is approved, so it cannot be approved." in response.content.decode()


def test_detail_shows_state_timeline_and_direct_share(owner_client, box, owner):
    device = approved(box, owner, 1)
    actions.do_report_path(
        device.key, PathReport(PathKind.RELAY, relay="home", cause="new session")
    )
    actions.do_report_path(
        device.key, PathReport(PathKind.DIRECT_V6, endpoint="[2001:db8::7]:41641", cause="punched")
    )
    html = owner_client.get(reverse("devices:detail", args=[device.pk])).content.decode()
    assert f'id="device-{device.pk}-state"' in html and "dot-blue" in html
    assert "[2001:db8::7]:41641" in html and "punched" in html and "new session" in html
    assert "of the connected time in the last 24 h was direct" in html
    assert device.overlay_address in html


def test_revoke_and_rename_over_http(owner_client, box, owner):
    device = approved(box, owner, 1)
    owner_client.post(reverse("devices:rename", args=[device.pk]), {"name": "Kitchen Tablet"})
    owner_client.post(reverse("devices:revoke", args=[device.pk]), {"note": "sold"})
    device.refresh_from_db()
    assert (device.name, device.label, device.status) == (
        "Kitchen Tablet",
        "kitchen-tablet",
        "revoked",
    )


def test_list_paginates_and_filters(owner_client, box, owner, settings, monkeypatch):
    from lazycat.devices import views

    settings.LAZYCAT_PAIRING_RATE = 1000
    monkeypatch.setattr(views, "PAGE_SIZE", 5)
    for n in range(1, 13):
        device = approved(box, owner, n, f"Box {n:02d}")
        if n % 4 == 0:
            actions.do_report_path(device.key, PathReport(PathKind.RELAY, relay="home"))
    html = owner_client.get(reverse("devices:list")).content.decode()
    assert html.count('class="device-row') == 5 and "page 1 of 3" in html
    html = owner_client.get(reverse("devices:list"), {"page": 3}).content.decode()
    assert html.count('class="device-row') == 2
    html = owner_client.get(reverse("devices:list"), {"q": "box 1"}).content.decode()
    assert html.count('class="device-row') == 3  # Box 10, 11, 12 (not Box 01)
    assert "data-append-new" not in html  # a filtered page never grows by push
    html = owner_client.get(reverse("devices:list"), {"path": "relay"}).content.decode()
    assert html.count('class="device-row') == 3 and "path-relay" in html


def test_pair_needs_a_relay_or_a_lan_address(owner_client, settings):
    settings.LAZYCAT_RELAYS = []
    settings.LAZYCAT_TUNNEL_LISTEN = ("127.0.0.1", 7483)  # no LAN address either
    response = owner_client.post(reverse("devices:pair"), follow=True)
    assert "No relay is configured" in response.content.decode()
    assert not PairingCode.objects.exists()
    settings.LAZYCAT_TUNNEL_LISTEN = ("192.0.2.20", 7483)  # a LAN address alone suffices
    html = owner_client.post(reverse("devices:pair")).content.decode()
    assert "lan=192.0.2.20:7483" in html and PairingCode.objects.count() == 1
