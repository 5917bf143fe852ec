"""``lazycat-client``: the reference client. Pair with a box, bring the tunnel up, show it.

::

    lazycat-client pair '<code>'          first contact: XK handshake with the code's secret
    lazycat-client up --mode tun          IK session, TUN lzc0 + fc03:1136:3800::/40, DNS at
                                          fc03:1136:3800::1 (root / CAP_NET_ADMIN)
    lazycat-client up --mode proxy        IK session, HTTP proxy on 127.0.0.1:31085 for
                                          *.heiyu.space; the TUN lives in a private network
                                          namespace: the host's routes and DNS stay as they are
                                          (root / CAP_SYS_ADMIN + CAP_NET_ADMIN)
    lazycat-client status [--json]        path, endpoint, RTT, bytes, NAT type of the running `up`
    lazycat-client netcheck [--json]      NAT type and relay latencies (the box's relays)
    lazycat-client down                   stop `up`; the TUN (and its namespace) go with it

Pairing (ARCHITECTURE.md, "Pairing"): the code is a ``lazycat://pair?...`` bundle
(``transport.bundle``). The client makes (once) its device key, registers at the code's relays
with the code's pairing ticket, and opens an XK session to the box carrying the secret and its
facts (name, OS, model, client version). The box answers with PAIR_STATE frames: PENDING while
the owner decides, then APPROVED with our overlay address, or REJECTED / REFUSED with a reason.

The code's pairing ticket (without one a relay forwards nothing) is presented to the relays,
and its LAN addresses are tried directly as well.

``up`` runs in the foreground (``--background`` starts itself again detached, logging to
``up.log``); it writes ``up.pid`` and rewrites ``state.json`` every second for ``status``.
Everything it keeps is described in ``transport.client_config``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from ipaddress import IPv6Address
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from transport import negotiation, wire
from transport.addressing import CLIENT_LOCAL, OVERLAY, RESOLVER, box_address, box_prefix
from transport.bundle import BundleError, PairingBundle, Relay
from transport.client_config import ClientConfig, ConfigError, Paired, default_dir
from transport.control_aio import DeviceControl
from transport.paths import Candidate, CandidateKind, Direct, is_lan_address
from transport.peer import (
    Connected,
    Disconnected,
    FrameReceived,
    PacketReceived,
    PathChanged,
    Peer,
    PeerEvent,
)
from transport.peer_aio import Gatherer, PeerDriver, gather

if TYPE_CHECKING:
    from transport.tun import Tun

__all__ = ["UserError", "device_facts", "main", "run_pair", "run_up"]

log = logging.getLogger("lazycat.client")

ZONE = "heiyu.space"
CONFIG_WAIT = 3.0  # seconds `pair` waits for the box's configuration after the approval
PROXY_HOST, PROXY_PORT = "127.0.0.1", 31085  # proxy mode's default listen address


class UserError(Exception):
    """Something the user can fix; the message says how. Exit status 1 (2 for usage)."""


def client_version() -> str:
    try:
        return metadata.version("lazycat")
    except metadata.PackageNotFoundError:
        return "0.0.0+source"


def device_facts() -> dict[str, str]:
    """What the box's owner sees in the pending request (``DeviceFacts`` on the box)."""
    model = ""
    for name in ("product_name", "board_name"):
        with contextlib.suppress(OSError):
            model = Path(f"/sys/class/dmi/id/{name}").read_text().strip()
            if model:
                break
    if not model:
        model = platform.machine()
    system = platform.system()
    if system == "Linux":
        with contextlib.suppress(OSError):
            release = platform.freedesktop_os_release()
            system = release.get("PRETTY_NAME", system)
    else:
        system = f"{system} {platform.release()}".strip()
    return {
        "name": socket.gethostname()[:100],
        "os": system[:64],
        "model": model[:100],
        "client_version": client_version()[:32],
    }


# --- the driver both commands use -----------------------------------------------------------


