"""The box's services, reached by name through the real tunnel in the NAT lab (issue 5's proof).

One lab for the module (building it and pairing four devices is most of the time)::

    internet: the relay (192.0.2.10:3480)
    site "home", NAT3, IPv4 only:  box   `lazycat up` (transportd with its TUN and forwarding)
                                   devvm an IPv4-only "developer VM": sshd on 22, TCP and UDP
                                         echo on 7, HTTP on 80 (tests/natlab/svcprobe.py serve)
    site "near", NAT3:  phone (TUN mode, direct), guest (TUN mode, not allowed for devvm),
                        laptop (proxy mode)
    site "far",  NAT4:  tablet (TUN mode, relayed: NAT4 x NAT3 without a port mapping)

The owner exposes, through the console's own form and action (``ServiceForm`` +
``do_save_service``): ``devvm`` (a VM: all ports, only phone, tablet and laptop allowed),
``notes`` (a store app: HTTP on the box's own LAN IPv6 address, port 8080 only, everyone) and
``api`` (a developer app: a TCP service on the box's ``::1``, port 9000 only, everyone).

The devices in TUN mode resolve names with their own resolver (``fc03:1136:3800::1``): the lab
gives their namespaces a ``resolv.conf`` naming it (``Host.use_resolver``). Every probe
connects by name.

Needs root, ``ip``, ``nft``, ``/dev/net/tun``, Debian's ``openssh-server`` and ``curl``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

import pytest

from tests.natlab.lab import PYTHON, RELAY_IPS, SVCPROBE, Host, Lab, lab_or_skip
from tests.natlab.labbox import ECHO, ECHO_CLIENT, LabBox, LabClient
from transport.addressing import RESOLVER

pytestmark = [pytest.mark.natlab, pytest.mark.timeout(300)]

RELAY_PORT = 3480
BOX = "labbox"
ZONE = f"{BOX}.heiyu.space"
DEVVM = f"devvm.{ZONE}"
BOX_LAN6 = "fd00:1136:1::1"  # a ULA the test gives the box's LAN side: the store app's target
PROXY = "http://127.0.0.1:31085"
SSHD = "/usr/sbin/sshd"
TOKEN = "devvm-http-ok"  # the VM's index.html


@dataclass
class World:
    lab: Lab
    root: Path
    box: LabBox
    devvm: Host
    clients: dict[str, LabClient] = field(default_factory=dict)
    hosts: dict[str, Host] = field(default_factory=dict)
    addresses: dict[str, IPv6Address] = field(default_factory=dict)  # devices'
    services: dict[str, IPv6Address] = field(default_factory=dict)

    def probe(self, who: str, *args: str, timeout: float = 30) -> dict[str, Any]:
        """``svcprobe.py ARGS`` in ``who``'s namespace; its JSON line."""
        proc = self.hosts[who].run([PYTHON, str(SVCPROBE), *args], check=False, timeout=timeout)
        try:
            result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            pytest.fail(f"svcprobe {args} in {who}: {proc.stdout}{proc.stderr}{self.logs(who)}")
        return result

    def logs(self, *who: str) -> str:
        parts = [self.clients[w].tail("up", n=1500) for w in who if w in self.clients]
        return "\n".join([*parts, "--- box", self.box.tail(3000)])

    def expose(
        self, name: str, kind: str, target: str, ports: str, allowed: list[str] | None
    ) -> float:
        """``LabBox.expose`` with device names."""
        chosen = None if allowed is None else [self.addresses[w] for w in allowed]
        saved, address = self.box.expose(name, kind, target, ports, chosen)
        self.services[name] = address
        return saved, address


def _start_ready(host: Host, args: list[str], log: Path, text: str = "ready") -> None:
    with log.open("w") as out:
        proc = host.popen(args, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while text not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{args[0]} did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)


