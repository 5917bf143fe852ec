"""The whole console, for real: `lazycat up` (Daphne, Celery worker and beat, embedded Redis)
driven by headless Chromium. Set up the box, make a pairing code, have a device ask to pair
from a second process, watch it arrive live, approve it, then watch its path change live."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.stack import ROOT, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

DEVICE = Path(__file__).with_name("device_process.py")
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def stack():
    with Stack() as running:
        yield running


@pytest.fixture
def page():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make install` (it installs Debian's chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            yield context.new_page()
        finally:
            browser.close()


def live(page: Page) -> None:
    """Wait until the page's browser socket is open (htmx's ws extension connected)."""
    page.wait_for_function("() => window.__lazycatLive === true", timeout=10_000)


def test_pair_approve_and_watch_path_change_live(stack: Stack, page: Page) -> None:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    # First visit: the setup page.
    page.goto(stack.url + "/")
    expect(page).to_have_url(re.compile(r"/setup/$"))
    page.fill("#id_box_name", "Home-Box")
    page.fill("#id_username", "owner")
    page.fill("#id_password", "a long owner passphrase")
    page.fill("#id_password_again", "a long owner passphrase")
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("home-box.heiyu.space")

    # Add device: the QR and the same bundle as text, with a running countdown.
    page.click("text=Add device")
    page.click("text=Show a pairing code")
    expect(page.locator(".qr svg")).to_be_visible()
    code_text = page.locator("#bundle-text").inner_text()
    bundle = re.search(r"'(lazycat://\S+)'", code_text)
    assert bundle is not None, code_text
    countdown = page.locator("#countdown")
    expect(countdown).to_have_text(re.compile(r"^(9|10):\d\d$"))

    # The device list, open and live, before the device asks.
    page.goto(stack.url + "/devices/")
    live(page)
    page.evaluate("window.__notReloaded = true")

    # A device asks to pair from a second process; it appears without a reload. The page
    # notes when the request arrived; the device process says when it committed.
    page.evaluate(
        """() => new MutationObserver(() => {
            if (document.querySelector('#approval-inbox article.request'))
                window.__requestShownAt ??= Date.now() / 1000;
        }).observe(document.querySelector('main'), {childList: true, subtree: true})"""
    )
    output = stack.run_python(DEVICE, "pair", bundle.group(1), "Test Laptop")
    public_hex, committed_at = output.splitlines()[-1].split()
    request = page.locator("#approval-inbox article.request")
    expect(request).to_contain_text("Test Laptop", timeout=5_000)
    shown_after = page.evaluate("window.__requestShownAt") - float(committed_at)
    expect(request).to_contain_text("198.51.100.20")
    expect(request).to_contain_text("used a pairing code")

    # Approve: the inbox empties and the device gets its row.
    request.locator("button.approve").click()
    expect(page.locator("#approval-inbox article.request")).to_have_count(0)
    row = page.locator("tr.device-row", has_text="Test Laptop")
    expect(row).to_be_visible()
    expect(row.locator(".dot")).to_have_class(re.compile(r"dot-grey"))

    # The tunnel reports relay → direct → offline; the dot and the path detail follow live.
    stack.run_python(DEVICE, "path", public_hex, "relay")
    expect(row.locator(".dot")).to_have_class(re.compile(r"dot-yellow"))
    expect(row.locator("td.path")).to_have_text("relay home")
    expect(row.locator("td.rtt")).to_have_text("42.0 ms")

    stack.run_python(DEVICE, "path", public_hex, "direct")
    expect(row.locator(".dot")).to_have_class(re.compile(r"dot-blue"))
    expect(row.locator("td.path")).to_have_text("direct-v4")
    expect(row.locator("td.endpoint")).to_have_text("198.51.100.20:41641")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "console-devices-direct.png"), full_page=True)

    stack.run_python(DEVICE, "path", public_hex, "offline")
    expect(row.locator(".dot")).to_have_class(re.compile(r"dot-grey"))
    expect(row.locator("td.path")).to_have_text("offline")

    # Nothing above reloaded the page: the marker set before the device asked is still there.
    assert page.evaluate("window.__notReloaded") is True
    assert 0 < shown_after < 1.0, f"the pending device took {shown_after:.3f} s to appear"

    # The device page has the timeline with causes.
    row.locator("a").click()
    timeline = page.locator(".timeline")
    expect(timeline).to_contain_text("punched")
    expect(timeline).to_contain_text("session started")
    page.screenshot(path=str(ARTIFACTS / "console-device-page.png"), full_page=True)
    assert not [e for e in errors if "Content Security Policy" in e or "Refused" in e], errors

    # No secret in any log line of any process: not the pairing secret, not the box's key.
    secret = re.search(r"[?&]secret=([\w-]+)", bundle.group(1))
    assert secret is not None
    private = (stack.data_dir / "box.key").read_bytes()
    logs = "\n".join(stack.log)
    for needle in (secret.group(1), private.hex(), base64.b64encode(private).decode()):
        assert needle not in logs
    assert "device approved" in logs  # the log is really there, with the owner's decision
