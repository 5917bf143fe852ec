"""The device service functions: pairing, decisions, path reports."""

from __future__ import annotations

import base64
import stat
import time
from datetime import timedelta
from ipaddress import IPv6Address

import pytest
from django.utils import timezone

from lazycat.core import keys
from lazycat.core.live import CONSOLE_GROUP, TRANSPORTD_GROUP
from lazycat.core.models import AuditEvent
from lazycat.devices import actions
from lazycat.devices.actions import DeviceFacts, PathReport, Refusal
from lazycat.devices.models import Device, DeviceStatus, PairingCode, PathEvent, PathKind
from tests.layer import Listener
from transport import addressing, wire
from transport.bundle import PairingBundle
from transport.tickets import PAIRING_TICKET_MAX_LIFETIME, verify_ticket

pytestmark = pytest.mark.django_db(transaction=True)

PHONE = DeviceFacts(name="Alice's Phone", os="Android 15", model="Pixel 9", client_version="0.1.0")


def key(n: int) -> bytes:
    return bytes([n]) * 32


def new_code(box, owner) -> bytes:
    _, bundle = actions.do_create_pairing_code(box, owner)
    return bundle.secret


def pending_device(box, owner, n: int = 1) -> Device:
    outcome = actions.do_request_pairing(new_code(box, owner), key(n), PHONE, "198.51.100.7")
    assert outcome.accepted, outcome.refusal
    assert outcome.device is not None
    return outcome.device


def test_pairing_code_is_stored_hashed_and_bundle_carries_secret(box, owner):
    code, bundle = actions.do_create_pairing_code(box, owner)
    assert len(bundle.secret) == 16
    assert bytes(code.secret_hash) == PairingCode.hash_secret(bundle.secret)
    assert bundle.secret not in bytes(code.secret_hash)
    assert bundle.box == "home" and bundle.box_key == box.key
    assert [r.name for r in bundle.relays] == ["home"]
    parsed = PairingBundle.parse(bundle.to_text())
    assert parsed == bundle
    assert 590 <= bundle.expires_at - timezone.now().timestamp() <= 600


def test_pairing_code_carries_a_pairing_ticket_signed_by_the_box(box, owner, settings):
    _, bundle = actions.do_create_pairing_code(box, owner)
    ticket = wire.Ticket.decode(bundle.ticket)
    assert ticket.box == wire.peer_id(box.key) and ticket.client == wire.ANY_CLIENT
    assert ticket.expires == bundle.expires_at
    key_file = settings.LAZYCAT_TICKET_KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    signer = keys.load_or_create_ticket_key(key_file)
    assert verify_ticket(ticket, signer.public_bytes(), time.time()) is None
    # A code that outlives the hour a pairing ticket may live gets a ticket capped at that hour.
    settings.LAZYCAT_PAIRING_TTL = 24 * 3600
    _, long = actions.do_create_pairing_code(box, owner)
    assert wire.Ticket.decode(long.ticket).expires <= time.time() + PAIRING_TICKET_MAX_LIFETIME


def test_request_with_valid_code_records_pending_device_and_uses_code(box, owner):
    secret = new_code(box, owner)
    inbox = Listener(CONSOLE_GROUP)
    outcome = actions.do_request_pairing(secret, key(1), PHONE, "198.51.100.7")
    assert outcome.accepted
    device = Device.objects.get()
    assert device.status == DeviceStatus.PENDING
    assert (device.name, device.os, device.model, device.client_version) == (
        "Alice's Phone",
        "Android 15",
        "Pixel 9",
        "0.1.0",
    )
    assert device.source == "198.51.100.7" and device.via_code
    assert PairingCode.objects.get().used_by == device
    fragments = [m["html"] for m in inbox.messages()]
    assert any('id="approval-inbox"' in f and "Alice&#x27;s Phone" in f for f in fragments)
    assert AuditEvent.objects.filter(action="device.requested", source="198.51.100.7").exists()


def _use(secret: bytes) -> None:
    assert actions.do_request_pairing(secret, key(1), PHONE, "198.51.100.7").accepted


def _expire(secret: bytes) -> None:
    PairingCode.objects.update(expires_at=timezone.now())


def _cancel(secret: bytes) -> None:
    PairingCode.objects.update(cancelled=True)


@pytest.mark.parametrize(
    ("spoil", "refusal"),
    [(_use, Refusal.USED_CODE), (_expire, Refusal.EXPIRED_CODE), (_cancel, Refusal.USED_CODE)],
)
def test_reused_expired_or_cancelled_code_is_refused(box, owner, spoil, refusal):
    secret = new_code(box, owner)
    spoil(secret)
    outcome = actions.do_request_pairing(secret, key(2), PHONE, "198.51.100.7")
    assert outcome.refusal == refusal
    assert not Device.objects.filter(public_key=key(2)).exists()
    refused = AuditEvent.objects.get(action="pairing.refused")
    assert refused.detail.startswith(refusal.name) and refused.source == "198.51.100.7"


