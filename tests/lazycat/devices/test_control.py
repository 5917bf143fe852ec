"""The device control socket and the negotiation behind it: who gets in (the tunnel decides),
what a hello starts (a simultaneous start sent to transportd and to the device), retries.

The ASGI application is lazycat.asgi's, so the port dispatch and the origin check are the real
ones; Celery runs its tasks in this process (``task_always_eager``) on the real channel layer."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings

from lazycat.asgi import application
from lazycat.celery import app as celery_app
from lazycat.core import keys
from lazycat.core.live import TRANSPORTD_GROUP
from lazycat.devices import actions, negotiation
from lazycat.devices.actions import DeviceFacts
from lazycat.devices.control import CLOSE_NOT_A_DEVICE, CLOSE_REVOKED
from lazycat.devices.models import Device, PathKind
from tests.layer import Listener
from transport import addressing, wire
from transport import negotiation as neg
from transport.paths import Candidate, CandidateKind, Direct, ViaRelay
from transport.tickets import verify_ticket

pytestmark = pytest.mark.django_db(transaction=True)

C = CandidateKind
PHONE = DeviceFacts(name="Phone", os="Android", model="Pixel", client_version="0.1.0")
BOX_CANDIDATES = [
    Candidate(C.EGRESS, Direct("192.168.1.10", 7483)),
    Candidate(C.REFLEXIVE, Direct("203.0.113.7", 7483)),
    Candidate(C.RELAY, ViaRelay("home")),
]
DEVICE_CANDIDATES = [
    Candidate(C.EGRESS, Direct("10.0.0.5", 51000)),
    Candidate(C.REFLEXIVE, Direct("198.51.100.9", 61000)),
    Candidate(C.RELAY, ViaRelay("home")),
]


@pytest.fixture
def eager() -> Iterator[None]:
    celery_app.conf.task_always_eager = True
    try:
        yield
    finally:
        celery_app.conf.task_always_eager = False


def approved(box, owner, n: int = 1) -> Device:
    _, bundle = actions.do_create_pairing_code(box, owner)
    outcome = actions.do_request_pairing(bundle.secret, bytes([n]) * 32, PHONE, "192.0.2.1")
    assert outcome.device is not None
    return actions.do_approve_device(outcome.device, owner)


def box_overlay(box) -> str:
    return str(addressing.box_address(addressing.box_prefix(box.key)))


def socket_for(box, client: str, *, server: str | None = None, headers=()) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(application, "/control/", headers=list(headers))
    comm.scope["server"] = [server or box_overlay(box), settings.LAZYCAT_CONTROL_PORT]
    comm.scope["client"] = [client, 40000]
    return comm


async def refused(comm: WebsocketCommunicator) -> int | None:
    connected, code = await comm.connect(timeout=10)
    assert not connected
    await comm.disconnect()
    return code


async def test_an_approved_device_through_the_tunnel_gets_in(box, owner):
    device = await sync_to_async(approved)(box, owner)
    comm = socket_for(box, device.overlay_address)
    connected, _ = await comm.connect(timeout=10)
    assert connected
    await comm.disconnect()


async def test_a_connection_not_at_the_box_overlay_address_is_refused(box, owner):
    device = await sync_to_async(approved)(box, owner)
    # the device's own address as source, but arriving at the box's LAN address: not the tunnel
    assert await refused(socket_for(box, device.overlay_address, server="192.168.1.10")) == (
        CLOSE_NOT_A_DEVICE
    )


async def test_unknown_pending_and_revoked_sources_are_refused(box, owner):
    device = await sync_to_async(approved)(box, owner)
    other = str(addressing.box_prefix(box.key)[0x1234])
    assert await refused(socket_for(box, other)) == CLOSE_NOT_A_DEVICE
    assert await refused(socket_for(box, "192.0.2.9")) == CLOSE_NOT_A_DEVICE
    await sync_to_async(actions.do_revoke_device)(device, owner)
    assert await refused(socket_for(box, device.overlay_address)) == CLOSE_NOT_A_DEVICE


async def test_a_browser_cannot_speak_for_the_device(box, owner):
    """A web page on the device would arrive from the device's address, but with an Origin."""
    device = await sync_to_async(approved)(box, owner)
    comm = socket_for(box, device.overlay_address, headers=[(b"origin", b"http://evil.example")])
    assert await refused(comm) == 4403


