"""Relay benchmark: forwarding rate of ``lazycat-relay`` over UDP beside a plain UDP forwarder.

For 1, 10 and 100 box<->client pairs, every endpoint (a box or a client, each its own UDP
socket) sends 1,400-byte payloads to its partner through the relay as fast as it can; the relay
forwards each SEND as a RECV. Beside it, in the same run, the **baseline**: a minimal asyncio
UDP forwarder with a static address table (no frames, no tickets, no limits) on the same event
loop, fed the same way. The figure is what the forwarder *forwarded* (its own counter) over a
measured window, so load the forwarder could not keep up with (dropped in its socket buffer)
does not count, and its CPU time over the window gives the per-core rate.

Fairness and bounds:

* the relay is the real CLI (``python -m transport.relay_cli``) with the per-peer limits raised
  (the default 2,000 packets/s per peer would cap one pair at 4,000 packets/s);
* the forwarder under test is pinned to CPU 0 and the load generators to the other CPUs
  (``sched_setaffinity``), in separate processes; generators never read their sockets (what
  arrives is dropped by the kernel), so receiving costs them nothing;
* the offered load is printed next to the forwarded rate: if they are close, the generators
  were the limit, not the forwarder;
* every process is started and ended by this script (by PID), every phase has a deadline.

    .venv/bin/python tests/bench/bench_relay.py [--pairs 1,10,100] [--runs 3] [--seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.machine import describe  # noqa: E402
from transport.relay import RelayClient  # noqa: E402
from transport.relay_aio import HAVE_UVLOOP, new_event_loop  # noqa: E402
from transport.tickets import TicketKey  # noqa: E402

PAYLOAD = 1400
BASE_REGISTER = b"REG"
BASE_COUNT = b"?"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the baseline forwarder (its own process) ---------------------------------------------------


def baseline_main(port: int, uvloop: bool) -> None:
    """Forward each datagram to the partner of its source; b"?" asks for the count."""
    os.sched_setaffinity(0, {0})

    class Forwarder(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.table: dict[Any, Any] = {}
            self.waiting: dict[bytes, Any] = {}
            self.count = 0
            self.transport: Any = None

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            if hasattr(transport, "max_size"):  # as the relay does: see _small_receive_buffer
                transport.max_size = 4097

        def datagram_received(self, data: bytes, addr: Any) -> None:
            dst = self.table.get(addr)
            if dst is not None:
                self.transport.sendto(data, dst)
                self.count += 1
            elif data == BASE_COUNT:
                self.transport.sendto(str(self.count).encode(), addr)
            elif data.startswith(BASE_REGISTER):
                pair = data[3:]
                other = self.waiting.pop(pair, None)
                if other is None:
                    self.waiting[pair] = addr
                elif other != addr:
                    self.table[addr], self.table[other] = other, addr
                self.transport.sendto(b"ok", addr)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
        sock.bind(("127.0.0.1", port))
        await loop.create_datagram_endpoint(Forwarder, sock=sock)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()

    loop = new_event_loop() if uvloop else asyncio.new_event_loop()
    try:
        loop.run_until_complete(serve())
    finally:
        loop.close()


# --- load generators (their own processes) ------------------------------------------------------


def _exchange(sock: socket.socket, client: RelayClient, until: float) -> None:
    """Run a sans-IO relay client over a blocking socket until it is registered."""
    while not client.registered:
        for frame in client.take_outgoing():
            sock.send(frame)
        sock.settimeout(max(0.01, until - time.monotonic()))
        try:
            data = sock.recv(2048)
        except TimeoutError:
            if time.monotonic() > until:
                raise RuntimeError("relay registration timed out") from None
            client.on_timer(time.monotonic())
            continue
        client.receive(data, time.monotonic())


def generator_main(
    mode: str,
    target: tuple[str, int],
    pairs: list[int],
    ready: Any,
    go: Any,
    results: Any,
    seconds: float,
    cpus: set[int],
    drain: bool,
) -> None:
    os.sched_setaffinity(0, cpus)
    socks: list[socket.socket] = []
    frames: list[bytes] = []
    deadline = time.monotonic() + 30
    for pair in pairs:
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (a, b):
            s.bind(("127.0.0.1", 0))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20 if drain else 1 << 16)
            s.connect(target)
        payload = os.urandom(PAYLOAD)
        if mode == "baseline":
            for s in (a, b):
                s.send(BASE_REGISTER + str(pair).encode())
                s.settimeout(5)
                assert s.recv(16) == b"ok"
            frames += [payload, payload]
        else:
            ticket_key = TicketKey.generate()
            box = RelayClient(
                os.urandom(32), now=time.monotonic(), ticket_public=ticket_key.public_bytes()
            )
            client = RelayClient(os.urandom(32), now=time.monotonic())
            for s, c in ((a, box), (b, client)):
                c.connect(time.monotonic())
                _exchange(s, c, deadline)
            wall = int(time.time())
            client.add_ticket(
                ticket_key.issue(box.peer_id, client.peer_id, wall + 3600, now_wall=wall)
            )
            for frame in client.take_outgoing():
                b.send(frame)
            frames += [
                box.send_frame(client.peer_id, payload),
                client.send_frame(box.peer_id, payload),
            ]
        socks += [a, b]
    for s in socks:
        s.setblocking(False)
    ready.release()
    go.wait(30)
    sends = [s.send for s in socks]
    recvs = [s.recv for s in socks]
    work = list(zip(sends, frames, strict=True))
    sent = received = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(max(1, 64 // len(work))):
            for send, frame in work:
                try:
                    send(frame)
                    sent += 1
                except (BlockingIOError, ConnectionRefusedError, OSError):
                    pass
        if drain:  # --check-delivery: read what arrived, so delivery is counted too
            for recv in recvs:
                with contextlib.suppress(BlockingIOError, OSError):
                    while len(recv(2048)) >= PAYLOAD:
                        received += 1
    results.put((sent, received))
    for s in socks:
        s.close()


# --- one measurement ----------------------------------------------------------------------------


NO_UVLOOP = "import sys; sys.modules['uvloop'] = None; "


def start_relay(
    uvloop: bool = True,
) -> tuple[subprocess.Popen[str], tuple[str, int], tuple[str, int]]:
    udp, tcp = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    prelude = "" if uvloop else NO_UVLOOP
    cmd = [
        sys.executable,
        "-c",
        prelude + "import sys; from transport.relay_cli import main; sys.exit(main())",
        f"--udp=127.0.0.1:{udp}",
        f"--tcp=127.0.0.1:{tcp}",
        "--peer-pps=10000000",
        "--peer-pps-burst=10000000",
        "--peer-rate=100000000000",
        "--peer-burst=100000000000",
        "--accept-rate=100000",
        "--no-stun",
        "--stats-interval=0",
        "--log-level=warning",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    os.sched_setaffinity(proc.pid, {0})
    metrics = ("127.0.0.1", tcp)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://{metrics[0]}:{metrics[1]}/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError("the relay did not start")
    return proc, ("127.0.0.1", udp), metrics


def relay_forwarded(metrics: tuple[str, int]) -> int:
    url = f"http://{metrics[0]}:{metrics[1]}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    match = re.search(r"^lazycat_relay_forwarded_frames_total (\S+)$", body, re.M)
    assert match is not None
    return int(float(match.group(1)))


def start_baseline(uvloop: bool = True) -> tuple[Any, tuple[str, int]]:
    port = free_port(socket.SOCK_DGRAM)
    proc = mp.get_context("spawn").Process(target=baseline_main, args=(port, uvloop), daemon=True)
    proc.start()
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.settimeout(0.1)
    for _ in range(100):
        probe.sendto(BASE_COUNT, ("127.0.0.1", port))
        try:
            probe.recv(64)
            break
        except TimeoutError:
            continue
    probe.close()
    return proc, ("127.0.0.1", port)


def baseline_forwarded(address: tuple[str, int]) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.5)
        for _ in range(20):
            probe.sendto(BASE_COUNT, address)
            try:
                return int(probe.recv(64))
            except TimeoutError:
                continue  # the forwarder's buffer is full of load: ask again
    raise RuntimeError("the baseline forwarder did not answer")


def measure(
    mode: str,
    n_pairs: int,
    seconds: float,
    generators: int,
    drain: bool = False,
    uvloop: bool = True,
) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    if mode == "relay":
        server, target, metrics = start_relay(uvloop)
        pid = server.pid
        count = lambda: relay_forwarded(metrics)  # noqa: E731
    else:
        server, target = start_baseline(uvloop)
        pid = server.pid
        count = lambda: baseline_forwarded(target)  # noqa: E731
    cpus = set(range(1, os.cpu_count() or 2)) or {0}
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    shares = [list(range(n_pairs))[i::generators] for i in range(generators)]
    shares = [s for s in shares if s]
    procs = [
        ctx.Process(
            target=generator_main,
            args=(mode, target, share, ready, go, results, seconds + 1.0, cpus, drain),
            daemon=True,
        )
        for share in shares
    ]
    try:
        for p in procs:
            p.start()
        for _ in procs:
            if not ready.acquire(timeout=60):
                raise RuntimeError("a load generator did not get ready")
        go.set()
        time.sleep(0.5)  # warm up, then measure a window in the middle of the load
        c0, t0, cpu0 = count(), time.monotonic(), cpu_seconds(pid)
        time.sleep(seconds)
        c1, t1, cpu1 = count(), time.monotonic(), cpu_seconds(pid)
        totals = [results.get(timeout=30) for _ in procs]
        offered = sum(t[0] for t in totals)
        delivered = sum(t[1] for t in totals)
        for p in procs:
            p.join(10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        if isinstance(server, subprocess.Popen):
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
        else:
            server.terminate()
            server.join(10)
            if server.is_alive():
                server.kill()
    pps = (c1 - c0) / (t1 - t0)
    used = max(1e-9, cpu1 - cpu0)
    return {
        "pps": pps,
        "mbit": pps * PAYLOAD * 8 / 1e6,
        "cpu": used / (t1 - t0),
        "per_core": (c1 - c0) / used,
        "offered": offered / (seconds + 1.0),
        "delivered": delivered / (seconds + 1.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default="1,10,100")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--generators", type=int, default=2, help="load generator processes")
    parser.add_argument(
        "--check-delivery",
        action="store_true",
        help="generators also read their sockets and count what arrived (costs them CPU)",
    )
    parser.add_argument("--no-uvloop", action="store_true", help="asyncio's own event loop")
    args = parser.parse_args()
    loop_name = "asyncio" if args.no_uvloop or not HAVE_UVLOOP else "uvloop"
    print(f"machine: {describe()} · forwarders' event loop: {loop_name}")
    print(
        f"payload {PAYLOAD} B; forwarder on CPU 0, {args.generators} generator processes on the "
        f"other CPUs; {args.runs} runs x {args.seconds:.0f} s windows; medians\n"
    )
    header = (
        f"{'pairs':>5}  {'forwarder':<9} {'packets/s':>10} {'Mbit/s':>8} {'CPU':>5} "
        f"{'pkt/s per core':>15} {'offered pkt/s':>14}"
        + (f" {'delivered pkt/s':>16}" if args.check_delivery else "")
    )
    print(header)
    print("-" * len(header))
    for n in (int(x) for x in args.pairs.split(",")):
        for mode in ("relay", "baseline"):
            runs = [
                measure(
                    mode, n, args.seconds, args.generators, args.check_delivery, not args.no_uvloop
                )
                for _ in range(args.runs)
            ]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(
                f"{n:>5}  {mode:<9} {med['pps']:>10,.0f} {med['mbit']:>8,.0f} "
                f"{med['cpu']:>5.0%} {med['per_core']:>15,.0f} {med['offered']:>14,.0f}"
                + (f" {med['delivered']:>16,.0f}" if args.check_delivery else ""),
                flush=True,
            )


if __name__ == "__main__":
    main()
