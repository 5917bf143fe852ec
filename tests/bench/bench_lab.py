"""The tunnel's figures, measured in the NAT lab in one run with the real processes.

Everything is real: ``lazycat-relay``, the box (``lazycat up``: Daphne, Celery, Redis,
transportd) in a lab namespace behind its router, ``lazycat-client up --mode tun`` behind
another, iperf3 and Debian's wireguard-go for the throughput references, headless Chromium on
the console. Times come from the processes' own log lines (logfmt ``ts=`` to the millisecond,
one clock: the same machine), so polling adds nothing to them:

1. ``up`` -> first packet through the relay, and -> direct, NAT3 client x NAT3 box, ``--runs``
   times (the client's ``since_up`` on its ``path`` lines, counted from the start of ``up``,
   before it creates its TUN);
2. failover: a paced TCP stream inside the tunnel, the direct path dropped at the client's
   router, ``--cycles`` times: block -> the client's ``relay`` line; unblock -> ``direct-v4``;
   the stream's bytes' SHA-256 and its longest stall, and that it was one connection;
3. NAT4 client x NAT3 box with a port mapping (miniupnpd): ``up`` -> ``direct-portmapped``;
4. throughput, one iperf3 stream, each kind ``--repeats`` times interleaved, client behind
   NAT3 and the box with a public address: the plain lab path, wireguard-go between the same
   two hosts, our tunnel direct, our tunnel relayed (direct path dropped);
5. console push: the box's ``path changed`` log line -> the device's dot changing colour in
   Chromium (a MutationObserver's ``Date.now()``), over every colour change of parts 1-2;
6. services: an IPv4-only "VM" on the box's LAN exposed as ``devvm`` (all ports, carried by the
   box's forwarder), a NAT3 client on the direct path. TCP throughput client -> VM beside client
   -> the box itself, interleaved in one run; connection set-up to ``devvm.<box>.heiyu.space``
   by name (resolver, tunnel, forwarder, VM) in TUN mode and through proxy mode's CONNECT; the
   time from the owner's save (just before the action; its commit follows inside it) until
   access is granted (the device's first successful connect) or revoked (its open connection
   closed).

    .venv/bin/python tests/bench/bench_lab.py [--runs 20] [--cycles 5] [--repeats 3]
    .venv/bin/python tests/bench/bench_lab.py --only services

Needs root (namespaces), nftables, /dev/net/tun, iperf3, wireguard-go, chromium: ``make test``
installs them. Every process is started through the lab and killed by PID; every wait has a
deadline.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.machine import describe  # noqa: E402
from tests.browser import CHROMIUM_ARGS, chromium_in_namespace  # noqa: E402
from tests.natlab.lab import PYTHON, RELAY_IPS, SVCPROBE, Lab, check_available  # noqa: E402
from tests.natlab.labbox import OWNER, PASSWORD, LabBox, LabClient  # noqa: E402
from tests.natlab.throughput import WireguardGo, tcp_throughput  # noqa: E402
from transport.addressing import RESOLVER  # noqa: E402

RELAY_PORT = 3480
ECHO_PORT = 8090
LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')

# A paced stream: the sender writes `rate` bytes/s for `seconds`, then half-closes; the receiver
# prints its SHA-256, byte count and longest gap between reads. One connection, or it fails.
RECEIVER = """
import hashlib, json, socket, sys, time
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept()
conn.settimeout(60)
h, n, last, gap = hashlib.sha256(), 0, time.monotonic(), 0.0
while True:
    chunk = conn.recv(65536)
    if not chunk:
        break
    now = time.monotonic()
    gap, last = max(gap, now - last), now
    h.update(chunk)
    n += len(chunk)
