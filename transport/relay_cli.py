"""``lazycat-relay``: run a public rendezvous and relay (see docs/relay.md).

Every flag has an environment variable ``LAZYCAT_RELAY_<FLAG>`` (dashes become underscores);
a flag on the command line wins. Listener flags take one or more comma-separated addresses,
``IP:PORT`` or ``[IPv6]:PORT``, and may be repeated. ``LAZYCAT_RELAY_METRICS_KEY_FILE`` names a
file holding the metrics key (for systemd credentials). Log lines are logfmt on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence

from transport.logfmt import LogfmtFormatter
from transport.relay import RelayConfig
from transport.relay_aio import HAVE_UVLOOP, MAX_STREAM_FRAME, RelayServer, ServerConfig, run
from transport.wire import Address

log = logging.getLogger("lazycat.relay")

ENV_PREFIX = "LAZYCAT_RELAY_"
DEFAULT_UDP = ["0.0.0.0:3478", "[::]:3478"]


class UsageError(Exception):
    """A flag or variable with a value that cannot work; the message says what to fix."""


# --- logfmt on stdout ---------------------------------------------------------------------------


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# --- parsing ------------------------------------------------------------------------------------


def parse_address(text: str, what: str) -> Address:
    """``IP:PORT`` or ``[IPv6]:PORT`` -> (ip, port)."""
    text = text.strip()
    example = "e.g. 0.0.0.0:3478 or [::]:443"
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise UsageError(f"{what} {text!r}: write an IPv6 address as [addr]:port ({example})")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise UsageError(f"{what} {text!r}: expected IP:PORT ({example})")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"{what} {text!r}: {host!r} is not an IP address ({example})") from None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"{what} {text!r}: the port must be a number from 0 to 65535")
    return (str(ip), int(port))


def _addresses(values: Sequence[str] | None, what: str) -> list[Address]:
    out: list[Address] = []
    for value in values or []:
        out += [parse_address(part, what) for part in value.split(",") if part.strip()]
    return out


def _env(name: str) -> str | None:
    value = os.environ.get(ENV_PREFIX + name)
    return value if value not in (None, "") else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lazycat-relay",
        description="The lazycat rendezvous and relay: STUN, and forwarding of encrypted "
        "datagrams between boxes and their devices over UDP, TCP, TLS and WebSocket.",
        epilog="Every flag can also be set as LAZYCAT_RELAY_<FLAG> (e.g. LAZYCAT_RELAY_UDP). "
        "See docs/relay.md.",
    )
    listen = p.add_argument_group("listeners (comma-separated or repeated)")
    listen.add_argument(
        "--udp",
        action="append",
        metavar="ADDR",
        help="UDP relay + STUN (default: 0.0.0.0:3478 and [::]:3478)",
    )
    listen.add_argument(
        "--tcp",
        action="append",
        metavar="ADDR",
        help="plain TCP: framed relay, WebSocket on /relay, /healthz, /metrics",
    )
    listen.add_argument("--tls", action="append", metavar="ADDR", help="the same, over TLS")
    listen.add_argument("--tls-cert", metavar="PATH", help="PEM certificate chain for --tls")
    listen.add_argument("--tls-key", metavar="PATH", help="PEM private key for --tls")
    listen.add_argument("--no-stun", action="store_true", help="do not answer STUN on UDP")
    limits = p.add_argument_group("limits")
    defaults = RelayConfig()
    limits.add_argument("--max-peers", type=int, default=defaults.max_peers)
    limits.add_argument("--max-connections", type=int, default=ServerConfig().max_connections)
    limits.add_argument("--max-frame", type=int, default=defaults.max_frame, metavar="BYTES")
    limits.add_argument(
        "--peer-rate", type=float, default=defaults.peer_bytes_per_s, metavar="BYTES/S"
    )
    limits.add_argument(
        "--peer-burst", type=float, default=defaults.peer_bytes_burst, metavar="BYTES"
    )
    limits.add_argument(
        "--peer-pps", type=float, default=defaults.peer_packets_per_s, metavar="PACKETS/S"
    )
    limits.add_argument(
        "--peer-pps-burst", type=float, default=defaults.peer_packets_burst, metavar="PACKETS"
    )
    limits.add_argument(
        "--accept-rate",
        type=float,
        default=defaults.accept_per_s,
        metavar="PER_S",
        help="new registrations and stream connections per second (burst: twice this)",
    )
    limits.add_argument(
        "--idle-timeout", type=float, default=defaults.idle_timeout, metavar="SECONDS"
    )
    ops = p.add_argument_group("operations")
    ops.add_argument("--region", default="", help="a name for this relay in logs and metrics")
    ops.add_argument(
        "--metrics-key",
        metavar="KEY",
        help="bearer key for /metrics (without one, /metrics answers loopback only)",
    )
    ops.add_argument(
        "--stats-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="log a stats line this often (0: never)",
    )
    ops.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _apply_env(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """Environment variables as flags placed before the command line (which wins)."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    extra: list[str] = []
    for action in parser._actions:
        flags = [f for f in action.option_strings if f.startswith("--")]
        if not flags or flags[0] == "--help":
            continue
        flag = flags[0]
        value = _env(flag[2:].upper().replace("-", "_"))
        if value is None or flag in given:
            continue
        if action.nargs == 0:  # a switch
            if value.strip().lower() in ("1", "true", "yes", "on"):
                extra.append(flag)
        else:
            extra += [flag, value]
    if "--metrics-key" not in given and _env("METRICS_KEY") is None:
        path = _env("METRICS_KEY_FILE")
        if path is not None:
            try:
                with open(path, encoding="utf-8") as f:
                    extra += ["--metrics-key", f.read().strip()]
            except OSError as exc:
                raise UsageError(f"{ENV_PREFIX}METRICS_KEY_FILE {path!r}: {exc.strerror}") from None
    return extra + list(argv)