async def test_the_console_is_not_served_on_the_control_port(box, owner):
    from channels.testing import HttpCommunicator

    comm = HttpCommunicator(application, "GET", "/")
    comm.scope["server"] = [box_overlay(box), settings.LAZYCAT_CONTROL_PORT]
    response = await comm.get_response(timeout=10)
    assert response["status"] == 404
    assert b"control port" in response["body"]


async def test_hello_starts_both_sides_at_once(box, owner, eager):
    device = await sync_to_async(approved)(box, owner)
    await sync_to_async(negotiation.publish_box_candidates)(BOX_CANDIDATES)
    transportd = await sync_to_async(Listener)(TRANSPORTD_GROUP)
    comm = socket_for(box, device.overlay_address)
    assert (await comm.connect(timeout=10))[0]
    hello = neg.hello(DEVICE_CANDIDATES, network_changed=False, version="0.1.0")
    await comm.send_to(text_data=json.dumps(hello))

    punch = neg.parse_box_message(json.loads(await comm.receive_from(timeout=10)))
    assert isinstance(punch, neg.Punch)
    assert list(punch.candidates) == BOX_CANDIDATES
    assert punch.relay == "home" and punch.attempt == 1
    assert punch.delay == pytest.approx(neg.START_BASE)

    sent = [m for m in await sync_to_async(transportd.messages)(5) if m["type"] == "punch.start"]
    assert len(sent) == 1
    assert base64.b64decode(sent[0]["public_key"]) == device.key
    assert neg.candidates_from_json(sent[0]["candidates"]) == DEVICE_CANDIDATES
    assert sent[0]["delay"] > punch.delay  # the box waits for the message's travel
    await comm.disconnect()


async def test_bad_messages_get_an_error_and_change_nothing(box, owner, eager):
    device = await sync_to_async(approved)(box, owner)
    comm = socket_for(box, device.overlay_address)
    assert (await comm.connect(timeout=10))[0]
    for bad in ("not json", json.dumps({"type": "hello", "candidates": "x"}), "x" * 20000):
        await comm.send_to(text_data=bad)
        answer = json.loads(await comm.receive_from(timeout=10))
        assert answer["type"] == "error" and answer["error"]
    state = await sync_to_async(negotiation.cache.get)(f"negotiation:device:{device.pk}")
    assert state is None
    await comm.disconnect()


async def test_netcheck_report_is_recorded(box, owner):
    device = await sync_to_async(approved)(box, owner)
    comm = socket_for(box, device.overlay_address)
    assert (await comm.connect(timeout=10))[0]
    report = {"udp": True, "nat_type": "NAT4", "relays": [{"name": "home", "rtt_ms": 12.5}]}
    await comm.send_to(text_data=json.dumps({"type": "netcheck", "report": report}))
    await comm.disconnect()
    fresh = await sync_to_async(Device.objects.get)(pk=device.pk)
    assert fresh.netcheck == report and fresh.nat_type == "NAT4"


async def test_revoking_closes_the_control_socket(box, owner):
    device = await sync_to_async(approved)(box, owner)
    comm = socket_for(box, device.overlay_address)
    assert (await comm.connect(timeout=10))[0]
    await sync_to_async(actions.do_revoke_device)(device, owner)
    closed = await comm.receive_output(timeout=10)
    assert closed == {"type": "websocket.close", "code": CLOSE_REVOKED}


