"""Services, live, for real: `lazycat up` (Daphne, Celery worker, embedded Redis) driven by
headless Chromium. Expose a service that targets listeners on loopback; an open console page
shows its row "checking…" and then "reachable" without a reload; "Check again" does the same;
then the tunnel daemon's usage report shows which device uses it."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

HELPER = Path(__file__).with_name("services_process.py")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack() as running:
        yield running


@pytest.fixture
def browser_pages() -> Iterator[tuple[Page, Page]]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make install` (it installs Debian's chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            yield context.new_page(), context.new_page()
        finally:
            browser.close()


@pytest.fixture
def target() -> Iterator[tuple[int, int]]:
    """The service's target on loopback: a TCP listener and a UDP socket that never answers
    (so each check lasts its 2 s UDP timeout, long enough to see "checking…")."""
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(16)
        udp.bind(("127.0.0.1", 0))
        yield tcp.getsockname()[1], udp.getsockname()[1]


def live(page: Page) -> None:
    page.wait_for_function("() => window.__lazycatLive === true", timeout=10_000)


def test_service_row_turns_reachable_and_shows_usage_live(stack, browser_pages, target):
    watcher, editor = browser_pages
    tcp_port, udp_port = target
    errors: list[str] = []
    watcher.on("pageerror", lambda e: errors.append(str(e)))

    editor.goto(stack.url + "/")
    editor.fill("#id_box_name", "Home-Box")
    editor.fill("#id_username", "owner")
    editor.fill("#id_password", "a long owner passphrase")
    editor.fill("#id_password_again", "a long owner passphrase")
    editor.click("button[type=submit]")
    expect(editor.locator("h1")).to_have_text("home-box.heiyu.space")

    # An open, live services page in one tab; the owner exposes a service from another.
    watcher.goto(stack.url + "/services/")
    live(watcher)
    watcher.evaluate("window.__notReloaded = true")
    started = time.monotonic()
    editor.goto(stack.url + "/services/add/")
    editor.select_option("#id_kind", "dev-app")
    editor.fill("#id_name", "web")
    editor.fill("#id_target", "127.0.0.1")
    editor.fill("#id_ports", f"tcp {tcp_port}; udp {udp_port}")
    editor.click("button[type=submit]")
    expect(editor.locator("ul.messages")).to_contain_text("web.home-box.heiyu.space is saved.")

    row = watcher.locator("tr.service-row", has_text="web.home-box.heiyu.space")
    verdict = row.locator("td.reachability")
    expect(verdict).to_contain_text("checking…", timeout=5_000)
    expect(verdict).to_contain_text(f"reachable (tcp {tcp_port} open)", timeout=10_000)
    expect(verdict).to_contain_text(f"udp {udp_port}: no answer — UDP cannot confirm")
    expect(row).to_have_class(re.compile(r"check-ok"))

    # "Check again" (htmx POST with the CSRF header): checking… then the verdict again.
    row.locator("button.check-again").click()
    expect(verdict).to_contain_text("checking…")
    expect(verdict).to_contain_text(f"reachable (tcp {tcp_port} open)", timeout=10_000)

    # The tunnel daemon reports a device using the service; the row says so, live.
    expect(row.locator("td.usage")).to_have_text("not in use")
    stack.run_python(HELPER, "device", "alice-laptop")
    stack.run_python(HELPER, "usage", "web", "alice-laptop")
    expect(row.locator("td.usage")).to_have_text("in use by: alice-laptop", timeout=5_000)
    stack.run_python(HELPER, "usage", "web")
    expect(row.locator("td.usage")).to_have_text("not in use", timeout=5_000)

    assert watcher.evaluate("window.__notReloaded") is True
    assert not errors, errors
    assert time.monotonic() - started < 20, "the live part took too long"