def _start_devvm(devvm: Host, root: Path) -> None:
    """sshd, echoes and HTTP on an IPv4-only host, as a VM on the box's LAN would have."""
    keys = root / "devvm-ssh"
    keys.mkdir()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "host_key")],
        check=True,
        timeout=20,
    )
    config = keys / "sshd_config"
    config.write_text(
        f"ListenAddress 0.0.0.0:22\nHostKey {keys / 'host_key'}\nPidFile none\nUsePAM no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
    )
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    # -D: foreground (the lab kills it by PID); -e: log to stderr
    _start_ready(
        devvm, [SSHD, "-D", "-e", "-f", str(config)], root / "sshd.log", "Server listening"
    )
    www = root / "www"
    www.mkdir()
    (www / "index.html").write_text(TOKEN)
    _start_ready(devvm, [PYTHON, str(SVCPROBE), "serve", "--http", str(www)], root / "devvm.log")


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    lab_or_skip(tun=True)
    for tool in (SSHD, "curl", "ssh-keygen"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: make test installs openssh-server and curl")
    root = Path(tempfile.mkdtemp(prefix="lzc-svc-"))
    box: LabBox | None = None
    unclean: list[str] = []
    try:
        with Lab() as lab:
            relay_log = root / "relay.log"
            _start_ready(
                lab.relay,
                [PYTHON, "-m", "transport.relay_cli", "--udp", f"{RELAY_IPS[0]}:{RELAY_PORT}"],
                relay_log,
                "listening",
            )
            home = lab.add_site("home", "NAT3", ipv6=False)
            box_host = home.add_host("box")
            box_host.ipv6_stack_on()
            devvm = home.add_host("devvm", ipv6=False)
            _start_devvm(devvm, root)
            near = lab.add_site("near", "NAT3", ipv6=False)
            far = lab.add_site("far", "NAT4", ipv6=False)
            hosts = {
                "phone": near.add_host("phone"),
                "guest": near.add_host("guest"),
                "laptop": near.add_host("laptop"),
                "tablet": far.add_host("tablet"),
            }
            for name in ("phone", "guest", "tablet"):
                hosts[name].ipv6_stack_on()
                hosts[name].use_resolver(str(RESOLVER))

            box = LabBox(lab, box_host, root, relays=f"home={RELAY_IPS[0]}:{RELAY_PORT}")
            box.start()
            box.setup_box(BOX)
            world = World(lab, root, box, devvm, hosts=hosts | {"box": box_host})
            for name, host in hosts.items():
                client = LabClient(host, root / name)
                client.start_pair(box.pairing_code(), timeout=40)
                world.addresses[name] = box.approve_pending(timeout=30)
                client.wait_paired(timeout=40)
                world.clients[name] = client

            # the store app on the box's LAN IPv6 address, the developer app on its ::1
            box_host.run(
                ["ip", "-6", "addr", "add", f"{BOX_LAN6}/64", "dev", box_host_if(box_host), "nodad"]
            )
            www = root / "notes"
            www.mkdir()
            (www / "index.html").write_text("notes-ok")
            _start_ready(
                box_host,
                [PYTHON, "-m", "http.server", "--bind", BOX_LAN6, "--directory", str(www), "8080"],
                root / "notes.log",
                "Serving HTTP",
            )
            _start_ready(box_host, [PYTHON, "-c", ECHO, "::1", "9000"], root / "api.log")

            world.expose("devvm", "vm", devvm.ip or "", "all", ["phone", "tablet", "laptop"])
            world.expose("notes", "store-app", BOX_LAN6, "tcp 8080", None)
            world.expose("api", "dev-app", "::1", "tcp 9000", None)

            for name in ("phone", "guest", "tablet"):
                world.clients[name].up(mode="tun", timeout=20)
            try:
                yield world
            finally:
                unclean += box.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert not unclean, f"lazycat up did not stop cleanly on SIGTERM; killed: {unclean}"


def box_host_if(host: Host) -> str:
    """The box host's LAN interface (its only veth)."""
    out = host.run(["ip", "-o", "-4", "addr", "show"]).stdout
    for line in out.splitlines():
        fields = line.split()
        if fields[1] != "lo":
            return fields[1]
    raise AssertionError(f"no LAN interface in {out}")


def _wait_path(world: World, who: str, want: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = world.clients[who].status()
        if status.get("path") == want:
            return
        time.sleep(0.3)
    pytest.fail(f"{who}: path {status.get('path')!r}, want {want!r}\n{world.logs(who)}")


def _until_ok(world: World, who: str, *args: str, within: float = 20) -> dict[str, Any]:
    """The first probe sessions can race the tunnel's first handshake: retry a while."""
    deadline = time.monotonic() + within
    result: dict[str, Any] = {}
    while time.monotonic() < deadline:
        result = world.probe(who, *args)
        if result.get("ok"):
            return result
        time.sleep(0.3)
    pytest.fail(f"{who} {args}: {result}\n{world.logs(who)}")


@pytest.mark.parametrize(("who", "path"), [("phone", "direct-v4"), ("tablet", "relay")])
def test_a_device_reaches_the_ipv4_only_vm_by_name_on_every_protocol(
    world: World, who: str, path: str
) -> None:
    _until_ok(world, who, "connect", "--to", DEVVM, "--port", "22")
    _wait_path(world, who, path)
    banner = world.probe(who, "banner", "--to", DEVVM, "--port", "22")
    assert banner["ok"] and banner["line"].startswith("SSH-2.0-OpenSSH"), banner
    echoed = world.probe(who, "echo", "--to", DEVVM, "--port", "7", "--size", str(1 << 20))
    assert echoed["ok"], echoed
    udp = world.probe(who, "udp", "--to", DEVVM, "--port", "7")
    # the VM saw the datagram on port 7: the forwarder kept the original destination port
    assert udp == {"ok": True, "reply": "port 7:hello udp"}, udp
    page = world.hosts[who].run(["curl", "-sS", "-m", "10", f"http://{DEVVM}/"], check=False)
    assert page.stdout == TOKEN, page.stdout + page.stderr


@pytest.mark.parametrize("who", ["phone", "tablet"])
def test_store_and_developer_apps_on_the_box_are_reachable_by_name(world: World, who: str) -> None:
    _until_ok(world, who, "connect", "--to", f"notes.{ZONE}", "--port", "8080")
    page = world.hosts[who].run(
        ["curl", "-sS", "-m", "10", f"http://notes.{ZONE}:8080/"], check=False
    )
    assert page.stdout == "notes-ok", page.stdout + page.stderr
    # api: the lab's ECHO protocol (length, bytes; SHA-256 and the bytes reversed) on ::1
    result = world.hosts[who].run(
        [PYTHON, "-c", ECHO_CLIENT, f"api.{ZONE}", "9000", "200000"], check=False, timeout=30
    )
    assert result.stdout.strip() == "ok", result.stdout + result.stderr
    # a port outside a service's policy is refused at once, not left to hang
    refused = world.probe(who, "connect", "--to", f"notes.{ZONE}", "--port", "22")
    assert refused["ok"] is False and refused["error"] == "refused", refused


def test_the_console_checked_each_target_from_the_box(world: World) -> None:
    """Saving a service made the box check its target at once (a Celery task on the real
    worker): the VM's sshd and HTTP answer, and so do the two apps on the box."""
    out = world.box.django(
        """
        import json, time
        from lazycat.services.models import Service
        deadline = time.monotonic() + 20
        while Service.objects.filter(check_state__in=("", "checking")).exists():
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        rows = Service.objects.values_list("name", "check_state", "check_summary")
        print(json.dumps({name: [state, summary] for name, state, summary in rows}))
        """
    )
    checks = json.loads(out.strip().splitlines()[-1])
    assert {name: state for name, (state, _) in checks.items()} == {
        "devvm": "ok",
        "notes": "ok",
        "api": "ok",
    }, checks
    assert "22" in checks["devvm"][1] and "80" in checks["devvm"][1], checks


def _snapshot(host: Host) -> dict[str, str]:
    """What proxy mode must not change: routes, addresses, links, the resolver."""
    commands = {
        "route4": ["ip", "-4", "route", "show", "table", "all"],
        "route6": ["ip", "-6", "route", "show", "table", "all"],
        "rules": ["ip", "rule", "show"],
        "addr": ["ip", "addr", "show"],
        "link": ["ip", "-o", "link", "show"],
        "resolv.conf": ["cat", "/etc/resolv.conf"],
    }
    return {k: host.run(v).stdout for k, v in commands.items()}


def test_proxy_mode_reaches_the_vm_and_changes_nothing_on_the_host(world: World) -> None:
    laptop, client = world.hosts["laptop"], world.clients["laptop"]
    before = _snapshot(laptop)
    client.up(mode="proxy", timeout=20)
    # plain HTTP (absolute-form) through the proxy
    deadline = time.monotonic() + 20
    page = None
    while time.monotonic() < deadline:
        page = laptop.run(
            ["curl", "-sS", "-m", "5", "--proxy", PROXY, f"http://{DEVVM}/"], check=False
        )
        if page.stdout == TOKEN:
            break
        time.sleep(0.3)
    assert page is not None and page.stdout == TOKEN, (
        f"{page.stdout if page else ''}{page.stderr if page else ''}\n{world.logs('laptop')}"
    )
    # CONNECT (-p: tunnel through the proxy even for http)
    tunnelled = laptop.run(
        ["curl", "-sS", "-m", "10", "-p", "--proxy", PROXY, f"http://{DEVVM}/"], check=False
    )
    assert tunnelled.stdout == TOKEN, tunnelled.stdout + tunnelled.stderr
    # the SSH banner through CONNECT, as `ssh -o ProxyCommand` would use it
    banner = laptop.run([PYTHON, "-c", _BANNER_VIA_PROXY, DEVVM], check=False, timeout=20)
    assert banner.stdout.startswith("SSH-2.0-OpenSSH"), banner.stdout + banner.stderr
    # anything outside heiyu.space: a 403 that says what the proxy is for
    outside = laptop.run(
        [
            "curl",
            "-sS",
            "-m",
            "5",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--proxy",
            PROXY,
            "http://example.com/",
        ],
        check=False,
    )
    body, _, code = outside.stdout.rpartition("\n")
    assert code == "403" and "heiyu.space" in body, outside.stdout + outside.stderr
    deadline = time.monotonic() + 5  # state.json is rewritten every second
    while not (status := client.status()).get("connected") and time.monotonic() < deadline:
        time.sleep(0.3)
    assert status.get("mode") == "proxy" and status.get("connected") is True, status
    during = _snapshot(laptop)
    client.stop_up()
    after = _snapshot(laptop)
    for snapshot in (during, after):
        changed = {k: (before[k], snapshot[k]) for k in before if before[k] != snapshot[k]}
        assert not changed, changed


_BANNER_VIA_PROXY = """
import socket, sys
with socket.create_connection(("127.0.0.1", 31085), timeout=10) as s:
    s.sendall(f"CONNECT {sys.argv[1]}:22 HTTP/1.1\\r\\nHost: {sys.argv[1]}:22\\r\\n\\r\\n".encode())
    f = s.makefile("rb")
    status = f.readline()
    while f.readline() not in (b"\\r\\n", b""):
        pass
    if b" 200 " not in status:
        sys.exit(f"proxy said {status!r}")
    print(f.readline().decode().strip())
"""


def _users_of(world: World, service: str, expect: str, within: float = 5) -> list[str]:
    """The devices the console lists as using ``service`` (the cache transportd's reports
    fill), as soon as ``expect`` is among them or after ``within`` seconds."""
    out = world.box.django(
        """
        import json, time
        from lazycat.services.live import current_usage
        deadline = time.monotonic() + float(sys.argv[3])
        while sys.argv[2] not in (users := current_usage().get(sys.argv[1], [])):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        print(json.dumps(users))
        """,
        service,
        expect,
        str(within),
    )
    return list(json.loads(out.strip().splitlines()[-1]))


class Holder:
    """A device holding one TCP connection to the VM's echo (``svcprobe.py hold``)."""

    def __init__(self, world: World, who: str, to: str = DEVVM) -> None:
        self.proc = world.hosts[who].popen(
            [PYTHON, str(SVCPROBE), "hold", "--to", to, "--port", "7"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.who = who
        line = self.read()
        assert line.get("connected"), line

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        try:
            return dict(json.loads(line))
        except ValueError:
            return {"error": line + (self.proc.stdout.read() if self.proc.poll() else "")}

    def say(self, text: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


def test_access_to_the_vm_follows_the_owner_within_a_second(world: World) -> None:
    _until_ok(world, "phone", "connect", "--to", DEVVM, "--port", "7")
    _until_ok(world, "guest", "connect", "--to", f"notes.{ZONE}", "--port", "8080")  # tunnel up
    vm = str(world.services["devvm"])
    # not allowed: the guest is not even told the name, and the address refuses it at once
    unnamed = world.probe("guest", "connect", "--to", DEVVM, "--port", "22")
    assert unnamed["ok"] is False and "refused" not in unnamed["error"], unnamed
    refused = world.probe("guest", "connect", "--to", vm, "--port", "22")
    assert refused == {"ok": False, "error": "refused", "seconds": refused["seconds"]}, refused
    assert refused["seconds"] < 1.0, refused
    udp = world.probe("guest", "udp", "--to", vm, "--port", "7")
    assert udp["ok"] is False, udp

    holder = Holder(world, "phone")
    guest: Holder | None = None
    try:
        assert holder.say("before") == {"echo": "before"}
        # the console's "in use by": transportd reports the phone's open connection
        users = _users_of(world, vm, str(world.addresses["phone"]))
        assert str(world.addresses["phone"]) in users, users
        # the owner allows the guest: it connects within a second of the commit
        waiting = world.hosts["guest"].popen(
            [PYTHON, str(SVCPROBE), "until", "--to", vm, "--port", "7", "--within", "10"],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.3)  # it is polling, refused
        allowed_at, _ = world.expose(
            "devvm", "vm", world.devvm.ip or "", "all", ["phone", "tablet", "laptop", "guest"]
        )
        out, _ = waiting.communicate(timeout=20)
        reached = json.loads(out.strip().splitlines()[-1])
        assert reached["ok"], f"{reached}\n{world.logs('guest')}"
        latency = reached["at"] - allowed_at
        assert latency < 1.0, f"the guest connected {latency:.3f} s after the change"

        guest = Holder(world, "guest", vm)
        assert guest.say("guest in") == {"echo": "guest in"}
        # revoked: its open connection stops and new ones are refused; the phone's goes on
        world.expose("devvm", "vm", world.devvm.ip or "", "all", ["phone", "tablet", "laptop"])
        time.sleep(1.0)
        assert guest.say("after revoke").get("closed") in ("reset", "eof"), world.logs("guest")
        again = world.probe("guest", "connect", "--to", vm, "--port", "7")
        assert again["ok"] is False and again["error"] == "refused", again
        assert holder.say("still here") == {"echo": "still here"}
    finally:
        holder.close()
        if guest is not None:
            guest.close()
