"""A device's own netcheck, and "why is this device relayed?" on its page and in its push."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.urls import reverse
from django.utils import timezone

from lazycat.core import actions as core_actions
from lazycat.core.live import CONSOLE_GROUP
from lazycat.devices import actions
from lazycat.devices.actions import NetcheckRejected, PathReport
from lazycat.devices.models import Device, DeviceStatus, PathKind
from tests.lazycat.core.test_netcheck import canned_report
from transport.netcheck import NatType

pytestmark = pytest.mark.django_db(transaction=True)

FORWARD_FIX = (
    "Enable UPnP or NAT-PMP on the box&#x27;s router, or forward UDP port 7483 to the box."
)


def device_report(nat: str, *, udp: bool = True) -> dict:
    """A device's NetcheckReport.to_json(), the parts that matter here."""
    return {
        "udp": udp,
        "nat_type": nat,
        "ipv4": {"tested": True, "reachable": udp, "open": False, "filtering": None},
        "ipv6": {"tested": False, "reachable": False},
        "relays": [],
    }


def approved_device(n: int = 1, path: PathKind = PathKind.RELAY) -> Device:
    device = Device.objects.create(
        name=f"Phone {n}",
        label=f"phone-{n}",
        public_key=bytes([n]) * 32,
        status=DeviceStatus.APPROVED,
        overlay_address=f"fd00::{n}",
    )
    actions.do_report_path(
        device.key, PathReport(path, relay="home", last_handshake=timezone.now(), cause="test")
    )
    device.refresh_from_db()
    return device


def box_netcheck(nat: NatType, port_mapping: str = "") -> None:
    core_actions.do_record_box_netcheck(canned_report(nat), port_mapping=port_mapping)


def page(client, device: Device) -> str:
    return client.get(reverse("devices:detail", args=[device.pk])).content.decode()


def test_record_device_netcheck_stores_report_and_type(box):
    device = approved_device()
    actions.do_record_device_netcheck(device, device_report("NAT3"))
    device.refresh_from_db()
    assert device.nat_type == "NAT3" and device.netcheck is not None
    assert device.netcheck["nat_type"] == "NAT3" and device.netcheck_at is not None
    actions.do_record_device_netcheck(device, device_report("blocked", udp=False))
    device.refresh_from_db()
    assert device.nat_type == "blocked"


def test_record_device_netcheck_refuses_junk(box):
    device = approved_device()
    with pytest.raises(NetcheckRejected):
        actions.do_record_device_netcheck(device, ["not", "an", "object"])  # type: ignore[arg-type]
    with pytest.raises(NetcheckRejected):
        actions.do_record_device_netcheck(device, {"notes": ["x" * 70_000]})
    device.refresh_from_db()
    assert device.netcheck is None and device.nat_type == ""


def test_relayed_device_page_explains_why_with_a_fix(owner_client, box):
    box_netcheck(NatType.NAT4)
    device = approved_device()
    actions.do_record_device_netcheck(device, device_report("NAT3"))
    html = page(owner_client, device)
    assert "Why is this device relayed?" in html
    assert "Your NAT is symmetric (NAT4) and the box has no port mapping" in html
    assert FORWARD_FIX in html


def test_unmeasured_sides_are_named(owner_client, box):
    device = approved_device()
    html = page(owner_client, device)
    assert "The box&#x27;s network has not been checked yet." in html
    assert "Check now" in html
    box_netcheck(NatType.NAT4)
    html = page(owner_client, device)
    assert "not measured yet" in html and "has not been checked" not in html


def test_blocked_device_is_told_about_tcp(owner_client, box):
    box_netcheck(NatType.NAT1)
    device = approved_device()
    actions.do_record_device_netcheck(device, device_report("blocked", udp=False))
    html = page(owner_client, device)
    assert "UDP is blocked on the device&#x27;s network." in html
    assert "The device uses the relay over TCP" in html


def test_no_reasons_when_direct_or_when_the_grid_predicts_direct(owner_client, box):
    box_netcheck(NatType.NAT4)
    direct = approved_device(1, PathKind.DIRECT_V4)
    actions.do_record_device_netcheck(direct, device_report("NAT3"))
    html = page(owner_client, direct)
    assert "Why is this device relayed?" not in html and "Fix:" not in html
    # Relayed although the box's mapping makes every device direct: no made-up reason.
    box_netcheck(NatType.NAT4, port_mapping="203.0.113.7:7483")
    relayed = approved_device(2)
    actions.do_record_device_netcheck(relayed, device_report("NAT4"))
    html = page(owner_client, relayed)
    assert "Why is this device relayed?" in html and "Fix:" not in html
    assert "predict a direct path" in html


def test_reasons_are_pushed_with_the_state_panel(box):
    box_netcheck(NatType.NAT3)
    device = approved_device()
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(CONSOLE_GROUP, channel)
    actions.do_record_device_netcheck(device, device_report("NAT4"))
    message = async_to_sync(layer.receive)(channel)
    html = message["html"]
    assert f'id="device-{device.pk}-state"' in html
    assert "The device is behind a symmetric NAT (NAT4)" in html and FORWARD_FIX in html


def test_a_new_box_netcheck_repushes_relayed_devices(box):
    relayed = approved_device(1)
    direct = approved_device(2, PathKind.DIRECT_V4)
    actions.do_record_device_netcheck(relayed, device_report("NAT3"))
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(CONSOLE_GROUP, channel)
    box_netcheck(NatType.NAT4)

    async def drain() -> list[str]:
        import asyncio

        got = []
        while True:
            try:
                got.append((await asyncio.wait_for(layer.receive(channel), 1.0))["html"])
            except TimeoutError:
                return got

    fragments = async_to_sync(drain)()
    assert any('id="box-netcheck"' in f for f in fragments)
    state = [f for f in fragments if f'id="device-{relayed.pk}-state"' in f]
    assert state and "Your NAT is symmetric (NAT4)" in state[0]
    assert not any(f'id="device-{direct.pk}-state"' in f for f in fragments)
