"""The services lab's two sides, run in a namespace with ``ip netns exec <ns> python svcprobe.py``.

Standard library only. Every client mode is bounded in time and prints one JSON line.

``serve --http DIR`` (the developer VM, IPv4 only)
    TCP echo on 0.0.0.0:7 (RFC 862: every byte back), UDP echo on 0.0.0.0:7 (each datagram back,
    prefixed with ``port 7:``, so a test sees which port the packet really arrived at), and HTTP
    on 0.0.0.0:80 serving ``DIR``. Prints ``ready``, serves until killed.

``banner --to HOST --port P``
    Connects (HOST may be a name: the namespace's resolver answers it) and prints the first line
    the server sends: ``{"ok": true, "line": "SSH-2.0-..."}``.

``echo --to HOST --port P --size N``
    Sends N random bytes over TCP while reading them back; ``{"ok": true}`` if every byte came
    back in order, with ``seconds`` it took (connect included).

``udp --to HOST --port P``
    One datagram, its echo within 2 s (three tries): ``{"ok": true, "reply": "..."}``.

``connect --to HOST --port P [--timeout S]``
    One TCP connect: ``{"ok": true|false, "error": "refused"|"timeout"|..., "seconds": s}``.

``until --to HOST --port P --within S``
    Connects every 20 ms until one succeeds: ``{"ok": true, "seconds": s, "tries": n, "at": t}``
    (from start to the first success; ``at`` is the wall-clock time of that success), or
    ``ok: false`` after S seconds.

``watch --to HOST --port P --within S``
    One TCP connection to an echo; prints ``{"connected": true}``, then sends a byte every
    20 ms until the connection is closed or reset: ``{"closed": "reset"|"eof", "at": t}`` (the
    wall-clock time it noticed), or ``{"closed": null}`` if it still works after S seconds.

``via-proxy --proxy HOST:PORT --to NAME --port P``
    CONNECT NAME:P through an HTTP proxy: ``{"ok": true, "seconds": s}`` from the connect to the
    proxy until its ``200`` (the proxy answers once it has the connection to the target).

``hold --to HOST --port P``
    One TCP connection to an echo; prints ``{"connected": true}``, then for each line on stdin
    sends it and prints ``{"echo": "..."}``, or ``{"closed": "reset"|"eof"|"timeout"}`` (after
    which it exits).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import socket
import sys
import threading
import time


def _print(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


ANY = "0.0.0.0"  # noqa: S104 - the VM serves its whole (lab) LAN, as a real one would


def serve(http_dir: str) -> None:
    tcp = socket.create_server((ANY, 7))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((ANY, 7))

    def echo_tcp(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:  # reset: the box cut the connection (a revoked device)
                pass

    def accept() -> None:
        while True:
            conn, _ = tcp.accept()
            threading.Thread(target=echo_tcp, args=(conn,), daemon=True).start()

    def echo_udp() -> None:
        while True:
            data, peer = udp.recvfrom(2048)
            udp.sendto(b"port 7:" + data, peer)

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=http_dir)
    web = http.server.ThreadingHTTPServer((ANY, 80), handler)
    for target in (accept, echo_udp, web.serve_forever):
        threading.Thread(target=target, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def banner(host: str, port: int) -> None:
    with _connect(host, port, 10) as s:
        line = s.makefile("rb").readline(256)
    _print(ok=line.startswith(b"SSH-"), line=line.decode(errors="replace").strip())


def echo(host: str, port: int, size: int) -> None:
    data = os.urandom(size)
    started = time.monotonic()
    with _connect(host, port, 20) as s:
        sender = threading.Thread(target=s.sendall, args=(data,), daemon=True)
        sender.start()
        back = bytearray()
        while len(back) < size:
            chunk = s.recv(65536)
            if not chunk:
                break
            back += chunk
        sender.join(20)
    _print(ok=bytes(back) == data, got=len(back), seconds=round(time.monotonic() - started, 4))


def udp(host: str, port: int) -> None:
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.connect(address)
        for _ in range(3):
            s.send(b"hello udp")
            try:
                _print(ok=True, reply=s.recv(2048).decode(errors="replace"))
                return
            except TimeoutError:
                continue
            except OSError as exc:  # ICMP unreachable: refused, administratively prohibited, …
                _print(ok=False, error=_error(exc))
                return
    _print(ok=False, error="timeout")


def _error(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return f"{type(exc).__name__}: {exc}"


def connect(host: str, port: int, timeout: float) -> None:
    started = time.monotonic()
    try:
        _connect(host, port, timeout).close()
    except OSError as exc:
        _print(ok=False, error=_error(exc), seconds=round(time.monotonic() - started, 4))
        return
    _print(ok=True, seconds=round(time.monotonic() - started, 4))


def until(host: str, port: int, within: float) -> None:
    started = time.monotonic()
    tries, last = 0, ""
    while time.monotonic() - started < within:
        tries += 1
        try:
            _connect(host, port, 0.5).close()
        except OSError as exc:
            last = _error(exc)
            time.sleep(0.02)
            continue
        at = time.time()  # wall clock: the test compares it with the box's commit time
        _print(ok=True, seconds=round(time.monotonic() - started, 4), tries=tries, at=at)
        return
    _print(ok=False, error=last, tries=tries)


def watch(host: str, port: int, within: float) -> None:
    s = _connect(host, port, 10)
    s.settimeout(0.5)
    _print(connected=True)
    started = time.monotonic()
    while time.monotonic() - started < within:
        try:
            s.sendall(b"x")
            got = s.recv(64)
        except TimeoutError:
            continue
        except OSError as exc:
            _print(closed="reset" if isinstance(exc, ConnectionResetError) else _error(exc),
                   at=time.time())  # fmt: skip
            return
        if not got:
            _print(closed="eof", at=time.time())
            return
        time.sleep(0.02)
    _print(closed=None)


def via_proxy(proxy: str, name: str, port: int) -> None:
    host, _, proxy_port = proxy.rpartition(":")
    started = time.monotonic()
    with _connect(host, int(proxy_port), 10) as s:
        s.sendall(f"CONNECT {name}:{port} HTTP/1.1\r\nHost: {name}:{port}\r\n\r\n".encode())
        status = s.makefile("rb").readline(1024)
    seconds = round(time.monotonic() - started, 4)
    _print(ok=b" 200 " in status, status=status.decode(errors="replace").strip(), seconds=seconds)


def hold(host: str, port: int) -> None:
    s = _connect(host, port, 10)
    s.settimeout(3)
    _print(connected=True)
    for line in sys.stdin:
        try:
            s.sendall(line.encode())
            got = s.recv(65536)
        except ConnectionResetError:
            _print(closed="reset")
            return
        except TimeoutError:
            _print(closed="timeout")
            return
        except OSError as exc:
            _print(closed=_error(exc))
            return
        if not got:
            _print(closed="eof")
            return
        _print(echo=got.decode(errors="replace").strip())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode")
    parser.add_argument("--http", default=".")
    parser.add_argument("--to", default="")
    parser.add_argument("--port", type=int, default=7)
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--within", type=float, default=5.0)
    parser.add_argument("--proxy", default="127.0.0.1:31085")
    args = parser.parse_args()
    if args.mode == "serve":
        serve(args.http)
    elif args.mode == "banner":
        banner(args.to, args.port)
    elif args.mode == "echo":
        echo(args.to, args.port, args.size)
    elif args.mode == "udp":
        udp(args.to, args.port)
    elif args.mode == "connect":
        connect(args.to, args.port, args.timeout)
    elif args.mode == "until":
        until(args.to, args.port, args.within)
    elif args.mode == "watch":
        watch(args.to, args.port, args.within)
    elif args.mode == "via-proxy":
        via_proxy(args.proxy, args.to, args.port)
    elif args.mode == "hold":
        hold(args.to, args.port)
    else:
        parser.error(f"unknown mode {args.mode}")


if __name__ == "__main__":
    main()