async def _start_driver(
    keys_peer: Peer,
    relays: Sequence[Relay],
    tickets: Sequence[bytes],
    *,
    relay_transport: str,
    gatherer: Gatherer | None,
    bind: tuple[str, int] = ("::", 0),
    on_packet: Callable[[PacketReceived], object] | None = None,
) -> PeerDriver:
    driver = PeerDriver(keys_peer, bind=bind, gatherer=gatherer, on_packet=on_packet)
    await driver.start()
    try:
        for ticket in tickets:
            driver.add_ticket(ticket)
        for relay in relays:
            if relay_transport == "udp":
                where: str | tuple[str, int] = (relay.host, relay.port)
            else:
                where = f"{relay_transport}://{relay.endpoint}"
            try:
                await driver.add_relay(relay.name, where)
            except OSError as exc:
                print(f"relay {relay.name} ({relay.endpoint}) skipped: {exc}", file=sys.stderr)
    except BaseException:
        await driver.close()
        raise
    return driver


def _lan_candidates(lan: Sequence[tuple[str, int]]) -> list[Candidate]:
    """The pairing code's box addresses: its LAN address — or its public one, when the box
    has one (no NAT): a direct path there is not a LAN path."""
    out = []
    for host, port in lan:
        if is_lan_address(host):
            kind = CandidateKind.LAN
        else:
            kind = CandidateKind.IPV6 if ":" in host else CandidateKind.EGRESS
        out.append(Candidate(kind, Direct(host, port)))
    return out


def apply_config(paired: Paired, config: negotiation.Config) -> bool:
    """Take the box's configuration into ``paired``; True if anything changed."""
    records = {
        name: [IPv6Address(a) for a in addresses] for name, addresses in config.records.items()
    }
    tickets = [config.ticket] if config.ticket is not None else paired.tickets
    if records == paired.records and tickets == paired.tickets:
        return False
    paired.records, paired.tickets = records, tickets
    return True