conn.sendall(h.hexdigest().encode())
conn.close()
print(json.dumps({"sha256": h.hexdigest(), "bytes": n, "longest_gap": gap}), flush=True)
"""
SENDER = """
import hashlib, json, os, socket, sys, time
address, port, rate, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.create_connection((address, port), timeout=10)
s.settimeout(60)
h, n, start = hashlib.sha256(), 0, time.monotonic()
print("connected", flush=True)
while (elapsed := time.monotonic() - start) < seconds:
    if n > rate * elapsed:
        time.sleep(0.005)
        continue
    chunk = os.urandom(16384)
    s.sendall(chunk)
    h.update(chunk)
    n += len(chunk)
s.shutdown(socket.SHUT_WR)
answer = s.recv(64).decode()
print(json.dumps({"sha256": h.hexdigest(), "bytes": n, "echoed": answer}), flush=True)
"""


def fields(line: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in LOGFMT.findall(line)}


def wall(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def log_lines(path: Path, msg: str, start: int = 0) -> list[dict[str, str]]:
    """The logfmt lines of ``path`` with this ``msg``, from line ``start`` on."""
    lines = path.read_text(errors="replace").splitlines()[start:] if path.exists() else []
    return [f for f in map(fields, lines) if f.get("msg") == msg]


def line_count(path: Path) -> int:
    return len(path.read_text(errors="replace").splitlines()) if path.exists() else 0


def wait_for(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.02)
    raise SystemExit(f"bench: no {what} within {timeout} s")


def path_line(client: LabClient, kinds: tuple[str, ...], start: int = 0) -> dict[str, str] | None:
    return next((f for f in log_lines(client.log("up"), "path", start) if f["kind"] in kinds), None)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(name: str, values: list[float], unit: str = "s", target: str = "") -> str:
    p50, p95 = statistics.median(values), pct(values, 0.95)
    spread = f"min {min(values):.3f}, p50 {p50:.3f}, p95 {p95:.3f}, max {max(values):.3f} {unit}"
    return f"{name:<44} n={len(values):<3} {spread}" + (f"   target {target}" if target else "")


# --- the lab ------------------------------------------------------------------------------------


class Bench:
    def __init__(self, lab: Lab, work: Path) -> None:
        self.lab = lab
        self.work = work
        self.relay_ip = RELAY_IPS[0]
        self.relays = f"home={self.relay_ip}:{RELAY_PORT}"
        self.addresses: dict[str, IPv6Address] = {}  # each device's overlay address

    def relay(self) -> None:
        out = (self.work / "relay.log").open("w")
        self.lab.relay.python_popen(
            # The per-peer limits (2 MB/s and 2,000 packets/s by default: a public relay's
            # abuse protection) raised, so the relayed figure is the tunnel's, not the policy's.
            [
                "-m",
                "transport.relay_cli",
                "--udp",
                f"{self.relay_ip}:{RELAY_PORT}",
                "--peer-rate",
                "1000000000",
                "--peer-burst",
                "100000000",
                "--peer-pps",
                "1000000",
                "--peer-pps-burst",
                "100000",
            ],
            stdout=out,
            stderr=out,
        )

    def box(self, name: str, nat: str, **site: Any) -> tuple[LabBox, Any]:
        place = self.lab.add_site(name, nat, **site)
        box = LabBox(self.lab, place.add_host(name), self.work / name, self.relays)
        box.start()
        box.setup_box("labbox")
        return box, place

    def device(self, box: LabBox, name: str, nat: str) -> tuple[LabClient, Any]:
        """A device on an IPv4-only network behind ``nat`` (with IPv6 both sides would go
        direct-v6, which is not what the IPv4 figures are about)."""
        place = self.lab.add_site(name, nat, ipv6=False)
        host = place.add_host(name)
        host.ipv6_stack_on()
        client = LabClient(host, self.work / name)
        client.start_pair(box.pairing_code(), timeout=60)
        self.addresses[name] = box.approve_pending(30)
        client.wait_paired(30)
        return client, place


def box_overlay(box: LabBox) -> str:
    """The box's overlay address (from its key, as every device derives it)."""
    return box.django(
        "from lazycat.core.models import Box\nfrom transport import addressing\n"
        "b = Box.get()\nprint(addressing.box_address(addressing.box_prefix(b.key)))\n"
    ).split()[-1]