def test_unknown_code_and_missing_code_are_refused_unless_owner_allows(box, owner):
    assert (
        actions.do_request_pairing(b"x" * 16, key(1), PHONE, "198.51.100.7").refusal
        == Refusal.UNKNOWN_CODE
    )
    assert (
        actions.do_request_pairing(None, key(1), PHONE, "198.51.100.7").refusal == Refusal.NO_CODE
    )
    assert not Device.objects.exists()

    box.accept_without_code = True
    box.save()
    outcome = actions.do_request_pairing(None, key(1), PHONE, "198.51.100.7")
    assert outcome.accepted and outcome.device is not None
    assert not outcome.device.via_code
    # A wrong code is then treated as no code, and still waits for approval.
    outcome = actions.do_request_pairing(b"x" * 16, key(2), PHONE, "198.51.100.7")
    assert outcome.accepted and outcome.device.status == DeviceStatus.PENDING


def test_bad_key_and_bad_facts_are_refused(box, owner):
    secret = new_code(box, owner)
    assert actions.do_request_pairing(secret, b"short", PHONE, "s").refusal == Refusal.BAD_KEY
    assert actions.do_request_pairing(secret, bytes(32), PHONE, "s").refusal == Refusal.BAD_KEY
    outcome = actions.do_request_pairing(secret, key(1), DeviceFacts(name="\x00\x01 "), "s")
    assert outcome.refusal == Refusal.BAD_FACTS and "name is empty" in outcome.detail
    outcome = actions.do_request_pairing(secret, key(1), DeviceFacts(name="x" * 101), "s")
    assert outcome.refusal == Refusal.BAD_FACTS
    # The code is still good: refusals before the code check do not burn it.
    assert actions.do_request_pairing(secret, key(1), PHONE, "s").accepted


def test_requests_are_rate_limited_per_source(box, owner, settings):
    settings.LAZYCAT_PAIRING_RATE = 3
    for _ in range(3):
        assert actions.do_request_pairing(b"y" * 16, key(1), PHONE, "203.0.113.5").refusal == (
            Refusal.UNKNOWN_CODE
        )
    assert actions.do_request_pairing(
        new_code(box, owner), key(1), PHONE, "203.0.113.5"
    ).refusal == (Refusal.RATE_LIMITED)
    # Another source has its own budget.
    assert actions.do_request_pairing(new_code(box, owner), key(1), PHONE, "203.0.113.6").accepted
    # A flood is audited once per window, not once per attempt.
    for _ in range(20):
        actions.do_request_pairing(b"y" * 16, key(3), PHONE, "203.0.113.5")
    assert AuditEvent.objects.filter(detail="RATE_LIMITED", source="203.0.113.5").count() == 1


def test_approve_assigns_label_and_address_and_tells_transportd(box, owner):
    device = pending_device(box, owner)
    tunnel = Listener(TRANSPORTD_GROUP)
    device = actions.do_approve_device(device, owner)
    assert device.status == DeviceStatus.APPROVED
    assert device.label == "alices-phone"
    address = IPv6Address(device.overlay_address)
    assert address in box.prefix
    assert address == addressing.device_address(box.key, key(1), taken=set())
    assert addressing.role_of(address) == addressing.Role.DEVICE
    [message] = tunnel.messages()
    assert message == {
        "type": "device.changed",
        "public_key": base64.b64encode(key(1)).decode(),
        "status": "approved",
        "address": device.overlay_address,
    }
    event = AuditEvent.objects.get(action="device.approved")
    assert event.actor == owner
    assert event.before["status"] == "pending" and event.after["status"] == "approved"


def test_labels_are_unique_across_devices(box, owner):
    first = actions.do_approve_device(pending_device(box, owner, 1), owner)
    second = actions.do_approve_device(pending_device(box, owner, 2), owner)
    assert (first.label, second.label) == ("alices-phone", "alices-phone-2")
    assert first.overlay_address != second.overlay_address


def test_decisions_only_apply_to_the_right_state(box, owner):
    device = pending_device(box, owner)
    with pytest.raises(actions.DecisionError):
        actions.do_revoke_device(device, owner)
    actions.do_reject_device(device, owner, "not mine")
    device.refresh_from_db()
    assert device.status == DeviceStatus.REJECTED and device.decision_note == "not mine"
    with pytest.raises(actions.DecisionError, match="rejected"):
        actions.do_approve_device(device, owner)


def test_rejected_device_may_ask_again_with_a_new_code(box, owner):
    device = pending_device(box, owner)
    actions.do_reject_device(device, owner)
    outcome = actions.do_request_pairing(new_code(box, owner), key(1), PHONE, "198.51.100.7")
    assert outcome.accepted and outcome.device.pk == device.pk
    assert outcome.device.status == DeviceStatus.PENDING


def test_approved_device_cannot_pair_again(box, owner):
    actions.do_approve_device(pending_device(box, owner), owner)
    outcome = actions.do_request_pairing(new_code(box, owner), key(1), PHONE, "198.51.100.7")
    assert outcome.refusal == Refusal.ALREADY_APPROVED


