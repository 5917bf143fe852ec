"""The console, live, over a real tunnel in the NAT lab: the owner signs in with headless
Chromium, watches a device behind its own NAT ask to pair, approves it with a click, and sees
its dot go yellow (relay) then blue (punched) — and yellow again when the direct path is cut at
the device's router — without reloading the page.

Chromium runs inside the box's namespace (a wrapper ``ip netns exec`` script is Playwright's
``executable_path``): the console listens on the box's 127.0.0.1, as on a real box.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.browser import CHROMIUM, CHROMIUM_ARGS, chromium_in_namespace
from tests.natlab.lab import RELAY_IPS, Lab, lab_or_skip
from tests.natlab.labbox import OWNER, PASSWORD, LabBox, LabClient

pytestmark = [pytest.mark.natlab, pytest.mark.e2e, pytest.mark.timeout(180)]

RELAY_PORT = 3480


@pytest.fixture
def workdir() -> Iterator[Path]:
    lab_or_skip(tun=True, tools=[(CHROMIUM, "chromium")])
    root = Path(tempfile.mkdtemp(prefix="lzc-console-lab-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def dot(page: Page, name: str):  # type: ignore[no-untyped-def]
    return page.locator("tr.device-row", has_text=name).locator(".dot")


def test_a_lab_device_goes_yellow_then_blue_then_yellow_live(workdir: Path) -> None:
    with Lab() as lab:
        relay_log = (workdir / "relay.log").open("w")
        lab.relay.python_popen(
            ["-m", "transport.relay_cli", "--udp", f"{RELAY_IPS[0]}:{RELAY_PORT}"],
            stdout=relay_log,
            stderr=relay_log,
        )
        box_site = lab.add_site("box", "NAT3")
        phone_site = lab.add_site("phone", "NAT3", ipv6=False)  # IPv4 NAT: punched direct-v4
        box = LabBox(lab, box_site.add_host("box"), workdir, f"home={RELAY_IPS[0]}:{RELAY_PORT}")
        phone_host = phone_site.add_host("phone")
        phone_host.ipv6_stack_on()
        phone = LabClient(phone_host, workdir / "phone")
        box.start()
        try:
            box.setup_box("labbox")
            code = box.pairing_code()
            with sync_playwright() as pw:
                browser = pw.chromium.launch(
                    executable_path=chromium_in_namespace(box.host.ns, workdir),
                    args=CHROMIUM_ARGS,
                    headless=True,
                )
                try:
                    page = browser.new_context().new_page()
                    run(page, box, phone, code, lab, box_site.public_ip, phone_site)
                finally:
                    browser.close()
        finally:
            box.stop()
            relay_log.close()


def run(page: Page, box: LabBox, phone: LabClient, code: str, lab, box_ip, phone_site) -> None:  # type: ignore[no-untyped-def]
    page.goto(box.url.rstrip("/") + "/devices/")
    page.fill("input[name=username]", OWNER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/devices/$"))
    page.wait_for_function("() => window.__lazycatLive === true", timeout=10_000)
    page.evaluate("window.__notReloaded = true")

    # The device asks through the relay; the owner approves it in this page.
    phone.start_pair(code, timeout=60)
    request = page.locator("#approval-inbox article.request")
    expect(request).to_be_visible(timeout=20_000)
    request.locator("button.approve").click()
    phone.wait_paired(30)
    name = page.locator("tr.device-row").first.locator("a").inner_text()

    # Up: the relay first (yellow), then the negotiation punches through (blue).
    began = time.monotonic()
    phone.up()
    expect(dot(page, name)).to_have_class(re.compile(r"dot-(yellow|blue)"), timeout=15_000)
    expect(dot(page, name)).to_have_class(re.compile(r"dot-blue"), timeout=20_000)
    blue_after = time.monotonic() - began
    timeline = box.device()["events"]
    assert [e["path"] for e in timeline][:2] == ["relay", "direct-v4"], timeline

    # Cut the direct path at the device's router (the relay stays reachable): yellow again.
    lab.block(phone_site.router, box_ip)
    cut = time.monotonic()
    expect(dot(page, name)).to_have_class(re.compile(r"dot-yellow"), timeout=15_000)
    yellow_after = time.monotonic() - cut
    row = page.locator("tr.device-row", has_text=name)
    expect(row.locator("td.path")).to_contain_text("relay")

    assert page.evaluate("window.__notReloaded") is True  # all of it pushed, no reload
    print(f"blue {blue_after:.1f} s after up; yellow {yellow_after:.1f} s after the cut")
    print(phone.tail("up", n=1500))