def part_up(bench: Bench, client: LabClient, runs: int, want: str) -> tuple[list[float], ...]:
    """``runs`` times: up, the first relay line and the first ``want`` line, down."""
    to_relay, to_direct = [], []
    for _ in range(runs):
        client.up()  # a new up.log each time
        try:
            direct = wait_for(f"{want} path", lambda: path_line(client, (want,), 0), 15)
        except SystemExit as exc:
            raise SystemExit(f"{exc}\n{client.tail('up', n=3000)}") from None
        relay = path_line(client, ("relay",), 0)
        assert relay is not None, "the relay came first in every run"
        to_relay.append(float(relay["since_up"]))
        to_direct.append(float(direct["since_up"]))
        client.stop_up()
        time.sleep(0.5)
    return to_relay, to_direct


def part_failover(
    bench: Bench, box: LabBox, client: LabClient, place: Any, box_ip: str, cycles: int
) -> dict[str, Any]:
    overlay = box_overlay(box)
    client.up()
    wait_for("direct path", lambda: path_line(client, ("direct-v4",)), 15)
    receiver_log = bench.work / "receiver.log"
    with receiver_log.open("w") as out:
        box.host.popen(
            [PYTHON, "-c", RECEIVER, overlay, str(ECHO_PORT)], stdout=out, stderr=out, cwd=ROOT
        )
    wait_for("receiver", lambda: "ready" in receiver_log.read_text(), 10)
    seconds = cycles * 9.0 + 2.0
    sender_log = bench.work / "sender.log"
    with sender_log.open("w") as out:
        sender = client.host.popen(
            [PYTHON, "-c", SENDER, overlay, str(ECHO_PORT), str(2_000_000), str(seconds)],
            stdout=out,
            stderr=out,
            cwd=ROOT,
        )
    wait_for("sender connected", lambda: "connected" in sender_log.read_text(), 10)
    time.sleep(1.0)
    failover, recovery = [], []
    for _ in range(cycles):
        mark = line_count(client.log("up"))
        blocked_at = time.time()
        bench.lab.block(place.router, box_ip)
        relay = wait_for("failover", lambda m=mark: path_line(client, ("relay",), m), 10)
        failover.append(wall(relay["ts"]) - blocked_at)
        time.sleep(2.0)
        mark = line_count(client.log("up"))
        unblocked_at = time.time()
        bench.lab.unblock(place.router, box_ip)
        direct = wait_for("recovery", lambda m=mark: path_line(client, ("direct-v4",), m), 20)
        recovery.append(wall(direct["ts"]) - unblocked_at)
        time.sleep(1.0)
    try:
        sender.wait(seconds + 60)
    except subprocess.TimeoutExpired:
        raise SystemExit("bench: the stream did not finish") from None
    sent = json.loads(sender_log.read_text().splitlines()[-1])
    received = json.loads(
        wait_for("receiver result", lambda: receiver_log.read_text().splitlines()[-1:], 10)[0]
    )
    client.stop_up()
    return {
        "failover": failover,
        "recovery": recovery,
        "same_bytes": sent["sha256"] == received["sha256"] == sent["echoed"],
        "bytes": received["bytes"],
        "longest_gap": received["longest_gap"],
    }