def build_config(args: argparse.Namespace) -> ServerConfig:
    udp = _addresses(args.udp, "--udp")
    tcp = _addresses(args.tcp, "--tcp")
    tls = _addresses(args.tls, "--tls")
    default_udp = not (udp or tcp or tls)
    if default_udp:
        udp = [parse_address(a, "--udp") for a in DEFAULT_UDP]
    if tls and not (args.tls_cert and args.tls_key):
        raise UsageError("--tls needs --tls-cert and --tls-key (PEM files)")
    if (args.tls_cert or args.tls_key) and not tls:
        raise UsageError("--tls-cert/--tls-key are only used with --tls ADDR")
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise UsageError(f"cannot read {flag} {path!r}: {exc.strerror}") from None
    if (tcp or tls) and args.max_frame > MAX_STREAM_FRAME:
        raise UsageError(f"--max-frame must be at most {MAX_STREAM_FRAME} with TCP/TLS listeners")
    try:
        relay = RelayConfig(
            max_peers=args.max_peers,
            max_frame=args.max_frame,
            peer_bytes_per_s=args.peer_rate,
            peer_bytes_burst=args.peer_burst,
            peer_packets_per_s=args.peer_pps,
            peer_packets_burst=args.peer_pps_burst,
            accept_per_s=args.accept_rate,
            accept_burst=2 * args.accept_rate,
            idle_timeout=args.idle_timeout,
        )
    except ValueError as exc:
        flag = str(exc).split(" ", 1)[0].replace("_", "-")
        raise UsageError(f"limits: {exc} (see --help for the flag behind {flag})") from None
    if args.max_connections <= 0:
        raise UsageError("--max-connections must be positive")
    return ServerConfig(
        udp=udp,
        tcp=tcp,
        tls=tls,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        relay=relay,
        region=args.region,
        metrics_key=args.metrics_key,
        max_connections=args.max_connections,
        stun=not args.no_stun,
    )


def explain_bind_error(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "the address is already in use (another relay? pick another port)"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "this machine has no such address"
    if exc.errno == errno.EAFNOSUPPORT:
        return "this machine has no IPv6 (drop the [::] listener)"
    return exc.strerror or str(exc)


# --- running ------------------------------------------------------------------------------------


async def serve(config: ServerConfig, stats_interval: float, default_udp: bool) -> int:
    server = RelayServer(config)
    try:
        await _start(server, config, default_udp)
    except ssl.SSLError as exc:
        log.error(
            "cannot load the TLS certificate",
            extra={"error": f"{exc.reason or exc}: is --tls-key the key of --tls-cert (PEM)?"},
        )
        return 1
    except _BindError as exc:
        log.error("cannot listen", extra={"listener": exc.listener, "error": exc.reason})
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    listeners = {k: ",".join(f"{h}:{p}" for h, p in v) for k, v in server.addresses.items() if v}
    log.info(
        "relay listening",
        extra={
            "region": config.region or "-",
            "loop": "uvloop" if HAVE_UVLOOP else "asyncio",
            **listeners,
        },
    )
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), stats_interval if stats_interval > 0 else None)
        except TimeoutError:
            _log_stats(server)
    log.info("relay stopping")
    await server.stop()
    _log_stats(server)
    return 0


class _BindError(Exception):
    def __init__(self, listener: str, reason: str) -> None:
        super().__init__(listener, reason)
        self.listener = listener
        self.reason = reason


async def _start(server: RelayServer, config: ServerConfig, default_udp: bool) -> None:
    """Start the server; bind failures name the listener. An IPv6 default that this machine
    cannot bind is left out with a warning rather than stopping the relay."""
    try:
        await server.start()
        return
    except OSError as exc:
        failed = _find_failing_listener(config)
        if (
            default_udp
            and failed is not None
            and failed[1][0] == "::"
            and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)
        ):
            log.warning("no IPv6 here: listening on IPv4 only", extra={"error": exc.strerror})
            config.udp = [a for a in config.udp if a[0] != "::"]
            await server.start()
            return
        where = f"{failed[0]} {failed[1][0]}:{failed[1][1]}" if failed else "?"
        raise _BindError(where, explain_bind_error(exc)) from None


def _find_failing_listener(config: ServerConfig) -> tuple[str, Address] | None:
    """Which listener cannot bind (tried one by one, after the whole start failed)."""
    import socket

    from transport.relay_aio import udp_socket

    for address in config.udp:
        try:
            udp_socket(address).close()
        except OSError:
            return ("udp", address)
    for kind, addresses in (("tcp", config.tcp), ("tls", config.tls)):
        for host, port in addresses:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen(1)
            except OSError:
                return (kind, (host, port))
            finally:
                sock.close()
    return None


def _log_stats(server: RelayServer) -> None:
    stats = server.core.stats
    log.info(
        "relay stats",
        extra={
            "peers": server.core.peer_count,
            "boxes": server.core.box_count,
            "streams": len(server.streams),
            "forwarded": stats.forwarded,
            "forwarded_bytes": stats.forwarded_bytes,
            "registrations": stats.registrations,
            "stun": stats.stun,
            "drops": sum(stats.drops.values()),
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(_apply_env(parser, argv))
        config = build_config(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"lazycat-relay: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level)
    default_udp = not (args.udp or args.tcp or args.tls)
    try:
        return int(run(serve(config, args.stats_interval, default_udp)))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


if __name__ == "__main__":
    sys.exit(main())