def test_revoke_keeps_address_and_reapproval_reuses_it(box, owner):
    device = actions.do_approve_device(pending_device(box, owner), owner)
    address = device.overlay_address
    tunnel = Listener(TRANSPORTD_GROUP)
    actions.do_revoke_device(device, owner, "lost")
    [message] = tunnel.messages()
    assert message["status"] == "revoked"
    actions.do_request_pairing(new_code(box, owner), key(1), PHONE, "198.51.100.7")
    device = actions.do_approve_device(Device.objects.get(pk=device.pk), owner)
    assert device.overlay_address == address


def test_rename_changes_label(box, owner):
    device = actions.do_approve_device(pending_device(box, owner), owner)
    device = actions.do_rename_device(device, owner, "Work Laptop")
    assert (device.name, device.label) == ("Work Laptop", "work-laptop")
    with pytest.raises(actions.DecisionError):
        actions.do_rename_device(device, owner, "   ")


def test_approval_expiry(box, owner):
    with pytest.raises(actions.DecisionError):
        actions.do_approve_device(
            pending_device(box, owner), owner, timezone.now() - timedelta(seconds=1)
        )
    device = actions.do_approve_device(
        Device.objects.get(), owner, timezone.now() + timedelta(hours=1)
    )
    assert actions.do_expire_approvals(timezone.now()) == 0
    assert actions.do_expire_approvals(timezone.now() + timedelta(hours=2)) == 1
    device.refresh_from_db()
    assert device.status == DeviceStatus.EXPIRED
    assert AuditEvent.objects.filter(action="device.expired", actor=None).exists()


def test_report_path_changes_timeline_and_pushes(box, owner):
    device = actions.do_approve_device(pending_device(box, owner), owner)
    consoles = Listener(CONSOLE_GROUP)
    now = timezone.now()
    actions.do_report_path(
        device.key,
        PathReport(
            PathKind.RELAY, relay="home", rtt_ms=40.0, last_handshake=now, cause="new session"
        ),
    )
    actions.do_report_path(
        device.key,
        PathReport(
            PathKind.DIRECT_V4,
            endpoint="198.51.100.7:41641",
            rtt_ms=8.5,
            rx_bytes=10,
            tx_bytes=20,
            last_handshake=now,
            cause="punched",
        ),
    )
    # Counters only: no new timeline entry.
    actions.do_report_path(
        device.key,
        PathReport(PathKind.DIRECT_V4, endpoint="198.51.100.7:41641", rtt_ms=9.0, rx_bytes=99),
    )
    device.refresh_from_db()
    assert device.path == PathKind.DIRECT_V4 and device.rx_bytes == 99 and device.rtt_ms == 9.0
    assert device.connected_since is not None
    assert list(PathEvent.objects.order_by("at").values_list("path", "cause")) == [
        ("relay", "new session"),
        ("direct-v4", "punched"),
    ]
    html = [m["html"] for m in consoles.messages()]
    assert len(html) == 3
    assert f'id="device-{device.pk}"' in html[-1]
    assert "dot-blue" in html[-1] and "198.51.100.7:41641" in html[-1]
    assert "dot-yellow" in html[0] and "relay home" in html[0]


def test_report_path_ignores_unknown_and_unapproved(box, owner):
    device = pending_device(box, owner)
    assert actions.do_report_path(device.key, PathReport(PathKind.RELAY)) is None
    assert actions.do_report_path(key(99), PathReport(PathKind.RELAY)) is None
    assert not PathEvent.objects.exists()


def test_stale_devices_go_offline(box, owner, settings):
    device = actions.do_approve_device(pending_device(box, owner), owner)
    old = timezone.now() - timedelta(seconds=settings.LAZYCAT_OFFLINE_AFTER + 5)
    actions.do_report_path(device.key, PathReport(PathKind.RELAY, relay="home", last_handshake=old))
    assert actions.do_mark_stale_devices_offline() == 1
    device.refresh_from_db()
    assert device.path == PathKind.OFFLINE and device.connected_since is None
    assert "no handshake" in device.path_cause
    assert actions.do_mark_stale_devices_offline() == 0


def test_expire_pairing_codes_drops_old_rows(box, owner):
    new_code(box, owner)
    PairingCode.objects.update(expires_at=timezone.now() - timedelta(days=2))
    new_code(box, owner)
    assert actions.do_expire_pairing_codes() == 1
    assert PairingCode.objects.count() == 1


def test_pairing_code_carries_the_box_lan_address(box, owner, settings):
    settings.LAZYCAT_TUNNEL_LISTEN = ("192.0.2.20", 7483)  # bound to one address: that one
    _, bundle = actions.do_create_pairing_code(box, owner)
    assert bundle.lan == (("192.0.2.20", 7483),)
    settings.LAZYCAT_TUNNEL_LISTEN = ("127.0.0.1", 7483)  # loopback: no other device can use it
    assert actions.box_lan_addresses() == ()
    settings.LAZYCAT_TUNNEL_LISTEN = ("::", 7483)  # every interface: the route to the internet
    found = actions.box_lan_addresses()
    assert all(port == 7483 and not host.startswith("127.") for host, port in found)
