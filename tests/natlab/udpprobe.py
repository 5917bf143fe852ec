"""The NAT lab's probe tool: a UDP responder and the client probes that measure RFC 4787
behaviour, run in a namespace with ``ip netns exec <ns> python udpprobe.py <mode> ...``.

Standard library only, so it runs with any Python. Every mode is bounded in time.

``serve ADDR...`` (the relay host)
    Binds one UDP socket per ``ip:port`` / ``[ip6]:port`` and a TCP listener on the first
    address of each family, prints ``ready``, and answers until killed:

    * a JSON probe ``{"id": n, "also": ["ip:port", ...], "delay": s}`` is answered from the
      socket it arrived on with ``{"id": n, "seen": "<source ip:port>", "at": "<socket>"}``;
      then, ``delay`` seconds later, every socket named in ``also`` sends
      ``{"id": n, "from": "<socket>"}`` to that source **unsolicited** — the datagrams the
      filtering tests (RFC 4787 section 5) look for;
    * a STUN Binding request (RFC 8489: magic cookie at bytes 4..8) gets a Binding success
      with XOR-MAPPED-ADDRESS from the same socket (enough for miniupnpd's ``ext_perform_stun``,
      which must see its external side as unfiltered);
    * a TCP connection gets one line, ``seen <source ip:port>``, and is closed.

``map --bind A T1 T2 ...``
    From one socket bound to ``A``, asks each target in turn what source it saw (the mapping,
    RFC 4787 section 4.1). Prints ``{"local": A, "mapped": {target: seen or null}}``.

``filter --bind A --server T --also X Y --delay s --wait w``
    Sends one probe to ``T`` only, asking ``X``, ``Y`` to send unsolicited datagrams after
    ``s`` seconds; collects for ``w`` seconds. Prints ``{"mapped": seen or null,
    "received": ["<socket that sent>", ...]}`` (a datagram counts only if its real source is
    the socket it claims).

``listen --bind A --wait w``
    Prints ``ready``, then the JSON list of ``[source, text]`` received within ``w`` seconds.

``send --bind A --to T --count n --interval s --text x``
    Sends ``n`` datagrams.

``tcp --to T``
    Connects, prints ``{"ok": true, "line": ...}`` or ``{"ok": false, "error": ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import threading
import time

MAGIC = 0x2112A442
ATTEMPTS = 3
ATTEMPT_TIMEOUT = 0.4


def parse(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def fmt(addr: tuple[str, int]) -> str:
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


def udp_socket(bind: str) -> socket.socket:
    host, port = parse(bind)
    af = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(af, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if af == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    return sock


def stun_answer(data: bytes, source: tuple[str, int]) -> bytes | None:
    if len(data) < 20 or struct.unpack("!I", data[4:8])[0] != MAGIC or data[0:2] != b"\x00\x01":
        return None
    ip, port = source[0], source[1]
    if ":" in ip:  # RFC 8489 section 14.2: XOR with the cookie and the transaction id
        key = struct.pack("!I", MAGIC) + data[8:20]
        raw = bytes(a ^ b for a, b in zip(socket.inet_pton(socket.AF_INET6, ip), key, strict=True))
        attr = struct.pack("!HHBBH", 0x0020, 20, 0, 2, port ^ 0x2112) + raw
    else:
        xip = struct.unpack("!I", socket.inet_aton(ip))[0] ^ MAGIC
        attr = struct.pack("!HHBBHI", 0x0020, 8, 0, 1, port ^ 0x2112, xip)
    return struct.pack("!HHI", 0x0101, len(attr), MAGIC) + data[8:20] + attr


def serve(addresses: list[str]) -> None:
    socks = {a: udp_socket(a) for a in addresses}
    listeners = []
    for family_first in {(":" in parse(a)[0]): a for a in reversed(addresses)}.values():
        host, port = parse(family_first)
        af = socket.AF_INET6 if ":" in host else socket.AF_INET
        lsock = socket.socket(af, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((host, port))
        lsock.listen(16)
        listeners.append(lsock)
    by_fd = {s.fileno(): (name, s) for name, s in socks.items()}
    print("ready", flush=True)

    def later(delay: float, names: list[str], msg_id: object, dest: tuple[str, int]) -> None:
        time.sleep(delay)
        for name in names:
            if name in socks:
                body = json.dumps({"id": msg_id, "from": name}).encode()
                socks[name].sendto(body, dest)

    while True:
        ready, _, _ = select.select([*by_fd, *(s.fileno() for s in listeners)], [], [], 1.0)
        for fd in ready:
            listener = next((s for s in listeners if s.fileno() == fd), None)
            if listener is not None:
                conn, peer = listener.accept()
                with conn:
                    conn.sendall(f"seen {fmt(peer[:2])}\n".encode())
                continue
            name, sock = by_fd[fd]
            data, source = sock.recvfrom(4096)
            answer = stun_answer(data, source[:2])
            if answer is not None:
                sock.sendto(answer, source)
                continue
            try:
                msg = json.loads(data)
                also = [str(a) for a in msg.get("also", [])]
                delay = min(float(msg.get("delay", 0.0)), 30.0)
            except (ValueError, AttributeError, TypeError):
                continue
            reply = {"id": msg.get("id"), "seen": fmt(source[:2]), "at": name}
            sock.sendto(json.dumps(reply).encode(), source)
            if also:
                args = (delay, also, msg.get("id"), source)
                threading.Thread(target=later, args=args, daemon=True).start()


def ask(
    sock: socket.socket, target: str, msg: dict[str, object]
) -> tuple[dict[str, object] | None, list[tuple[str, dict[str, object]]]]:
    """Send ``msg`` to ``target`` until its answer comes (bounded); return the answer and any
    other JSON datagrams that arrived meanwhile."""
    extra: list[tuple[str, dict[str, object]]] = []
    host, port = parse(target)
    for _ in range(ATTEMPTS):
        try:
            sock.sendto(json.dumps(msg).encode(), (host, port))
        except OSError:  # no route, ICMP unreachable: no answer
            time.sleep(ATTEMPT_TIMEOUT)
            continue
        deadline = time.monotonic() + ATTEMPT_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
            try:
                data, source = sock.recvfrom(4096)
                got = json.loads(data)
            except (OSError, ValueError):
                continue
            if got.get("id") == msg["id"] and "seen" in got and fmt(source[:2]) == target:
                return got, extra
            extra.append((fmt(source[:2]), got))
    return None, extra


def collect(sock: socket.socket, seconds: float) -> list[tuple[str, dict[str, object]]]:
    out = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        try:
            data, source = sock.recvfrom(4096)
            out.append((fmt(source[:2]), json.loads(data)))
        except (OSError, ValueError):
            continue
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["serve", "map", "filter", "listen", "send", "tcp"])
    p.add_argument("targets", nargs="*")
    p.add_argument("--bind")
    p.add_argument("--server")
    p.add_argument("--also", nargs="*", default=[])
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--wait", type=float, default=1.0)
    p.add_argument("--to")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--text", default="hello")
    a = p.parse_intermixed_args(argv)
    msg_id = int.from_bytes(os.urandom(4), "big")
    if a.mode == "serve":
        serve(a.targets)
        return 0
    if a.mode == "tcp":
        host, port = parse(a.to)
        try:
            with socket.create_connection((host, port), timeout=3) as conn:
                conn.settimeout(3)
                line = conn.recv(200).decode().strip()
            print(json.dumps({"ok": True, "line": line}))
        except OSError as exc:
            print(json.dumps({"ok": False, "error": str(exc)}))
        return 0
    sock = udp_socket(a.bind)
    if a.mode == "map":
        mapped: dict[str, object] = {}
        for target in a.targets:
            got, _ = ask(sock, target, {"id": msg_id})
            mapped[target] = got["seen"] if got else None
            msg_id += 1
        print(json.dumps({"local": a.bind, "mapped": mapped}))
    elif a.mode == "filter":
        got, extra = ask(sock, a.server, {"id": msg_id, "also": a.also, "delay": a.delay})
        extra += collect(sock, a.wait)
        received = sorted(
            {src for src, m in extra if m.get("id") == msg_id and m.get("from") == src}
        )
        print(json.dumps({"mapped": got["seen"] if got else None, "received": received}))
    elif a.mode == "listen":
        print("ready", flush=True)
        rx = []
        deadline = time.monotonic() + a.wait
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
            data, source = sock.recvfrom(4096)
            rx.append([fmt(source[:2]), data.decode(errors="replace")])
        print(json.dumps(rx), flush=True)
    elif a.mode == "send":
        host, port = parse(a.to)
        for i in range(a.count):
            sock.sendto(a.text.encode(), (host, port))
            if i + 1 < a.count:
                time.sleep(a.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
