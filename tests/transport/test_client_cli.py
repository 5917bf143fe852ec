"""``lazycat-client``: the config directory, ``pair`` against a real box Peer (run in this
process on loopback, behind a real ``RelayServer``), ``status --json`` and the friendly errors.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

import pytest

from transport import wire
from transport.addressing import box_address, box_prefix, device_address
from transport.bundle import PairingBundle, Relay
from transport.client_cli import UserError, device_facts, main, run_pair
from transport.client_config import ClientConfig, default_dir
from transport.paths import Candidate, CandidateKind, Direct
from transport.peer import PairingRequested, Peer
from transport.peer_aio import PeerDriver
from transport.relay_aio import RelayServer, ServerConfig
from transport.session import Keys
from transport.tickets import TicketKey

LOOPBACK = ("127.0.0.1", 0)
SECRET = bytes(range(16))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@dataclass
class Box:
    driver: PeerDriver
    code: str
    requests: list[PairingRequested]

    @property
    def key(self) -> bytes:
        return self.driver.peer.keys.public


async def start_box(answers: list[wire.PairStateFrame | None]) -> tuple[RelayServer, Box]:
    """A relay and a box that answers each pairing request with ``answers`` in order (an
    address of None in an APPROVED frame is replaced by the device's derived address)."""
    relay = RelayServer(ServerConfig(udp=[LOOPBACK]))
    await relay.start()
    loop = asyncio.get_running_loop()
    ticket_key = TicketKey.generate()
    keys = Keys.generate()
    peer = Peer(keys, now=loop.time(), allow_pairing=True, ticket_public=ticket_key.public_bytes())

    def loopback(port: int) -> list[Candidate]:
        return [Candidate(CandidateKind.LAN, Direct("127.0.0.1", port))]

    driver = PeerDriver(peer, gatherer=loopback, poll_interval=0)
    await driver.start()
    host, port = relay.addresses["udp"][0]
    await driver.add_relay("r1", (host, port))
    wall = int(time.time())
    ticket = ticket_key.issue(wire.peer_id(keys.public), wire.ANY_CLIENT, wall + 600, now_wall=wall)
    bundle = PairingBundle(
        "mybox", keys.public, (Relay("r1", host, port),), SECRET, wall + 600, ticket=ticket.encode()
    )
    box = Box(driver, bundle.to_text(), [])

    def on_event(event: object) -> None:
        if isinstance(event, PairingRequested) and not box.requests:
            box.requests.append(event)
            for answer in answers:
                if answer is None:
                    continue
                if answer.state is wire.PairState.APPROVED and answer.address is None:
                    address = device_address(keys.public, event.peer_key, taken=set())
                    answer = wire.PairStateFrame(answer.state, address, answer.message)
                driver.send_frame(event.peer_key, answer, pattern=wire.Pattern.XK)

    driver.callbacks.append(on_event)
    return relay, box


@pytest.fixture
async def approving_box() -> AsyncIterator[Box]:
    relay, box = await start_box(
        [
            wire.PairStateFrame(wire.PairState.PENDING, None, "shown to the owner"),
            wire.PairStateFrame(wire.PairState.APPROVED, None, ""),
        ]
    )
    try:
        yield box
    finally:
        await box.driver.close()
        await relay.stop()


async def test_pair_saves_the_key_and_the_box_privately(approving_box: Box, tmp_path: Path) -> None:
    config = ClientConfig(tmp_path / "cfg" / "lazycat-client")
    out = io.StringIO()
    async with asyncio.timeout(15):
        paired = await run_pair(approving_box.code, config, timeout=10, gatherer=None, out=out)
    [request] = approving_box.requests
    device_key = config.load_key().public
    assert request.peer_key == device_key and request.secret == SECRET
    assert set(request.facts) == {"name", "os", "model", "client_version"}
    assert paired.address == device_address(approving_box.key, device_key, taken=set())
    text = out.getvalue()
    assert "waiting for approval" in text and "shown to the owner" in text
    assert f"approved: this device is {paired.address}" in text
    # what is on disk, and who may read it
    assert mode(config.path) == 0o700
    assert mode(config.key_file) == 0o600 and mode(config.box_file) == 0o600
    saved = json.loads(config.box_file.read_text())
    assert saved["address"] == str(paired.address) and saved["box"] == "mybox"
    assert saved["records"] == {
        "mybox.heiyu.space": [str(box_address(box_prefix(approving_box.key)))]
    }
    assert config.load_box() == paired
    assert [f.name for f in config.path.iterdir() if f.name.startswith(".")] == []


async def test_a_rejected_device_hears_why(tmp_path: Path) -> None:
    relay, box = await start_box([wire.PairStateFrame(wire.PairState.REJECTED, None, "not mine")])
    config = ClientConfig(tmp_path)
    try:
        async with asyncio.timeout(15):
            with pytest.raises(UserError, match="rejected this device: not mine"):
                await run_pair(box.code, config, timeout=10, gatherer=None, out=io.StringIO())
        assert config.load_box() is None
    finally:
        await box.driver.close()
        await relay.stop()


async def test_a_box_that_never_answers_times_out_with_advice(tmp_path: Path) -> None:
    relay, box = await start_box([])
    try:
        async with asyncio.timeout(10):
            with pytest.raises(UserError, match="no decision from mybox within 1 s"):
                await run_pair(box.code, ClientConfig(tmp_path), timeout=1, gatherer=None)
    finally:
        await box.driver.close()
        await relay.stop()


def test_bad_and_expired_codes_say_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config-dir", str(tmp_path), "pair", "hello"]) == 1
    assert "this pairing code cannot be used" in capsys.readouterr().err
    expired = PairingBundle("mybox", bytes(32), (Relay("r1", "192.0.2.1", 443),), SECRET, 1000)
    assert main(["--config-dir", str(tmp_path), "pair", expired.to_text()]) == 1
    assert "expired" in capsys.readouterr().err
    assert main(["--config-dir", str(tmp_path), "pair", expired.to_text() + "&ticket=AAAA"]) == 1
    assert "the ticket must be 104 bytes" in capsys.readouterr().err


def test_up_before_pairing_and_proxy_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config-dir", str(tmp_path), "up", "--mode", "tun"]) == 1
    assert "not paired yet: run lazycat-client pair '<code>'" in capsys.readouterr().err
    assert main(["--config-dir", str(tmp_path), "up", "--mode", "proxy"]) == 1
    assert "not paired yet" in capsys.readouterr().err
    # the proxy has no password: listening beyond loopback needs saying so
    argv = ["--config-dir", str(tmp_path), "up", "--mode", "proxy", "--proxy-listen"]
    assert main([*argv, "0.0.0.0:31085"]) == 1
    assert "--proxy-allow-remote" in capsys.readouterr().err
    assert main([*argv, "nonsense"]) == 1
    assert "--proxy-listen: 'nonsense' is not HOST:PORT" in capsys.readouterr().err
    assert main(["--config-dir", str(tmp_path), "netcheck"]) == 1
    assert "not paired yet" in capsys.readouterr().err


def test_status_json_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = ClientConfig(tmp_path)
    assert main(["--config-dir", str(tmp_path), "status", "--json"]) == 3
    assert json.loads(capsys.readouterr().out) == {
        "paired": False,
        "box": None,
        "address": None,
        "running": False,
    }
    from transport.client_config import Paired

    paired = Paired("mybox", bytes(32), IPv6Address("fc03:1136:38ab:cdef:1::5"), [])
    config.save_box(paired)
    # a running `up` (this process stands in for it: its pid is alive)
    config.write(config.pid_file, f"{os.getpid()}\n".encode())
    config.save_state(
        {
            "pid": os.getpid(),
            "mode": "tun",
            "tun": "lzc0",
            "address": str(paired.address),
            "connected": True,
            "path": "direct-v4",
            "endpoint": "198.51.100.20:41641",
            "relay": "",
            "rtt_ms": 12.5,
            "rx_bytes": 100,
            "tx_bytes": 200,
            "nat_type": "port-restricted",
            "updated_at": time.time(),
        }
    )
    assert main(["--config-dir", str(tmp_path), "status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["running"] is True and report["paired"] is True
    assert (report["path"], report["endpoint"], report["rtt_ms"]) == (
        "direct-v4",
        "198.51.100.20:41641",
        12.5,
    )
    assert {"rx_bytes", "tx_bytes", "nat_type", "relay", "tun"} <= set(report)
    assert main(["--config-dir", str(tmp_path), "status"]) == 0
    text = capsys.readouterr().out
    assert "direct (direct-v4) to 198.51.100.20:41641, 12.5 ms" in text


def test_status_in_proxy_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transport.client_config import Paired

    config = ClientConfig(tmp_path)
    config.save_box(Paired("mybox", bytes(32), IPv6Address("fc03:1136:38ab:cdef:1::5"), []))
    config.write(config.pid_file, f"{os.getpid()}\n".encode())  # this process stands in for up
    state = {"pid": os.getpid(), "mode": "proxy", "tun": "lzc0", "netns": "private"}
    config.save_state({**state, "proxy": "127.0.0.1:31085", "path": "relay", "relay": "r1"})
    assert main(["--config-dir", str(tmp_path), "status"]) == 0
    text = capsys.readouterr().out
    assert "mybox: relayed via r1 (yellow)" in text
    assert "mode         proxy: http://127.0.0.1:31085 for *.mybox.heiyu.space" in text
    assert "(curl --proxy http://127.0.0.1:31085 http://mybox.heiyu.space/)" in text
    assert "on lzc0 in a private network namespace" in text
    assert main(["--config-dir", str(tmp_path), "status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["mode"], report["proxy"], report["netns"]) == (
        "proxy",
        "127.0.0.1:31085",
        "private",
    )


def test_default_dir_follows_xdg() -> None:
    assert default_dir({"XDG_CONFIG_HOME": "/x/cfg", "HOME": "/h"}) == Path("/x/cfg/lazycat-client")
    assert default_dir({"XDG_CONFIG_HOME": "rel", "HOME": "/h"}) == Path(
        "/h/.config/lazycat-client"
    )


def test_an_existing_loose_directory_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "c"
    path.mkdir(mode=0o755)
    ClientConfig(path).load_or_create_key()
    assert mode(path) == 0o700 and mode(path / "device.key") == 0o600


def test_device_facts_fit_the_box_limits() -> None:
    facts = device_facts()
    limits = {"name": 100, "os": 64, "model": 100, "client_version": 32}
    assert set(facts) == set(limits)
    assert all(isinstance(v, str) and len(v) <= limits[k] for k, v in facts.items())
    assert facts["name"]


# --- up, for real, in a network namespace ---------------------------------------------------------

UP_CHILD = r"""
import asyncio, json, socket, struct, sys, time
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any
import dns.message
from pyroute2 import IPRoute
from transport import wire
from transport.addressing import RESOLVER, box_address, box_prefix, device_address
from transport.bundle import Relay
from transport.client_cli import run_up
from transport.client_config import ClientConfig, Paired
from transport.peer import Connected, PacketReceived, Peer
from transport.peer_aio import PeerDriver
from transport.relay_aio import RelayServer, ServerConfig
from transport.session import Keys
from transport.tickets import TicketKey

def udp6(src, dst, sport, dport, payload):
    length = 8 + len(payload)
    pseudo = src.packed + dst.packed + struct.pack("!I3xB", length, 17)
    data = pseudo + struct.pack("!HHHH", sport, dport, length, 0) + payload
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    csum = (~total & 0xFFFF) or 0xFFFF
    udp = struct.pack("!HHHH", sport, dport, length, csum) + payload
    return struct.pack("!IHBB", 6 << 28, length, 17, 64) + src.packed + dst.packed + udp

async def main():
    out = {}
    loop = asyncio.get_running_loop()
    relay = RelayServer(ServerConfig(udp=[("127.0.0.1", 0)]))
    await relay.start()
    ticket_key, box_keys, device_keys = TicketKey.generate(), Keys.generate(), Keys.generate()
    box_peer = Peer(box_keys, now=loop.time(), is_allowed={device_keys.public}.__contains__,
                    ticket_public=ticket_key.public_bytes())
    box = PeerDriver(box_peer, gatherer=None, poll_interval=0)
    await box.start()
    events = box.subscribe()
    host, port = relay.addresses["udp"][0]
    await box.add_relay("r1", (host, port))
    wall = int(time.time())
    ticket = ticket_key.issue(wire.peer_id(box_keys.public), wire.peer_id(device_keys.public),
                              wall + 3600, now_wall=wall)
    me = device_address(box_keys.public, device_keys.public, taken=set())
    box_ip = box_address(box_prefix(box_keys.public))
    config = ClientConfig(Path(sys.argv[1]))
    config.write(config.key_file, __import__("base64").b64encode(device_keys.private) + b"\n")
    config.save_box(Paired("mybox", box_keys.public, me, [Relay("r1", host, port)],
                           tickets=[ticket.encode()], records={"mybox.heiyu.space": [box_ip]}))
    stop = asyncio.Event()
    up = loop.create_task(run_up(config, stop=stop, gatherer=None))
    await events.wait_for(lambda e: isinstance(e, Connected), 10)
    out["connected"] = True
    # a program's datagram to the box's overlay address goes through the tunnel
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.sendto(b"hello box", (str(box_ip), 9999))
    got = await events.wait_for(
        lambda e: isinstance(e, PacketReceived) and e.packet[6] == 17, 10)
    p = got.packet
    out["box_got"] = {"src": str(IPv6Address(p[8:24])), "dst": str(IPv6Address(p[24:40])),
                      "payload": p[48:].decode()}
    # and the box's answer comes out of the TUN into a socket
    r = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    r.bind((str(me), 4242)); r.setblocking(False)
    box.send_packet(device_keys.public, udp6(box_ip, me, 7, 4242, b"hello device"))
    data, addr = await asyncio.wait_for(loop.sock_recvfrom(r, 2048), 10)
    out["device_got"] = {"payload": data.decode(), "from": addr[0]}
    # names
    q = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); q.setblocking(False)
    query = dns.message.make_query("mybox.heiyu.space", "AAAA")
    await loop.sock_sendto(q, query.to_wire(), (str(RESOLVER), 53))
    reply = dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(q, 2048), 5))
    out["dns"] = [r.address for r in reply.answer[0]]
    await asyncio.sleep(1.2)
    state = config.load_state()
    out["state"] = {k: state[k] for k in ("connected", "path", "relay", "address", "tun")}
    out["state_bytes"] = state["tx_bytes"] > 0 and state["rx_bytes"] > 0
    stop.set()
    await asyncio.wait_for(up, 10)
    def links():
        with IPRoute() as ipr:  # pyroute2's sync API: not on the loop's thread
            return ipr.link_lookup(ifname="lzc0")
    out["tun_after"] = await loop.run_in_executor(None, links)
    out["files_after"] = sorted(p.name for p in config.path.iterdir())
    await box.close(); await relay.stop()
    print(json.dumps(out))

asyncio.run(main())
"""


def run_child_in_namespace(
    tag: str, child: str, config_dir: Path, timeout: float
) -> dict[str, Any]:
    """Run ``child`` (a Python script given ``config_dir``) in a network namespace of its own,
    deleted by name afterwards; its last stdout line, parsed as JSON. Needs root (skipped
    without it, failing as root or under CI)."""
    import subprocess
    import sys

    from tests.natlab.lab import lab_or_skip

    lab_or_skip(tun=True)
    ns = f"{tag}{os.getpid()}"
    repo = Path(__file__).resolve().parents[2]
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, timeout=10)
        result = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", child, str(config_dir)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=repo,
            env={**os.environ, "PYTHONPATH": str(repo)},
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def test_up_in_a_namespace_tunnels_packets_and_answers_names(tmp_path: Path) -> None:
    out = run_child_in_namespace("lzcu", UP_CHILD, tmp_path / "cfg", timeout=60)
    box_got = out["box_got"]
    assert box_got["payload"] == "hello box" and box_got["dst"].endswith("::1")
    assert out["device_got"] == {"payload": "hello device", "from": box_got["dst"]}
    assert out["dns"] == [box_got["dst"]]
    assert out["state"] == {
        "connected": True,
        "path": "relay",
        "relay": "r1",
        "address": box_got["src"],
        "tun": "lzc0",
    }
    assert out["state_bytes"] is True
    assert out["tun_after"] == []
    assert out["files_after"] == ["box.json", "device.key"]


# --- up --mode proxy, for real: the client inside a namespace (as the NAT lab runs it) ------------

PROXY_CHILD = r"""
import asyncio, json, os, shutil, socket, subprocess, sys, threading, time
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import Any
from websockets.asyncio.server import serve as ws_serve
from transport import negotiation, wire
from transport.addressing import box_address, box_prefix, device_address
from transport.bundle import Relay
from transport.client_cli import run_up
from transport.client_config import ClientConfig, Paired
from transport.peer import Connected, Peer
from transport.peer_aio import PeerDriver
from transport.relay_aio import RelayServer, ServerConfig
from transport.session import Keys
from transport.tickets import TicketKey
from transport.tun import Tun

def snapshot():
    return [subprocess.run(["ip", *a], capture_output=True, check=True).stdout.decode()
            for a in (["route"], ["-6", "route"], ["addr"], ["link"])]

async def http(reader, writer):
    head = await reader.readuntil(b"\r\n\r\n")
    body = json.dumps({"line": head.split(b"\r\n")[0].decode()}).encode()
    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
                 + body)
    await writer.drain(); writer.close()

async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data); await writer.drain()
    writer.close()

async def ask(port, request):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    raw = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    return raw

async def main():
    out = {}
    loop = asyncio.get_running_loop()
    relay = RelayServer(ServerConfig(udp=[("127.0.0.1", 0)]))
    await relay.start()
    ticket_key, box_keys, device_keys = TicketKey.generate(), Keys.generate(), Keys.generate()
    box_peer = Peer(box_keys, now=loop.time(), is_allowed={device_keys.public}.__contains__,
                    ticket_public=ticket_key.public_bytes())
    me = device_address(box_keys.public, device_keys.public, taken=set())
    box_ip = box_address(box_prefix(box_keys.public))
    web_ip = IPv6Address(int(box_ip) + 0x80)
    # the box's end: its own TUN (in this namespace) carries the tunnel's packets to real
    # servers on its addresses, as transportd's lzc0 does
    box_tun = Tun.open("lzb0")
    await loop.run_in_executor(  # pyroute2's sync API: not on the loop's thread
        None, lambda: box_tun.configure([box_ip, web_ip], routes=[IPv6Network(f"{me}/128")]))
    box = PeerDriver(box_peer, gatherer=None, poll_interval=0,
                     on_packet=lambda e: box_tun.write(e.packet))
    await box.start()
    box_tun.start(lambda p: box.send_packet(device_keys.public, p))
    events = box.subscribe()
    host, port = relay.addresses["udp"][0]
    await box.add_relay("r1", (host, port))
    servers = [await asyncio.start_server(http, str(web_ip), 80),
               await asyncio.start_server(echo, str(web_ip), 7)]
    control = await ws_serve(lambda ws: ws.wait_closed(), str(box_ip), negotiation.CONTROL_PORT)
    wall = int(time.time())
    ticket = ticket_key.issue(wire.peer_id(box_keys.public), wire.peer_id(device_keys.public),
                              wall + 3600, now_wall=wall)
    config = ClientConfig(Path(sys.argv[1]))
    config.write(config.key_file, __import__("base64").b64encode(device_keys.private) + b"\n")
    records = {"mybox.heiyu.space": [box_ip], "web.mybox.heiyu.space": [web_ip]}
    config.save_box(Paired("mybox", box_keys.public, me, [Relay("r1", host, port)],
                           tickets=[ticket.encode()], records=records))
    threads = threading.active_count()
    before = snapshot()
    stop = asyncio.Event()
    up = loop.create_task(run_up(config, mode="proxy", proxy_listen=("127.0.0.1", 0),
                                 stop=stop, gatherer=None))
    await events.wait_for(lambda e: isinstance(e, Connected), 10)
    for _ in range(50):
        state = config.load_state()
        if state and state.get("proxy"):
            break
        await asyncio.sleep(0.1)
    proxy_port = int(state["proxy"].rsplit(":", 1)[1])
    started = loop.time()
    raw = await ask(proxy_port, b"GET http://web.mybox.heiyu.space/hi HTTP/1.1\r\nHost: x\r\n\r\n")
    out["http_ms"] = round((loop.time() - started) * 1000, 1)
    out["http"] = [raw.split(b"\r\n")[0].decode(), json.loads(raw.partition(b"\r\n\r\n")[2])]
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    writer.write(b"CONNECT web.mybox.heiyu.space:7 HTTP/1.1\r\n\r\n")
    out["connect"] = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
    blob = os.urandom(200_000)
    writer.write(blob); writer.write_eof()
    out["echo_exact"] = await asyncio.wait_for(reader.read(-1), 20) == blob
    writer.close()
    out["refused"] = (await ask(proxy_port, b"CONNECT web.mybox.heiyu.space:9 HTTP/1.1\r\n\r\n")
                      ).split(b"\r\n")[0].decode()
    out["unknown"] = (await ask(proxy_port, b"CONNECT nope.mybox.heiyu.space:80 HTTP/1.1\r\n\r\n")
                      ).split(b"\r\n")[0].decode()
    out["outside"] = (await ask(proxy_port, b"GET http://example.com/ HTTP/1.1\r\n\r\n")
                      ).split(b"\r\n")[0].decode()
    if shutil.which("curl"):
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--max-time", "10", "--proxytunnel", "--proxy",
            f"http://127.0.0.1:{proxy_port}", "http://web.mybox.heiyu.space/curl",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await curl.communicate()
        out["curl"] = json.loads(stdout)["line"] if curl.returncode == 0 else stderr.decode()
    # the box renames things: the proxy knows at once
    new = negotiation.Config(records={"mybox.heiyu.space": [str(box_ip)],
                                      "new.mybox.heiyu.space": [str(web_ip)]})
    box.send_frame(device_keys.public, wire.Control(
        negotiation.CONFIG_CHANNEL, json.dumps(negotiation.config_message(new)).encode()))
    for _ in range(50):
        await asyncio.sleep(0.1)
        if "new.mybox.heiyu.space" in json.loads(config.box_file.read_text())["records"]:
            break
    raw = await ask(proxy_port, b"GET http://new.mybox.heiyu.space/x HTTP/1.1\r\n\r\n")
    out["renamed"] = raw.split(b"\r\n")[0].decode()
    await asyncio.sleep(1.2)
    state = config.load_state()
    out["state"] = {k: state.get(k) for k in ("mode", "proxy", "connected", "control", "netns")}
    out["during"] = snapshot() == before
    stop.set()
    await asyncio.wait_for(up, 10)
    out["after"] = snapshot() == before
    out["threads"] = threading.active_count() - threads
    out["files_after"] = sorted(p.name for p in config.path.iterdir())
    control.close()
    for server in servers:
        server.close()
    box_tun.close()
    await box.close(); await relay.stop()
    print(json.dumps(out))

asyncio.run(main())
"""


def test_up_in_proxy_mode_serves_the_box_and_leaves_the_host_alone(tmp_path: Path) -> None:
    out = run_child_in_namespace("lzcp", PROXY_CHILD, tmp_path / "cfg", timeout=90)
    assert out["http"] == ["HTTP/1.1 200 OK", {"line": "GET /hi HTTP/1.1"}]
    assert out["connect"] == "HTTP/1.1 200 Connection established\r\n\r\n"
    assert out["echo_exact"] is True
    assert out["refused"] == "HTTP/1.1 502 Bad Gateway"
    assert out["unknown"] == "HTTP/1.1 404 Not Found"
    assert out["outside"] == "HTTP/1.1 403 Forbidden"
    assert out.get("curl", "GET /curl HTTP/1.1") == "GET /curl HTTP/1.1"
    assert out["renamed"] == "HTTP/1.1 200 OK"
    assert out["state"] == {
        "mode": "proxy",
        "proxy": out["state"]["proxy"],
        "connected": True,
        "control": "open",  # the control socket too is dialled from the private namespace
        "netns": "private",
    }
    assert out["state"]["proxy"].startswith("127.0.0.1:")
    assert out["during"] is True and out["after"] is True
    assert out["threads"] == 0
    assert out["files_after"] == ["box.json", "device.key"]
