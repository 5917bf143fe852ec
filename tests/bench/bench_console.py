"""Console benchmark: push latency to 10 live browsers, and the device list at 2,000 devices.

Runs the real box (`lazycat up`: Daphne, Celery, embedded Redis) in a throwaway data
directory, fills it with 2,000 approved devices, connects 10 browser sockets (real WebSocket
clients with a signed-in session), then:

* push latency: for each of N path changes, the time from calling ``do_report_path`` (the write,
  its commit, rendering and publishing included) until the fragment has arrived at all 10
  sockets. Target p95 <= 100 ms.
* device list: GET /devices/ over HTTP with 2,000 devices; the server's own time is read from
  the ``Server-Timing`` header, the client's wall time beside it. Target server p95 <= 150 ms.

    .venv/bin/python tests/bench/bench_console.py [--changes 200] [--devices 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.machine import describe
from tests.stack import Stack


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(name: str, values: list[float]) -> str:
    return (
        f"{name}: n={len(values)} median={statistics.median(values):.1f} ms "
        f"p95={pct(values, 95):.1f} ms max={max(values):.1f} ms"
    )


def populate(n: int) -> tuple[object, list[bytes]]:
    """A set-up box with n approved devices, written in bulk (the benchmark is of reading and
    pushing, not of approving)."""
    from django.utils import timezone

    from lazycat.core.actions import do_setup_box
    from lazycat.devices.models import Device, DeviceStatus, PathKind
    from transport import addressing

    box = do_setup_box("bench", "owner", "a long owner passphrase")
    taken: set = set()
    devices, keys = [], []
    now = timezone.now()
    for i in range(n):
        key = (i + 1).to_bytes(32, "big")
        address = addressing.device_address(box.key, key, taken=taken)
        taken.add(address)
        keys.append(key)
        devices.append(
            Device(
                name=f"Device {i}",
                label=f"device-{i}",
                os="Linux",
                public_key=key,
                status=DeviceStatus.APPROVED,
                overlay_address=str(address),
                path=PathKind.RELAY if i % 3 else PathKind.DIRECT_V4,
                relay="home" if i % 3 else "",
                endpoint="" if i % 3 else f"198.51.100.{i % 250}:41641",
                rtt_ms=12.5,
                rx_bytes=i * 1000,
                tx_bytes=i * 2000,
                last_handshake=now,
                connected_since=now,
            )
        )
    Device.objects.bulk_create(devices, batch_size=500)
    return box, keys


def session_cookie() -> str:
    from django.conf import settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.auth.models import User
    from django.contrib.sessions.backends.db import SessionStore

    user = User.objects.get(username="owner")
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.save()
    return f"{settings.SESSION_COOKIE_NAME}={session.session_key}"


def bench_page(url: str, cookie: str, runs: int) -> tuple[list[float], list[float], int]:
    server, wall = [], []
    size = 0
    for _ in range(runs):
        request = urllib.request.Request(url, headers={"Cookie": cookie})  # noqa: S310 - loopback only
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback only
            body = response.read()
            timing = response.headers.get("Server-Timing", "")
        wall.append((time.perf_counter() - started) * 1000)
        match = re.search(r"dur=([\d.]+)", timing)
        assert match, f"no Server-Timing header: {timing!r}"
        server.append(float(match.group(1)))
        size = len(body)
    return server, wall, size


def render_all_rows(n: int, runs: int = 5) -> list[float]:
    """The row template over every device at once: what an unpaginated list would cost."""
    from django.template.loader import get_template

    from lazycat.devices.models import Device

    template = get_template("devices/_row.html")
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        for device in Device.objects.listed()[:n]:
            template.render({"device": device, "box_fqdn": "bench.heiyu.space"})
        times.append((time.perf_counter() - started) * 1000)
    return times


class Browsers:
    """N WebSocket clients on their own event loop; records when each sees a marker."""

    def __init__(self, ws_url: str, origin: str, cookie: str, count: int) -> None:
        self.ws_url, self.origin, self.cookie, self.count = ws_url, origin, cookie, count
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.marker = ""
        self.arrivals: dict[int, float] = {}
        self.all_arrived = threading.Event()
        self.lock = threading.Lock()
        self.stop = False
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.main(),))
        self.thread.daemon = True

    async def client(self, index: int, connected: list[int]) -> None:
        import websockets

        async with websockets.connect(
            self.ws_url,
            origin=self.origin,
            additional_headers={"Cookie": self.cookie},
            open_timeout=10,
            max_size=None,
        ) as ws:
            await asyncio.wait_for(ws.recv(), 10)  # the inbox sent on connect
            connected.append(index)
            if len(connected) == self.count:
                self.ready.set()
            while not self.stop:
                try:
                    message = await asyncio.wait_for(ws.recv(), 0.5)
                except TimeoutError:
                    continue
                now = time.perf_counter()
                with self.lock:
                    if self.marker and self.marker in message and index not in self.arrivals:
                        self.arrivals[index] = now
                        if len(self.arrivals) == self.count:
                            self.all_arrived.set()

    async def main(self) -> None:
        connected: list[int] = []
        await asyncio.gather(*(self.client(i, connected) for i in range(self.count)))

    def expect(self, marker: str) -> None:
        with self.lock:
            self.marker = marker
            self.arrivals = {}
            self.all_arrived.clear()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--browsers", type=int, default=10)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--list-runs", type=int, default=30)
    args = parser.parse_args()

    print(f"machine: {describe()}")
    with Stack() as stack:
        stack.django()
        from lazycat.devices.actions import PathReport, do_report_path
        from lazycat.devices.models import Device, PathKind

        started = time.perf_counter()
        _, keys = populate(args.devices)
        print(f"populated {args.devices} devices in {time.perf_counter() - started:.1f} s")
        cookie = session_cookie()

        print(f"device list with {args.devices} devices (100 a page), GET over HTTP:")
        for label, path in [
            ("page 1", "/devices/"),
            ("page 20 (last)", "/devices/?page=20"),
            ("search 'device-19'", "/devices/?q=device-19"),
            ("filter relayed", "/devices/?path=relay"),
        ]:
            server, wall, size = bench_page(stack.url + path, cookie, args.list_runs)
            print(f"  {label}, {size / 1024:.0f} KiB:")
            print("    " + summary("server time", server) + "   (target p95 <= 150 ms)")
            print("    " + summary("client wall time", wall))
        print("  for scale, one page of all rows (why the list is paginated):")
        print("    " + summary("render of all rows, in process", render_all_rows(args.devices)))

        ws_url = stack.url.replace("http://", "ws://") + "/ws/console/"
        browsers = Browsers(ws_url, stack.url, cookie, args.browsers)
        browsers.thread.start()
        if not browsers.ready.wait(30):
            raise SystemExit("the browser sockets did not all connect within 30 s")

        pks = dict(Device.objects.values_list("public_key", "pk"))
        latencies: list[float] = []
        lost = 0
        deadline = time.monotonic() + 300  # bounded in count and in time
        for i in range(args.changes):
            if time.monotonic() > deadline:
                break
            key = keys[(i * 7919) % len(keys)]
            marker = f'id="device-{pks[key]}"'
            browsers.expect(marker)
            path = PathKind.DIRECT_V6 if i % 2 else PathKind.RELAY
            t0 = time.perf_counter()
            do_report_path(
                key,
                PathReport(
                    path,
                    relay="home" if path == PathKind.RELAY else "",
                    endpoint="" if path == PathKind.RELAY else f"[2001:db8::{i:x}]:41641",
                    rtt_ms=10.0,
                    cause="bench",
                ),
            )
            if browsers.all_arrived.wait(5):
                latencies.append((max(browsers.arrivals.values()) - t0) * 1000)
            else:
                lost += 1
            time.sleep(0.02)
        browsers.stop = True
        browsers.thread.join(5)
        print(
            f"push latency, {args.devices} devices, {args.browsers} browsers "
            f"(write + commit + render + publish + delivery to all):"
        )
        print("  " + summary("to every browser", latencies) + "   (target p95 <= 100 ms)")
        if lost:
            print(f"  {lost} changes did not reach every browser within 5 s")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