async def _config_frame(events: Any, box_key: bytes, timeout: float) -> negotiation.Config | None:
    """The configuration frame the box sends right behind its approval, if it comes in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (left := deadline - loop.time()) > 0:
        try:
            event = await events.get(left)
        except TimeoutError:
            return None
        if (
            isinstance(event, FrameReceived)
            and event.peer_key == box_key
            and isinstance(event.frame, wire.Control)
            and event.frame.channel == negotiation.CONFIG_CHANNEL
        ):
            try:
                message = negotiation.parse_box_message(json.loads(event.frame.data))
            except (ValueError, negotiation.NegotiationError):
                return None
            return message if isinstance(message, negotiation.Config) else None
    return None


# --- pair -------------------------------------------------------------------------------------


async def run_pair(
    text: str,
    config: ClientConfig,
    *,
    timeout: float = 600.0,
    relay_transport: str = "udp",
    gatherer: Gatherer | None = gather,
    out: TextIO | None = None,
) -> Paired:
    """Pair with the box of pairing code ``text``; returns what was saved, or raises UserError."""
    out = out or sys.stdout
    try:
        bundle = PairingBundle.parse(text)
    except BundleError as exc:
        raise UserError(f"this pairing code cannot be used: {exc}") from None
    if bundle.is_expired(time.time()):
        raise UserError(
            "this pairing code has expired: show a new one in the box's console (Devices → Pair)"
        )
    tickets = [bundle.ticket] if bundle.ticket else []
    lan = list(bundle.lan)
    existing = config.load_box()
    if existing is not None and existing.box_key != bundle.box_key:
        raise UserError(
            f"this device is already paired with {existing.box}; "
            f"remove {config.box_file} first to pair with {bundle.box}"
        )
    keys = config.load_or_create_key()
    loop = asyncio.get_running_loop()
    peer = Peer(keys, now=loop.time())
    driver = await _start_driver(
        peer, bundle.relays, tickets, relay_transport=relay_transport, gatherer=gatherer
    )
    events = driver.subscribe()
    try:
        if lan:
            driver.set_remote_candidates(bundle.box_key, _lan_candidates(lan))
        driver.pair(bundle.box_key, bundle.secret, device_facts())
        print(f"asking {bundle.box} to pair; waiting for approval…", file=out, flush=True)
        reached = False
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                event = await events.get(left)
            except TimeoutError:
                break
            if isinstance(event, Connected) and event.peer_key == bundle.box_key:
                reached = True
                continue
            if not (
                isinstance(event, FrameReceived)
                and event.peer_key == bundle.box_key
                and isinstance(event.frame, wire.PairStateFrame)
            ):
                continue
            frame = event.frame
            reached = True
            if frame.state is wire.PairState.PENDING:
                note = f" ({frame.message})" if frame.message else ""
                print(f"the box has the request; waiting for its owner{note}…", file=out)
                continue
            if frame.state is wire.PairState.REJECTED:
                raise UserError(f"the box's owner rejected this device: {frame.message or '-'}")
            if frame.state is wire.PairState.REFUSED:
                raise UserError(f"the box refused the request: {frame.message or '-'}")
            if frame.address is None:
                raise UserError("the box approved but sent no address: update the box")
            paired = Paired(
                box=bundle.box,
                box_key=bundle.box_key,
                address=frame.address,
                relays=list(bundle.relays),
                tickets=tickets,
                records={f"{bundle.box}.{ZONE}": [box_address(box_prefix(bundle.box_key))]},
                lan=lan,
                paired_at=int(time.time()),
            )
            # Our own relay ticket and the box's names follow the approval in a moment; without
            # them (an older box, a lost datagram) `up` asks again once connected.
            box_config = await _config_frame(events, bundle.box_key, CONFIG_WAIT)
            if box_config is not None:
                apply_config(paired, box_config)
            config.save_box(paired)
            print(
                f"approved: this device is {frame.address} on {bundle.box}.\n"
                "Next: sudo lazycat-client up --mode tun",
                file=out,
            )
            return paired
        if not reached:
            names = ", ".join(r.endpoint for r in bundle.relays)
            raise UserError(
                f"could not reach {bundle.box} through its relays ({names}) in {timeout:.0f} s: "
                "check this network lets UDP out (lazycat-client netcheck), or try "
                "--relay-transport tcp"
            )
        raise UserError(
            f"no decision from {bundle.box} within {timeout:.0f} s: ask the owner to approve "
            "the device in the console, then run pair again with a new code"
        )
    finally:
        events.close()
        await driver.close()


# --- up ---------------------------------------------------------------------------------------


class _Status:
    """What ``up`` knows for ``status``; written to state.json every second. ``local`` holds
    what the mode set up on this machine (``tun`` and ``resolver``, or ``proxy``)."""

    def __init__(self, paired: Paired, mode: str, local: dict[str, Any], started: float) -> None:
        self.state: dict[str, Any] = {
            "pid": os.getpid(),
            "mode": mode,
            "box": paired.box,
            "address": str(paired.address),
            **local,
            "started_at": int(started),
            "connected": False,
            "path": "offline",
            "endpoint": "",
            "relay": "",
            "rtt_ms": None,
            "path_cause": "",
            "nat_type": None,
        }

    def on_event(self, event: PeerEvent) -> None:
        if isinstance(event, Connected):
            self.state["connected"] = True
        elif isinstance(event, Disconnected):
            self.state.update(connected=False, path="offline", path_cause=event.reason)
        elif isinstance(event, PathChanged):
            self.state.update(
                path=event.kind,
                endpoint=event.endpoint,
                relay=event.relay,
                rtt_ms=event.rtt_ms,
                path_cause=event.cause,
            )


def _tun_problem(exc: Exception) -> str:
    """What went wrong configuring the TUN, in words that say what to do."""
    text = str(getattr(exc, "strerror", None) or exc)
    try:
        disabled = Path("/proc/sys/net/ipv6/conf/all/disable_ipv6").read_text().strip() == "1"
    except OSError:
        disabled = False
    if disabled:
        return (
            f"{text}: IPv6 is disabled on this host (net.ipv6.conf.all.disable_ipv6=1), and the "
            "overlay is IPv6. Enable it: sudo sysctl -w net.ipv6.conf.all.disable_ipv6=0 "
            "(an IPv4-only network is fine; only the host's IPv6 stack is needed)"
        )
    return text


def _is_tunnel_packet(packet: bytes) -> bool:
    """An IPv6 packet for the overlay (not client-local: the resolver answers those itself)."""
    if len(packet) < 40 or packet[0] >> 4 != 6:
        return False
    destination = IPv6Address(packet[24:40])
    return destination in OVERLAY and destination not in CLIENT_LOCAL


Dialer = Callable[[IPv6Address, int], Awaitable[socket.socket]]


@dataclass
class _Local:
    """What a mode puts on this machine around the tunnel (its clean-up is on the exit stack):
    the TUN that carries the overlay's packets, how names are answered (``set_records``),
    how the control socket reaches the box (``dialer``; None: through the host's routes),
    what ``status`` shows, and the line ``up`` prints."""

    tun: Tun
    set_records: Callable[[Mapping[str, list[IPv6Address]]], None]
    dialer: Dialer | None
    state: dict[str, Any]
    banner: str


async def _tun_mode(stack: contextlib.AsyncExitStack, paired: Paired, tun_name: str) -> _Local:
    """TUN ("global") mode: ``lzc0`` on the host with the overlay route, DNS on RESOLVER."""
    from transport import dns
    from transport.tun import Tun, TunError

    loop = asyncio.get_running_loop()
    try:
        tun = Tun.open(tun_name)
    except TunError as exc:
        raise UserError(str(exc.strerror or exc)) from None
    stack.callback(tun.close)
    try:
        await loop.run_in_executor(None, lambda: tun.configure([paired.address, RESOLVER]))
    except TunError as exc:
        raise UserError(_tun_problem(exc)) from None
    responder = dns.Responder(paired.records)
    resolver = await dns.serve(responder)
    stack.callback(resolver.close)
    banner = (
        f"up: {tun.name} {paired.address}, route {OVERLAY}, DNS {RESOLVER} "
        f"(*.{paired.box}.{ZONE}); connecting to {paired.box}…"
    )
    state = {"tun": tun.name, "resolver": str(RESOLVER)}
    return _Local(tun, responder.set_records, None, state, banner)


async def _proxy_mode(
    stack: contextlib.AsyncExitStack,
    paired: Paired,
    tun_name: str,
    listen: tuple[str, int],
) -> _Local:
    """Proxy ("client") mode: the TUN, our address and the overlay route in a private network
    namespace (``transport/netns.py``), and an HTTP proxy on ``listen`` whose upstream
    sockets are made there. Nothing on the host's routes, interfaces or DNS changes."""
    from transport.netns import NetnsError, PrivateNetns
    from transport.proxy_aio import Names, Proxy
    from transport.tun import TunError

    loop = asyncio.get_running_loop()
    try:
        netns = await loop.run_in_executor(None, PrivateNetns.create)
    except NetnsError as exc:
        raise UserError(str(exc.strerror or exc)) from None
    stack.callback(netns.close)
    try:
        tun = await loop.run_in_executor(None, lambda: netns.open_tun(tun_name, [paired.address]))
    except TunError as exc:  # the namespace's own IPv6 is on: _tun_problem's advice is moot
        raise UserError(str(exc.strerror or exc)) from None
    stack.callback(tun.close)
    names = Names(paired.records, box=paired.box)
    proxy = Proxy(names, netns.dial)
    try:
        where = await proxy.start(*listen)
    except OSError as exc:
        raise UserError(
            f"the proxy cannot listen on {listen[0]}:{listen[1]}: {exc.strerror or exc} "
            "(another program has that port? choose one with --proxy-listen)"
        ) from None
    stack.push_async_callback(proxy.close)
    banner = (
        f"up: HTTP proxy on {where} for *.{paired.box}.{ZONE} (this host's routes and DNS "
        f"are untouched); use it with: curl --proxy http://{where} "
        f"http://<name>.{paired.box}.{ZONE}/ ; connecting to {paired.box}…"
    )
    state = {"tun": tun.name, "netns": "private", "proxy": where}
    return _Local(tun, names.set_records, netns.dial, state, banner)


async def run_up(
    config: ClientConfig,
    *,
    mode: str = "tun",
    tun_name: str = "lzc0",
    proxy_listen: tuple[str, int] = (PROXY_HOST, PROXY_PORT),
    relay_transport: str = "udp",
    stop: asyncio.Event | None = None,
    gatherer: Gatherer | None = gather,
) -> None:
    """Bring the tunnel up and keep it until ``stop`` is set (SIGINT / SIGTERM in the CLI).

    Both modes share everything but what :func:`_tun_mode` / :func:`_proxy_mode` put on this
    machine: the driver and its relays, the control socket, the box's configuration (names
    reach the DNS responder or the proxy live), state.json and up.pid."""
    from transport import netcheck_aio

    paired = config.load_box()
    if paired is None:
        raise UserError(
            "not paired yet: run lazycat-client pair '<code>' with a code from the box's console"
        )
    if (pid := config.running_pid()) is not None and pid != os.getpid():
        raise UserError(f"lazycat-client up is already running (pid {pid}): see status, or down")
    keys = config.load_key()
    loop = asyncio.get_running_loop()
    started = loop.time()  # what the path lines count from
    stop = stop or asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        if mode == "proxy":
            local = await _proxy_mode(stack, paired, tun_name, proxy_listen)
        else:
            local = await _tun_mode(stack, paired, tun_name)
        tun = local.tun
        stack.callback(config.remove, config.pid_file)
        stack.callback(config.remove, config.state_file)
        status = _Status(paired, mode, local.state, time.time())
        driver = await _start_driver(
            Peer(keys, now=loop.time()),
            paired.relays,
            paired.tickets,
            relay_transport=relay_transport,
            gatherer=gatherer,
            on_packet=lambda event: tun.write(event.packet),
        )
        stack.push_async_callback(driver.close)
        driver.callbacks.append(status.on_event)

        def show_path(event: PeerEvent) -> None:
            if isinstance(event, PathChanged):
                log.info(
                    "path",
                    extra={
                        "kind": event.kind,
                        "where": event.endpoint or f"relay {event.relay}",
                        "cause": event.cause,
                        "since_up": round(loop.time() - started, 3),
                    },
                )

        driver.callbacks.append(show_path)
        if paired.lan:
            driver.set_remote_candidates(paired.box_key, _lan_candidates(paired.lan))
        box_key = paired.box_key
        known_tickets = set(paired.tickets)

        def on_config(box_config: negotiation.Config) -> None:
            if not apply_config(paired, box_config):
                return
            local.set_records(paired.records)
            for ticket in paired.tickets:
                if ticket not in known_tickets:
                    known_tickets.add(ticket)
                    with contextlib.suppress(wire.WireError):
                        driver.add_ticket(ticket)
            config.save_box(paired)
            status.state["config_at"] = time.time()

        control = DeviceControl(
            driver,
            box_key,
            box_address(box_prefix(box_key)),
            version=client_version(),
            on_config=on_config,
            dialer=local.dialer,
        )
        control.start()
        stack.push_async_callback(control.close)
        send = driver.send_packet

        def from_tun(packet: bytes) -> None:
            if _is_tunnel_packet(packet):
                send(box_key, packet)

        tun.start(from_tun)
        driver.connect(box_key)
        config.write(config.pid_file, f"{os.getpid()}\n".encode())

        async def nat_check() -> None:
            servers = [(r.host, r.port) for r in paired.relays]
            relays = [(r.name, (r.host, r.port)) for r in paired.relays]
            with contextlib.suppress(Exception):
                report = await netcheck_aio.run_netcheck(servers, relays)
                status.state["nat_type"] = str(report.nat_type)
                control.report_netcheck(report.to_json())

        async def write_state() -> None:
            while True:
                status.state.update(
                    updated_at=time.time(),
                    rx_bytes=driver.stats["rx_bytes"],
                    tx_bytes=driver.stats["tx_bytes"],
                    rx_packets=driver.stats["rx_packets"],
                    tx_packets=driver.stats["tx_packets"],
                    local=f"{driver.local_address[0]}:{driver.port}",
                    control="open" if control.socket_open else "closed",
                    punches=control.stats["punches"],
                )
                config.save_state(status.state)
                await asyncio.sleep(1.0)

        for job in (nat_check(), write_state()):
            stack.push_async_callback(_cancel, loop.create_task(job))
        print(local.banner, flush=True)
        await stop.wait()


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# --- the commands -----------------------------------------------------------------------------


def _run(coro: Any) -> Any:
    from transport.relay_aio import run

    return run(coro)


def cmd_pair(args: argparse.Namespace, config: ClientConfig) -> int:
    if args.code == "-":
        args.code = sys.stdin.readline()
    _run(run_pair(args.code, config, timeout=args.timeout, relay_transport=args.relay_transport))
    return 0


def _log_to_stderr(level: str) -> None:
    """``up`` is a daemon: its log lines (logfmt, like the box's) go to stderr / up.log."""
    from transport.logfmt import LogfmtFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("pyroute2", "websockets", "asyncio"):  # their debug is about their internals
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))


