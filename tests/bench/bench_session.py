"""Tunnel session benchmark: transport packets/s at 1,400 bytes, and full IK handshakes/s.

Both sides run in this one process through ``transport.session.Endpoint`` (no sockets), so a
figure is the cost of both ends together:

* packets: the client seals ``--packets`` PACKET frames of ``--size`` bytes
  (``Session.send_packet``) and the box opens them (``Endpoint.receive``: index lookup, replay
  window, ChaCha20-Poly1305, frame decode, event). Reported as packets/s for seal + open, and
  for each half alone.
* handshakes: ``--handshakes`` complete IK handshakes, each message 1 -> response -> the
  initiator's confirming keepalive -> the box's key confirmation, with mac1 checks, the rate
  limiter and the replay timestamp on the way (limits raised so the benchmark measures work,
  not refusals). Target: >= 1,000 handshakes/s per core.

Every figure is the median of ``--runs`` runs (default 5). Usage::

    .venv/bin/python tests/bench/bench_session.py [--runs 5] [--packets 20000] [--handshakes 1000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.machine import describe
from transport import wire
from transport.session import Endpoint, FrameReceived, HandshakeCompleted, Keys, Session

BOX = ("203.0.113.10", 51820)
CLIENT = ("198.51.100.20", 40000)
WALL0 = 1_767_225_600.0


def endpoints() -> tuple[Endpoint, Endpoint, Keys]:
    box_keys, client_keys = Keys.generate(), Keys.generate()
    box = Endpoint(
        box_keys,
        is_allowed={client_keys.public}.__contains__,
        handshake_rate=1e9,
        handshake_burst=1e9,
        load_threshold=10**9,
    )
    return box, Endpoint(client_keys), box_keys


def handshake(box: Endpoint, client: Endpoint, session: Session, now: float) -> None:
    box.receive(session.initiate(now, WALL0 + now), CLIENT, now)
    (response,) = box.datagrams_to_send()
    client.receive(response.data, BOX, now)
    (confirm,) = client.datagrams_to_send()
    events = box.receive(confirm.data, CLIENT, now)
    assert isinstance(events[0], HandshakeCompleted)


def bench_packets(count: int, size: int) -> tuple[float, float, float]:
    """(seal+open, seal only, open only) in packets per second."""
    box, client, box_keys = endpoints()
    session = client.connect(box_keys.public)
    handshake(box, client, session, 0.0)
    payload = b"\x60" + bytes(size - 1)
    now = 1.0
    send_packet, receive = session.send_packet, box.receive
    start = time.perf_counter()
    for _ in range(count):
        receive(send_packet(payload, now), CLIENT, now)  # type: ignore[arg-type]
    both = count / (time.perf_counter() - start)
    start = time.perf_counter()
    sealed = [send_packet(payload, now) for _ in range(count)]
    seal = count / (time.perf_counter() - start)
    start = time.perf_counter()
    for data in sealed:
        events = receive(data, CLIENT, now)  # type: ignore[arg-type]
    opened = count / (time.perf_counter() - start)
    assert isinstance(events[0], FrameReceived)
    assert events[0].frame == wire.Packet(payload[1:]) or len(payload) > 1
    return both, seal, opened


def bench_handshakes(count: int) -> float:
    box, client, box_keys = endpoints()
    session = client.connect(box_keys.public)
    now = 0.0
    start = time.perf_counter()
    for _ in range(count):
        now += 0.02  # each IK timestamp must be newer than the last (17 ms granularity)
        handshake(box, client, session, now)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--packets", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=1400)
    parser.add_argument("--handshakes", type=int, default=1000)
    args = parser.parse_args()
    print(f"machine: {describe('cryptography', 'noiseprotocol')}")
    packets = [bench_packets(args.packets, args.size) for _ in range(args.runs)]
    handshakes = [bench_handshakes(args.handshakes) for _ in range(args.runs)]
    both, seal, opened = (statistics.median(run[i] for run in packets) for i in range(3))
    mbit = both * args.size * 8 / 1e6
    print(
        f"packets ({args.size} B, {args.packets} x {args.runs} runs, median): "
        f"seal+open {both:,.0f}/s ({mbit:,.0f} Mbit/s of payload on one core) · "
        f"seal {seal:,.0f}/s · open {opened:,.0f}/s"
    )
    rates = sorted(handshakes)
    print(
        f"IK handshakes, both sides ({args.handshakes} x {args.runs} runs): "
        f"median {statistics.median(rates):,.0f}/s (min {rates[0]:,.0f}, max {rates[-1]:,.0f});"
        f" target >= 1,000/s per core"
    )


if __name__ == "__main__":
    main()