def part_throughput(bench: Bench, repeats: int, seconds: float) -> dict[str, list[float]]:
    box, _ = bench.box("tbox", "none")
    client, site = bench.device(box, "tphone", "NAT3")
    box_ip = box.host.ip  # a public address: the site does not translate
    assert box_ip is not None
    overlay = box_overlay(box)
    figures: dict[str, list[float]] = {"plain": [], "wireguard-go": [], "direct": [], "relay": []}
    client.up()
    wait_for("direct path", lambda: path_line(client, ("direct-v4",)), 15)
    for _ in range(repeats):
        figures["plain"].append(tcp_throughput(client.host, box.host, box_ip, seconds=seconds))
        figures["direct"].append(tcp_throughput(client.host, box.host, overlay, seconds=seconds))
        mark = line_count(client.log("up"))
        bench.lab.block(site.router, box_ip)
        wait_for("relay", lambda m=mark: path_line(client, ("relay",), m), 10)
        figures["relay"].append(tcp_throughput(client.host, box.host, overlay, seconds=seconds))
        mark = line_count(client.log("up"))
        bench.lab.unblock(site.router, box_ip)
        try:
            wait_for("direct again", lambda m=mark: path_line(client, ("direct-v4",), m), 90)
        except SystemExit as exc:
            raise SystemExit(f"{exc}\n{client.tail('up', n=3000)}") from None
    # wireguard-go last, with `up` stopped: its interface's address would otherwise become
    # a LAN candidate, and our tunnel would (rightly) take that path through it
    client.stop_up()
    with WireguardGo(box.host, client.host, box_ip) as wg:
        for _ in range(repeats):
            figures["wireguard-go"].append(
                tcp_throughput(client.host, box.host, wg.server_ip, seconds=seconds)
            )
    box.stop()
    return figures


def probe(host: Any, *args: str, timeout: float = 30) -> dict[str, Any]:
    """``svcprobe.py ARGS`` in ``host``'s namespace: its JSON line."""
    proc = host.run([PYTHON, str(SVCPROBE), *args], check=False, timeout=timeout)
    try:
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SystemExit(f"svcprobe {args}: {proc.stdout}{proc.stderr}") from None
    return result