def cmd_up(args: argparse.Namespace, config: ClientConfig) -> int:
    from transport.proxy_aio import parse_listen

    try:
        listen = parse_listen(args.proxy_listen, allow_remote=args.proxy_allow_remote)
    except ValueError as exc:
        raise UserError(f"--proxy-listen: {exc}") from None
    if config.load_box() is None:
        raise UserError(
            "not paired yet: run lazycat-client pair '<code>' with a code from the box's console"
        )
    if args.background:
        argv = [sys.executable, "-m", "transport.client_cli", "--config-dir", str(config.path)]
        argv += ["up", "--mode", args.mode, "--tun", args.tun]
        argv += ["--proxy-listen", args.proxy_listen] + (
            ["--proxy-allow-remote"] if args.proxy_allow_remote else []
        )
        argv += ["--relay-transport", args.relay_transport, "--log-level", args.log_level]
        config.ensure()
        fd = os.open(config.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as log:
            child = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        for _ in range(50):  # up to 5 s for the TUN and the pid file
            time.sleep(0.1)
            if child.poll() is not None:
                raise UserError(f"up stopped at once (see {config.log_file})")
            if config.running_pid() == child.pid:
                print(f"up: running in the background (pid {child.pid}, log {config.log_file})")
                return 0
        print(f"up: started (pid {child.pid}); see lazycat-client status")
        return 0

    _log_to_stderr(args.log_level)

    async def foreground() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_up(
            config,
            mode=args.mode,
            tun_name=args.tun,
            proxy_listen=listen,
            relay_transport=args.relay_transport,
            stop=stop,
        )

    _run(foreground())
    return 0


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def cmd_status(args: argparse.Namespace, config: ClientConfig) -> int:
    paired = config.load_box()
    pid = config.running_pid()
    state = config.load_state() if pid is not None else None
    report: dict[str, Any] = {
        "paired": paired is not None,
        "box": paired.box if paired else None,
        "address": str(paired.address) if paired else None,
        "running": state is not None,
    }
    if state is not None:
        report.update({k: v for k, v in state.items() if k not in report})
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if state is not None else 3
    if paired is None:
        print("not paired: run lazycat-client pair '<code>' with a code from the box's console")
        return 3
    if state is None:
        print(f"paired with {paired.box} as {paired.address}; not running (lazycat-client up)")
        return 3
    path = state.get("path", "offline")
    if path == "offline":
        where = "connecting…" if not state.get("connected") else "offline"
    elif path == "relay":
        where = f"relayed via {state.get('relay')} (yellow)"
    else:
        rtt = state.get("rtt_ms")
        where = f"direct ({path}) to {state.get('endpoint')}" + (
            f", {rtt:.1f} ms" if isinstance(rtt, (int, float)) else ""
        )
    print(f"{paired.box}: {where}")
    if state.get("mode") == "proxy":
        proxy = state.get("proxy")
        print(f"  mode         proxy: http://{proxy} for *.{paired.box}.{ZONE}")
        print(f"               (curl --proxy http://{proxy} http://{paired.box}.{ZONE}/)")
        where_tun = f"{state.get('tun')} in a private network namespace"
    else:
        print(f"  mode         tun: {state.get('tun')}, DNS {state.get('resolver')}")
        where_tun = str(state.get("tun"))
    print(f"  this device  {state.get('address')} on {where_tun}, pid {state.get('pid')}")
    if state.get("path_cause"):
        print(f"  why          {state['path_cause']}")
    print(f"  traffic      {state.get('tx_bytes', 0)} B out, {state.get('rx_bytes', 0)} B in")
    print(f"  NAT          {state.get('nat_type') or 'not checked yet'}")
    if isinstance(state.get("updated_at"), (int, float)):
        print(f"  updated      {_ago(max(0.0, time.time() - state['updated_at']))}")
    return 0


def cmd_netcheck(args: argparse.Namespace, config: ClientConfig) -> int:
    from transport.netcheck_aio import run_netcheck

    paired = config.load_box()
    if paired is None:
        raise UserError(
            "not paired yet: netcheck uses the box's relays; run lazycat-client pair '<code>'"
        )
    servers = [(r.host, r.port) for r in paired.relays]
    relays = [(r.name, (r.host, r.port)) for r in paired.relays]
    report = _run(run_netcheck(servers, relays))
    print(json.dumps(report.to_json(), indent=2) if args.json else report.summary())
    return 0


def cmd_down(args: argparse.Namespace, config: ClientConfig) -> int:
    pid = config.running_pid()
    state = (config.load_state() or {}) if pid is not None else {}
    if pid is None:
        config.remove(config.pid_file)
        config.remove(config.state_file)
        with contextlib.suppress(Exception):
            from transport.tun import remove_interface

            if remove_interface(args.tun):
                print(f"removed a leftover {args.tun}")
                return 0
        print("not running")
        return 0
    try:
        os.kill(pid, signal.SIGTERM)
    except PermissionError:
        raise UserError(f"up runs as another user (pid {pid}): run down with sudo") from None
    for _ in range(100):
        time.sleep(0.05)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            if state.get("mode") == "proxy":
                gone = f"the proxy on {state.get('proxy')} and its private namespace are gone"
            else:
                gone = f"{state.get('tun') or args.tun} and its route are gone"
            print(f"down: stopped (pid {pid}); {gone}")
            return 0
    raise UserError(f"up (pid {pid}) did not stop within 5 s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazycat-client", description="Pair with a lazycat box and reach its services."
    )
    parser.add_argument("--config-dir", type=Path, help="default: ~/.config/lazycat-client")
    sub = parser.add_subparsers(dest="command", required=True)
    pair = sub.add_parser("pair", help="pair this device with a box")
    pair.add_argument("code", help="the lazycat://pair?... code from the console ('-': stdin)")
    pair.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (600)")
    up = sub.add_parser("up", help="bring the tunnel up")
    up.add_argument("--mode", choices=("tun", "proxy"), default="tun")
    up.add_argument("--tun", default="lzc0", help="the TUN interface's name (lzc0)")
    up.add_argument(
        "--proxy-listen",
        default=f"{PROXY_HOST}:{PROXY_PORT}",
        metavar="HOST:PORT",
        help=f"proxy mode: where the HTTP proxy listens ({PROXY_HOST}:{PROXY_PORT}; loopback)",
    )
    up.add_argument(
        "--proxy-allow-remote",
        action="store_true",
        help="proxy mode: allow a non-loopback --proxy-listen (anyone reaching it uses this "
        "device's access to the box: there is no password)",
    )
    up.add_argument("--background", action="store_true", help="detach; log to up.log")
    up.add_argument(
        "--log-level", choices=("debug", "info", "warning"), default="info", help="(info)"
    )
    for command in (pair, up):
        command.add_argument(
            "--relay-transport",
            choices=("udp", "tcp", "tls", "ws", "wss"),
            default="udp",
            help="how to reach the relays (udp; tcp/ws when UDP is blocked)",
        )
    status = sub.add_parser("status", help="the tunnel's path, RTT, bytes")
    status.add_argument("--json", action="store_true")
    netcheck = sub.add_parser("netcheck", help="NAT type and relay latencies")
    netcheck.add_argument("--json", action="store_true")
    down = sub.add_parser("down", help="stop the tunnel")
    down.add_argument("--tun", default="lzc0")
    return parser


COMMANDS = {
    "pair": cmd_pair,
    "up": cmd_up,
    "status": cmd_status,
    "netcheck": cmd_netcheck,
    "down": cmd_down,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = ClientConfig(args.config_dir or default_dir(os.environ))
    try:
        return COMMANDS[args.command](args, config)
    except (UserError, ConfigError) as exc:
        print(f"lazycat-client: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