def test_retries_back_off_until_direct(box, owner):
    device = approved(box, owner)
    negotiation.publish_box_candidates(BOX_CANDIDATES)
    generation = negotiation.do_record_candidates(
        device, neg.Hello(tuple(DEVICE_CANDIDATES), False, "")
    )
    # no path yet (offline): nothing to retry
    assert negotiation.do_check_negotiation(device.pk, generation) is None
    Device.objects.filter(pk=device.pk).update(path=PathKind.RELAY)
    delays = []
    for _ in range(3):
        started = negotiation.do_negotiate(device.pk, generation)
        assert started is not None
        delays.append(negotiation.do_check_negotiation(device.pk, generation))
    assert delays == [5.0, 10.0, 20.0]
    # a newer hello supersedes the old generation's tasks
    newer = negotiation.do_record_candidates(device, neg.Hello(tuple(DEVICE_CANDIDATES), True, ""))
    assert negotiation.do_negotiate(device.pk, generation) is None
    assert negotiation.do_check_negotiation(device.pk, generation) is None
    assert negotiation.do_negotiate(device.pk, newer).attempt == 1
    # direct: done, and the next failure starts from the first delay again
    Device.objects.filter(pk=device.pk).update(path=PathKind.DIRECT_V4)
    assert negotiation.do_check_negotiation(device.pk, newer) is None


def test_a_direct_device_saying_nothing_new_is_left_alone(box, owner):
    device = approved(box, owner)
    hello = neg.Hello(tuple(DEVICE_CANDIDATES), False, "")
    assert negotiation.do_record_candidates(device, hello) == 1
    Device.objects.filter(pk=device.pk).update(path=PathKind.DIRECT_V4)
    device.refresh_from_db()
    assert negotiation.do_record_candidates(device, hello) is None  # its socket reopened
    moved = neg.Hello(tuple(DEVICE_CANDIDATES), True, "")
    assert negotiation.do_record_candidates(device, moved) == 2  # a network change: again
    fewer = neg.Hello(tuple(DEVICE_CANDIDATES[:1]), False, "")
    assert negotiation.do_record_candidates(device, fewer) == 3  # new candidates: again


def test_without_box_candidates_nothing_is_started(box, owner):
    device = approved(box, owner)
    generation = negotiation.do_record_candidates(
        device, neg.Hello(tuple(DEVICE_CANDIDATES), False, "")
    )
    assert negotiation.do_negotiate(device.pk, generation) is None


def test_config_names_the_box_and_devices_and_carries_a_ticket_for_this_device(box, owner):
    device = approved(box, owner)
    config = neg.parse_box_message(actions.device_config(device))
    assert isinstance(config, neg.Config)
    assert config.records[f"{box.name}.heiyu.space"] == [box_overlay(box)]
    assert config.records[f"{device.label}.{box.name}.heiyu.space"] == [device.overlay_address]
    assert config.control_port == settings.LAZYCAT_CONTROL_PORT
    ticket = wire.Ticket.decode(config.ticket)
    assert ticket.client == wire.peer_id(device.key)  # this device's, not a pairing ticket
    assert ticket.expires > time.time() + 29 * 86400
    public = keys.load_or_create_ticket_key(settings.LAZYCAT_TICKET_KEY_FILE).public_bytes()
    assert verify_ticket(ticket, public, time.time()) is None


def test_config_names_only_the_services_this_device_may_reach(box, owner):
    from lazycat.services.actions import do_save_service
    from lazycat.services.forms import ServiceForm

    phone, laptop = approved(box, owner, 1), approved(box, owner, 2)

    def save(name: str, *, allowed: list[Device] | None) -> None:
        data = {"kind": "dev-app", "name": name, "target": "192.168.1.20", "ports": "tcp 80"}
        if allowed is not None:
            data["access_all"] = ""  # unchecked
            data["allowed_devices"] = [d.pk for d in allowed]
        else:
            data["access_all"] = "on"
        form = ServiceForm(data=data)
        assert form.is_valid(), form.errors
        do_save_service(form, owner)

    save("photos", allowed=None)
    save("devvm", allowed=[laptop])

    def names(device: Device) -> set[str]:
        config = neg.parse_box_message(actions.device_config(device))
        assert isinstance(config, neg.Config)
        return set(config.records)

    assert f"photos.{box.name}.heiyu.space" in names(phone)
    assert f"devvm.{box.name}.heiyu.space" not in names(phone)  # not even its name
    assert f"devvm.{box.name}.heiyu.space" in names(laptop)