def part_services(bench: Bench, runs: int, repeats: int, seconds: float) -> dict[str, list[float]]:
    box, site = bench.box("sbox", "NAT3")
    vm = site.add_host("vm", ipv6=False)
    www = bench.work / "www"
    www.mkdir()
    vm.popen([PYTHON, str(SVCPROBE), "serve", "--http", str(www)])
    client, _ = bench.device(box, "sphone", "NAT3")
    client.host.use_resolver(str(RESOLVER))
    # a second device, so that "only the other one" is a valid access list (the console's form
    # refuses a service nobody may reach)
    bench.device(box, "sother", "NAT3")
    device, other = bench.addresses["sphone"], bench.addresses["sother"]
    vm_ip, name = vm.ip or "", "devvm.labbox.heiyu.space"
    _, service = box.expose("devvm", "vm", vm_ip, "all")
    client.up()
    wait_for("direct path", lambda: path_line(client, ("direct-v4",)), 15)
    wait_for("devvm", lambda: probe(client.host, "connect", "--to", name, "--port", "7")["ok"], 15)
    overlay = box_overlay(box)
    figures: dict[str, list[float]] = {
        k: [] for k in ("vm", "box", "tun", "proxy", "grant", "revoke")
    }
    for _ in range(repeats):
        figures["box"].append(tcp_throughput(client.host, box.host, overlay, seconds=seconds))
        figures["vm"].append(
            tcp_throughput(client.host, vm, str(service), seconds=seconds, server_family=4)
        )
    for _ in range(runs):
        figures["tun"].append(probe(client.host, "connect", "--to", name, "--port", "7")["seconds"])
    for _ in range(max(3, runs // 4)):
        box.expose("devvm", "vm", vm_ip, "all", [other])
        time.sleep(0.5)
        until = client.host.popen(
            [PYTHON, str(SVCPROBE), "until", "--to", str(service), "--port", "7", "--within", "10"],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.3)
        saved, _ = box.expose("devvm", "vm", vm_ip, "all", [other, device])
        out, _ = until.communicate(timeout=20)
        reached = json.loads(out.strip().splitlines()[-1])
        if not reached["ok"]:
            raise SystemExit(f"access never granted: {reached}\n{box.tail()}")
        figures["grant"].append(reached["at"] - saved)
        watch = client.host.popen(
            [PYTHON, str(SVCPROBE), "watch", "--to", str(service), "--port", "7", "--within", "10"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert watch.stdout is not None
        json.loads(watch.stdout.readline())  # connected
        saved, _ = box.expose("devvm", "vm", vm_ip, "all", [other])
        out, _ = watch.communicate(timeout=20)
        closed = json.loads(out.strip().splitlines()[-1])
        if not closed.get("closed"):
            raise SystemExit(f"open connection survived the revocation: {closed}\n{box.tail()}")
        figures["revoke"].append(closed["at"] - saved)
    box.expose("devvm", "vm", vm_ip, "all")
    client.stop_up()
    client.up(mode="proxy")
    wait_for(
        "proxy", lambda: probe(client.host, "via-proxy", "--to", name, "--port", "7")["ok"], 20
    )
    for _ in range(runs):
        figures["proxy"].append(
            probe(client.host, "via-proxy", "--to", name, "--port", "7")["seconds"]
        )
    box.stop()
    return figures


def report_services(f: dict[str, list[float]]) -> None:
    box, vm = statistics.median(f["box"]), statistics.median(f["vm"])
    emit(
        f"{'TCP throughput client -> box (tunnel)':<44} median {box:8.0f} Mbit/s  "
        f"({', '.join(f'{v:.0f}' for v in f['box'])})",
        f"{'TCP throughput client -> VM (forwarded)':<44} median {vm:8.0f} Mbit/s  "
        f"({', '.join(f'{v:.0f}' for v in f['vm'])})  x{vm / box:.2f} of the tunnel to the box"
        "   target >= 0.8",
        summary("connect by name, TUN mode", [v * 1000 for v in f["tun"]], "ms"),
        summary("connect by name, proxy mode (CONNECT)", [v * 1000 for v in f["proxy"]], "ms"),
        summary("access granted: save -> connects", [v * 1000 for v in f["grant"]], "ms",
                "<= 1000"),
        summary("access revoked: save -> connection cut", [v * 1000 for v in f["revoke"]], "ms",
                "<= 1000"),
    )  # fmt: skip


def watch_console(box: LabBox, work: Path):  # type: ignore[no-untyped-def]
    """Chromium on the device list, recording (Date.now(), class) of every dot change."""
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    browser = pw.chromium.launch(
        executable_path=chromium_in_namespace(box.host.ns, work), args=CHROMIUM_ARGS
    )
    page = browser.new_context().new_page()
    page.goto(box.url.rstrip("/") + "/devices/")
    page.fill("input[name=username]", OWNER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_function("() => window.__lazycatLive === true", timeout=15_000)
    page.evaluate(
        """() => {
            window.__dots = [];
            const seen = new Map();
            const record = () => document.querySelectorAll('tr.device-row .dot').forEach(d => {
                const row = d.closest('tr').id;
                if (seen.get(row) !== d.className) {
                    seen.set(row, d.className);
                    window.__dots.push([Date.now() / 1000, d.className]);
                }
            });
            record();
            new MutationObserver(record).observe(document.querySelector('main'),
                {childList: true, subtree: true, attributes: true});
        }"""
    )
    return pw, browser, page


def push_latencies(box: LabBox, dots: list[list[Any]]) -> list[float]:
    """Each colour change the box logged -> the first matching dot change after it."""
    colour = {"relay": "dot-yellow", "offline": "dot-grey"}
    changes, last = [], None
    for line in log_lines(box.log, "path changed"):
        want = colour.get(line["kind"], "dot-blue")
        if want != last:  # same colour (a new endpoint): nothing to repaint
            changes.append((wall(line["ts"]), want))
            last = want
    out = []
    for i, (at, want) in enumerate(changes):
        until = changes[i + 1][0] if i + 1 < len(changes) else at + 5
        shown = next((t for t, cls in dots if at - 0.002 <= t and want in cls), None)
        # a change the next one overtook before the page showed it is no sample: the page
        # rightly shows the newer state
        if shown is not None and shown <= until + 0.002:
            out.append(max(0.0, shown - at))
    return out


def report_throughput(tput: dict[str, list[float]]) -> None:
    wg = statistics.median(tput["wireguard-go"])
    for kind in ("plain", "wireguard-go", "direct", "relay"):
        mbit = statistics.median(tput[kind])
        runs = ", ".join(f"{v:.0f}" for v in tput[kind])
        emit(
            f"{'TCP throughput ' + kind:<44} median {mbit:8.0f} Mbit/s"
            f"  ({runs})  x{mbit / wg:.2f} of wireguard-go"
        )


def emit(*lines: str) -> None:
    print("\n".join(lines), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--only", choices=("throughput", "services"), help="run just that part")
    args = parser.parse_args()
    reason = check_available()
    for tool in ("iperf3", "wireguard-go", "wg", "chromium"):
        if reason is None and shutil.which(tool) is None:
            reason = f"{tool} is missing: run make test once (it installs the test packages)"
    if reason:
        print(f"bench_lab: {reason}", file=sys.stderr)
        return 1
    print(describe("cryptography", "uvloop", "django", "channels", "celery"))
    work = Path(tempfile.mkdtemp(prefix="lzc-bench-lab-"))
    try:
        with Lab() as lab:
            bench = Bench(lab, work)
            bench.relay()
            if args.only == "throughput":
                report_throughput(part_throughput(bench, args.repeats, args.seconds))
                return 0
            if args.only == "services":
                report_services(part_services(bench, args.runs, args.repeats, args.seconds))
                return 0

            # 1, 2, 5: NAT3 box, NAT3 device, the console open in Chromium
            box, box_site = bench.box("box", "NAT3")
            client, place = bench.device(box, "phone", "NAT3")
            pw, browser, page = watch_console(box, work)
            try:
                to_relay, to_direct = part_up(bench, client, args.runs, "direct-v4")
                fail = part_failover(bench, box, client, place, box_site.public_ip, args.cycles)
                time.sleep(1.0)
                dots = page.evaluate("window.__dots")
            finally:
                browser.close()
                pw.stop()
            pushes = push_latencies(box, dots)
            box.stop()
            emit(
                summary("up -> first packet via relay (NAT3xNAT3)", to_relay, target="<= 0.5"),
                summary("up -> direct (NAT3xNAT3)", to_direct, target="p50 <= 1, p95 <= 2"),
                summary("failover: block -> relay", fail["failover"], target="<= 3"),
                summary("recovery: unblock -> direct", fail["recovery"], target="<= 10"),
                f"{'stream through every failover':<44} {fail['bytes']:,} bytes, one connection,"
                f" SHA-256 equal: {fail['same_bytes']}, longest stall"
                f" {fail['longest_gap']:.2f} s",
                summary("console push: path change -> dot", [p * 1000 for p in pushes], "ms",
                        "p95 <= 200"),
            )  # fmt: skip

            # 3: NAT4 device, NAT3 box with a port mapping
            mbox, _ = bench.box("mbox", "NAT3", portmap=True)
            wait_for("port mapping", lambda: log_lines(mbox.log, "port mapping"), 30)
            m4, _ = bench.device(mbox, "phone4", "NAT4")
            _, mapped = part_up(bench, m4, max(5, args.runs // 4), "direct-portmapped")
            mbox.stop()
            emit(summary("up -> direct (NAT4 x NAT3 + mapping)", mapped, target="<= 2"))

            # 4: throughput
            report_throughput(part_throughput(bench, args.repeats, args.seconds))

            # 6: services
            report_services(part_services(bench, args.runs, args.repeats, args.seconds))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
