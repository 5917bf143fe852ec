"""The NAT lab: real Linux network namespaces with nftables routers, for the tests.

Not product code and not a test module: tests import it (``from tests.natlab.lab import Lab``).
``docs/natlab.md`` draws the topology and explains every router kind; in short::

    with Lab() as lab:                       # the internet + the relay host (two IPv4, two IPv6)
        site = lab.add_site("box", nat="NAT3", portmap=True)
        box = site.add_host("box")
        vm = site.add_host("vm", ipv6=False)
        out = box.run(["ip", "addr"]).stdout
        proc = box.popen([...])              # killed (by PID) when the lab closes
        lab.block(site.router, lab.relay.ip) # cut a path; lab.unblock(...) mends it
        site.reboot_nat()                    # conntrack flushed: every mapping forgotten
        site.change_wan_address()            # a new public address (roaming)

Every namespace is named ``ln<pid>-<role>`` and every interface ``ln<pid><role>`` (at most 15
characters); veths are created inside the namespaces (``ip -n``), so the host's own namespace
never holds one. Closing the lab kills the processes it started (by PID, their process group),
then deletes exactly the namespaces it recorded, by name, and checks that they are gone. A
manifest in ``/tmp/natlab-<pid>.json`` lists them for ``python tests/natlab/lab.py --cleanup
<pid>`` if the test process itself was killed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
UDPPROBE = HERE / "udpprobe.py"
SVCPROBE = HERE / "svcprobe.py"  # the services lab's VM and its client probes
PYTHON = sys.executable
NETNS_ETC = Path("/etc/netns")  # per-namespace /etc files for `ip netns exec` (ip-netns(8))

NatKind = Literal[
    "none", "firewall", "NAT1", "NAT2", "NAT3", "NAT4", "CGNAT", "udp-blocked", "ipv6"
]
KINDS: tuple[str, ...] = (
    "none",
    "firewall",
    "NAT1",
    "NAT2",
    "NAT3",
    "NAT4",
    "CGNAT",
    "udp-blocked",
    "ipv6",
)
PUBLIC_LAN_KINDS = ("none", "firewall")  # no translation: the LAN holds public addresses

# The public side (documentation prefixes only, RFC 5737 / RFC 3849).
INTERNET_GW4 = ("203.0.113.1", "192.0.2.1")
INTERNET_GW6 = "2001:db8::1"
RELAY_IPS = ("192.0.2.10", "192.0.2.20")
RELAY_IP6S = ("2001:db8::10", "2001:db8::20")
PROBE_PORTS = (4000, 4001)  # udpprobe responder: both ports on both relay IPs (v4 and v6)
STUN_PORTS = (3478, 3479)  # transport.stun_aio RFC 5780 server: (A, 3478) primary, (B, 3479)
MAX_SITES = 15

CMD_TIMEOUT = 15.0


class LabError(RuntimeError):
    """A lab command failed; the message has the command and its output."""


class LabUnavailable(RuntimeError):
    """This machine cannot build the lab (not root, no ``ip``/``nft``, namespaces refused)."""


def _run(
    args: Sequence[str],
    *,
    check: bool = True,
    timeout: float = CMD_TIMEOUT,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out after {timeout} s: {' '.join(args)}") from exc
    if check and proc.returncode != 0:
        raise LabError(
            f"failed ({proc.returncode}): {' '.join(args)}\n{proc.stdout}{proc.stderr}"
            + (f"\ninput:\n{input}" if input else "")
        )
    return proc


def check_available(need_miniupnpd: bool = False) -> str | None:
    """Why the lab cannot run here, or None. Tries a real ``ip netns add`` (and deletes it)."""
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces, nftables)"
    tools = ["ip", "nft"] + (["miniupnpd"] if need_miniupnpd else [])
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} not installed (Debian: iproute2, nftables, miniupnpd-nftables)"
    probe = f"ln{os.getpid()}-probe"
    made = _run(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"'ip netns add' fails here: {made.stderr.strip()}"
    _run(["ip", "netns", "del", probe], check=False)
    nft = _run(["nft", "--version"], check=False)
    if nft.returncode != 0:
        return f"nft does not run: {nft.stderr.strip()}"
    return None


def lab_or_skip(
    *, need_miniupnpd: bool = False, tun: bool = False, tools: Sequence[tuple[str, str]] = ()
) -> None:
    """Call first in a lab test's fixture. If the lab cannot run here, the test **fails** with
    the reason where it must run — as root (CI runs as root: a root run that skipped the lab
    would prove nothing) or with ``CI`` set — and is skipped with the reason elsewhere (a
    developer without root). ``tools`` are (command, Debian package) pairs the test also needs.
    """
    import pytest

    reason = check_available(need_miniupnpd)
    if reason is None and tun and not os.path.exists("/dev/net/tun"):
        reason = "no /dev/net/tun (the tunnel's TUN interfaces)"
    for tool, package in tools:
        if reason is None and shutil.which(tool) is None:
            reason = f"{tool} not installed (Debian: {package}; make test installs it)"
    if reason is None:
        return
    if os.environ.get("CI") or os.geteuid() == 0:
        pytest.fail(f"the NAT lab cannot run here: {reason}")
    pytest.skip(reason)


def require_lab(need_miniupnpd: bool = False) -> None:
    """Raise :class:`LabUnavailable` with the reason if the lab cannot be built here."""
    reason = check_available(need_miniupnpd)
    if reason:
        raise LabUnavailable(reason)


# --- nodes ------------------------------------------------------------------------------------


@dataclass
class Node:
    """One namespace."""

    lab: Lab
    name: str  # short role, e.g. "r3"
    ns: str  # the namespace's full name

    def run(
        self,
        args: Sequence[str],
        *,
        check: bool = True,
        timeout: float = CMD_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in this namespace and wait for it (bounded)."""
        return _run(
            ["ip", "netns", "exec", self.ns, *args], check=check, timeout=timeout, input=input
        )

    def popen(self, args: Sequence[str], **kwargs: object) -> subprocess.Popen[str]:
        """Start a command in this namespace; the lab kills it (by PID) when it closes."""
        return self.lab._popen(self.ns, args, **kwargs)

    def python(self, args: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run the venv's Python here with the repository importable."""
        env = f"PYTHONPATH={REPO}"
        return self.run(["env", env, PYTHON, *args], **kwargs)  # type: ignore[arg-type]

    def python_popen(self, args: Sequence[str], **kwargs: object) -> subprocess.Popen[str]:
        return self.popen(["env", f"PYTHONPATH={REPO}", PYTHON, *args], **kwargs)

    def nft(self, script: str) -> None:
        self.run(["nft", "-f", "-"], input=script)

    def sysctl(self, **values: object) -> None:
        self.run(
            ["sysctl", "-q", "-w", *(f"{k.replace('__', '.')}={v}" for k, v in values.items())]
        )

    def conntrack(self) -> str:
        """This namespace's conntrack table (``/proc/net/nf_conntrack`` is per namespace)."""
        return self.run(["cat", "/proc/net/nf_conntrack"]).stdout

    def flush_conntrack(self) -> None:
        code = "from pyroute2 import Conntrack\nwith Conntrack() as ct:\n    ct.flush()\n"
        self.python(["-c", code])

    def probe(self, mode: str, *args: str, timeout: float = 20.0) -> dict[str, Any]:
        """Run ``udpprobe.py <mode> ...`` here and return its JSON."""
        out = self.run([PYTHON, str(UDPPROBE), mode, *args], timeout=timeout).stdout
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result


@dataclass
class Host(Node):
    """An end host: one veth, an IPv4 address, an IPv6 one unless ``ipv6=False``."""

    ip: str | None = None
    ip6: str | None = None
    site: Site | None = None
    ips: list[str] = field(default_factory=list)  # every address, IPv4 then IPv6

    def ipv6_stack_on(self) -> None:
        """A host on an IPv4-only network (``ipv6=False``) still has an IPv6 *stack*, as real
        hosts do: the tunnel's overlay addresses need it. (``ipv6=False`` turns it off.)"""
        self.sysctl(net__ipv6__conf__all__disable_ipv6=0, net__ipv6__conf__default__disable_ipv6=0)

    def use_resolver(self, address: str) -> None:
        """Make ``address`` this namespace's DNS server: ``ip netns exec`` mounts
        ``/etc/netns/<ns>/resolv.conf`` over ``/etc/resolv.conf`` (the lab removes it)."""
        if not Path("/etc/resolv.conf").exists():
            raise LabError("/etc/resolv.conf is missing: ip netns exec has nothing to mount over")
        if not NETNS_ETC.exists():
            NETNS_ETC.mkdir(mode=0o755)
            self.lab.made_netns_etc = True  # the lab removes it again when it closes
        directory = NETNS_ETC / self.ns
        directory.mkdir(exist_ok=True)
        (directory / "resolv.conf").write_text(f"nameserver {address}\n")

    def addr(self, port: int, family: int = 4) -> str:
        ip = self.ip if family == 4 else self.ip6
        if ip is None:
            raise LabError(f"{self.name} has no IPv{family} address")
        return f"[{ip}]:{port}" if family == 6 else f"{ip}:{port}"


@dataclass
class Router(Node):
    """A site router: WAN towards the internet (or a carrier), LAN bridge for its hosts."""

    kind: str = "NAT3"
    wan_if: str = ""
    lan_if: str = ""
    wan_ip: str | None = None
    wan_prefix: int = 24
    wan_gw: str | None = None
    wan_ip6: str | None = None
    wan_gw6: str | None = None
    lan_ip: str = ""
    lan_prefix: int = 24
    lan_ip6: str | None = None
    udp_timeout: int = 30
    portmap: bool = False
    upstream: Node | None = None  # where the routes towards this router's networks live
    lan_net4: str | None = None  # routed public LAN (none / firewall kinds)

    def counter(self, name: str) -> int:
        """Packets counted by the named nftables counter (``wan_input_drop``, ...)."""
        out = self.run(["nft", "list", "counter", "inet", "filter", name]).stdout
        match = re.search(r"packets (\d+)", out)
        return int(match.group(1)) if match else 0

    def set_udp_timeout(self, seconds: int) -> None:
        """Conntrack's UDP timeouts in this namespace (per-netns sysctls). The NAT1/NAT2
        mapping sets keep the timeout given when the site was made."""
        self.udp_timeout = seconds
        self.sysctl(
            net__netfilter__nf_conntrack_udp_timeout=seconds,
            net__netfilter__nf_conntrack_udp_timeout_stream=seconds,
        )

    def reboot_nat(self) -> None:
        """Forget every mapping: flush conntrack and the EIM/ADF sets."""
        self.flush_conntrack()
        if self.kind in ("NAT1", "NAT2"):
            self.run(["nft", "flush", "map", "inet", "filter", "eim4"])
        if self.kind == "NAT2":
            self.run(["nft", "flush", "set", "inet", "filter", "adf4"])

    def change_wan_address(self) -> str:
        """Move the WAN to a fresh public IPv4 address (the old one is removed, with it every
        masquerade mapping: the kernel flushes them). Returns the new address."""
        if self.wan_ip is None or self.upstream is None:
            raise LabError(f"{self.name} has no IPv4 WAN to change")
        new = self.lab._next_wan_ip()
        old = self.wan_ip
        self.run(["ip", "addr", "del", f"{old}/{self.wan_prefix}", "dev", self.wan_if])
        self.run(["ip", "addr", "add", f"{new}/{self.wan_prefix}", "dev", self.wan_if])
        self.run(["ip", "route", "replace", "default", "via", str(self.wan_gw)])
        self.wan_ip = new
        if self.lan_net4:
            self.upstream.run(["ip", "route", "replace", self.lan_net4, "via", new])
        with contextlib.suppress(LabError):
            self.reboot_nat()
        return new


@dataclass
class Site:
    """A router (two for CGNAT: ``carrier`` outside, ``router`` the home one) and its LAN."""

    lab: Lab
    name: str
    index: int
    kind: str
    router: Router
    carrier: Router | None = None
    hosts: list[Host] = field(default_factory=list)
    ipv6: bool = True
    ipv4: bool = True

    @property
    def routers(self) -> list[Router]:
        return [self.router] + ([self.carrier] if self.carrier else [])

    @property
    def public_router(self) -> Router:
        """The router whose WAN is on the internet (the carrier's, behind CGNAT)."""
        return self.carrier or self.router

    @property
    def public_ip(self) -> str | None:
        return self.public_router.wan_ip

    def add_host(self, name: str, *, ipv6: bool = True) -> Host:
        return self.lab._add_site_host(self, name, ipv6=ipv6 and self.ipv6)

    def reboot_nat(self) -> None:
        for router in self.routers:
            router.reboot_nat()

    def change_wan_address(self) -> str:
        return self.public_router.change_wan_address()


# --- rulesets ---------------------------------------------------------------------------------


def router_ruleset(
    kind: str,
    wan: str,
    *,
    lan: str = "",
    portmap: bool = False,
    udp_timeout: int = 30,
    v6_open: bool = False,
) -> str:
    """The router's whole ``table inet filter`` (miniupnpd's chains live in it too).

    See docs/natlab.md "How each kind is made" for why each rule gives its RFC 4787 behaviour.
    """
    nat4 = kind in ("NAT1", "NAT2", "NAT3", "NAT4", "CGNAT", "udp-blocked")
    lines = ["table inet filter {"]
    lines += [
        "  counter wan_input_drop { }",
        "  counter wan_forward_drop { }",
        "  counter udp_blocked { }",
    ]
    if kind in ("NAT1", "NAT2"):
        # external port -> internal ip . port, refreshed by outbound packets only
        lines.append(
            "  map eim4 { type inet_service : ipv4_addr . inet_service; "
            f"flags dynamic,timeout; timeout {udp_timeout}s; }}"
        )
    if kind == "NAT2":
        lines.append(
            "  set adf4 { type inet_service . ipv4_addr; "
            f"flags dynamic,timeout; timeout {udp_timeout}s; }}"
        )
    # INPUT: the router itself answers only its LAN, replies, and neighbour discovery.
    lines += [
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        '    iif "lo" accept',
        f'    iifname != "{wan}" accept',
        "    ct state established,related accept",
        "    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } accept",
        "    counter name wan_input_drop drop",
        "  }",
    ]
    fwd = [
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
    ]
    if kind == "udp-blocked":
        fwd += [
            f'    oifname "{wan}" meta l4proto udp counter name udp_blocked drop',
            f'    iifname "{wan}" meta l4proto udp counter name udp_blocked drop',
        ]
    fwd += [
        "    ct state established,related accept",
        f'    iifname != "{wan}" accept',
    ]
    if kind == "none":
        fwd.append("    accept")
    if v6_open:
        fwd.append("    meta nfproto ipv6 accept")
    if nat4:
        fwd.append("    meta nfproto ipv4 ct status dnat accept")  # NAT1/NAT2 inbound, mappings
    if portmap:
        fwd.append("    jump miniupnpd")
    fwd += ["    counter name wan_forward_drop drop", "  }"]
    lines += fwd
    if kind == "udp-blocked":
        lines += [
            "  chain output {",
            "    type filter hook output priority filter; policy accept;",
            f'    oifname "{wan}" meta l4proto udp counter name udp_blocked drop',
            "  }",
        ]
    lines += [
        "  chain miniupnpd { }",
        "  chain prerouting_miniupnpd { }",
        "  chain postrouting_miniupnpd { }",
    ]
    pre = [
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
    ]
    if portmap:
        pre.append("    jump prerouting_miniupnpd")
    if kind == "NAT1":  # EIF: anyone reaches a live mapping
        pre.append(f'    iifname "{wan}" meta nfproto ipv4 dnat ip to udp dport map @eim4')
    if kind == "NAT2":  # ADF: only an IP the mapping has sent to, from any port
        pre.append(
            f'    iifname "{wan}" meta nfproto ipv4 udp dport . ip saddr @adf4 '
            "dnat ip to udp dport map @eim4"
        )
    pre.append("  }")
    lines += pre
    post = [
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
    ]
    if portmap:
        post.append("    jump postrouting_miniupnpd")
    if nat4:
        how = " fully-random" if kind == "NAT4" else ""
        # Only what comes from the LAN: the router's own packets (miniupnpd's STUN check)
        # leave from its WAN address untranslated, as on a real router.
        src = f'iifname "{lan}" ' if lan else ""
        post.append(f'    {src}oifname "{wan}" meta nfproto ipv4 masquerade{how}')
    post.append("  }")
    lines += post
    if kind in ("NAT1", "NAT2"):
        # After srcnat (priority 100) the conntrack reply tuple holds the external port.
        rec = [
            "  chain record_mappings {",
            "    type filter hook postrouting priority srcnat + 10; policy accept;",
            f'    oifname != "{wan}" return',
            "    meta nfproto != ipv4 return",
            "    meta l4proto udp ct direction original update @eim4 "
            "{ ct reply proto-dst : ct original ip saddr . ct original proto-src }",
            "    meta l4proto udp ct direction reply update @eim4 "
            "{ ct original proto-dst : ct reply ip saddr . ct reply proto-src }",
        ]
        if kind == "NAT2":
            rec += [
                "    meta l4proto udp ct direction original update @adf4 "
                "{ ct reply proto-dst . ip daddr }",
                "    meta l4proto udp ct direction reply update @adf4 "
                "{ ct original proto-dst . ip daddr }",
            ]
        rec.append("  }")
        lines += rec
    lines.append("}")
    return "\n".join(lines) + "\n"


BLOCK_TABLE = """
table inet labblock {
  set b4 { type ipv4_addr; }
  set b6 { type ipv6_addr; }
  chain pre {
    type filter hook prerouting priority raw; policy accept;
    ip saddr @b4 drop
    ip daddr @b4 drop
    ip6 saddr @b6 drop
    ip6 daddr @b6 drop
  }
  chain out {
    type filter hook output priority raw; policy accept;
    ip daddr @b4 drop
    ip6 daddr @b6 drop
  }
}
"""


# --- the lab ----------------------------------------------------------------------------------


class Lab:
    """The internet namespace, the relay host, and the sites added to it. A context manager:
    leaving it (normally or by an exception) tears everything down."""

    def __init__(self, *, start_stun: bool = True) -> None:
        self.pid = os.getpid()
        self.prefix = f"ln{self.pid}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []
        self.sites: dict[str, Site] = {}
        self._site_count = 0
        self._host_count = 0
        self._wan_next = 200
        self._public_next = 30
        self._blocking: set[str] = set()
        self._dirs: list[str] = []  # miniupnpd's configuration and leases
        self.made_netns_etc = False  # Host.use_resolver made /etc/netns
        self._start_stun = start_stun
        self.manifest = Path(f"/tmp/natlab-{self.pid}.json")  # noqa: S108 - root-owned lab list
        self.internet: Node
        self.relay: Host

    # context manager ------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        require_lab()
        try:
            self._build_internet()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # names ----------------------------------------------------------------------------------

    def ifname(self, role: str) -> str:
        name = f"{self.prefix}{role}"
        if len(name) > 15:
            raise LabError(f"interface name too long: {name}")
        return name

    def _add_ns(self, role: str) -> str:
        ns = f"{self.prefix}-{role}"
        _run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        self._write_manifest()
        for cmd in (
            ["ip", "link", "set", "lo", "up"],
            # no DAD delay, no redirects, no bridged traffic through this namespace's filters
            [
                "sysctl",
                "-q",
                "-w",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.default.send_redirects=0",
                "net.ipv6.conf.all.accept_ra=0",
                "net.ipv6.conf.default.accept_ra=0",
            ],
        ):
            _run(["ip", "netns", "exec", ns, *cmd])
        with contextlib.suppress(LabError):  # absent without br_netfilter
            _run(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-q",
                    "-w",
                    "net.bridge.bridge-nf-call-iptables=0",
                    "net.bridge.bridge-nf-call-ip6tables=0",
                ]
            )
        return ns

    def _write_manifest(self) -> None:
        self.manifest.write_text(
            json.dumps(
                {
                    "pid": self.pid,
                    "namespaces": self.namespaces,
                    "processes": [p.pid for p in self.procs],
                    "dirs": self._dirs,
                }
            )
        )

    def _veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        """A veth pair made inside ``ns_a`` with its peer created straight in ``ns_b``."""
        _run(
            [
                "ip",
                "-n",
                ns_a,
                "link",
                "add",
                if_a,
                "type",
                "veth",
                "peer",
                "name",
                if_b,
                "netns",
                ns_b,
            ]
        )

    def _ip(self, ns: str, batch: Sequence[str]) -> None:
        _run(["ip", "-n", ns, "-batch", "-"], input="\n".join(batch) + "\n")

    def _next_wan_ip(self) -> str:
        if self._wan_next > 250:
            raise LabError("out of WAN addresses")
        self._wan_next += 1
        return f"203.0.113.{self._wan_next - 1}"

    # building -------------------------------------------------------------------------------

    def _build_internet(self) -> None:
        ns = self._add_ns("inet")
        self.internet = Node(self, "internet", ns)
        br = self.ifname("br")
        self._ip(
            ns,
            # A fixed MAC: a bridge without one takes its lowest port's, so it would change as
            # sites join, leaving a router that already cached the gateway's MAC (miniupnpd's
            # STUN check at start) sending into the void.
            [f"link add {br} address 02:00:5e:00:53:01 type bridge", f"link set {br} up"]
            + [f"addr add {gw}/24 dev {br}" for gw in INTERNET_GW4]
            + [f"addr add {INTERNET_GW6}/64 dev {br} nodad"],
        )
        self.internet.sysctl(net__ipv4__ip_forward=1, net__ipv6__conf__all__forwarding=1)
        # the relay host: two IPv4 and two IPv6 addresses on the public side
        relay_ns = self._add_ns("relay")
        up = self.ifname("ur")
        self._veth(ns, up, relay_ns, self.ifname("r"))
        self._ip(ns, [f"link set {up} master {br}", f"link set {up} up"])
        rif = self.ifname("r")
        self._ip(
            relay_ns,
            [
                *(f"addr add {ip}/24 dev {rif}" for ip in RELAY_IPS),
                *(f"addr add {ip}/64 dev {rif} nodad" for ip in RELAY_IP6S),
                f"link set {rif} up",
                f"route add default via {INTERNET_GW4[1]}",
                f"route add default via {INTERNET_GW6}",
            ],
        )
        self.relay = Host(
            self,
            "relay",
            relay_ns,
            ip=RELAY_IPS[0],
            ip6=RELAY_IP6S[0],
            ips=[*RELAY_IPS, *RELAY_IP6S],
        )
        self.relay_ip2, self.relay_ip6_2 = RELAY_IPS[1], RELAY_IP6S[1]
        probe_addrs = [f"{ip}:{p}" for ip in RELAY_IPS for p in PROBE_PORTS]
        probe_addrs += [f"[{ip}]:{p}" for ip in RELAY_IP6S for p in PROBE_PORTS]
        self._start_ready(self.relay, [PYTHON, str(UDPPROBE), "serve", *probe_addrs])
        if self._start_stun:
            self._start_ready(
                self.relay,
                [
                    "env",
                    f"PYTHONPATH={REPO}",
                    PYTHON,
                    str(HERE / "stun_server.py"),
                    f"{RELAY_IPS[0]}:{STUN_PORTS[0]}",
                    f"{RELAY_IPS[1]}:{STUN_PORTS[1]}",
                ],
            )

    def _start_ready(self, node: Node, args: Sequence[str], timeout: float = 10.0) -> None:
        proc = self._popen(node.ns, args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = read_line(proc, timeout)
        if line.strip() != "ready":
            err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
            raise LabError(f"{args} did not start: {line!r} {err}")

    def add_public_host(self, name: str) -> Host:
        """A host straight on the internet (192.0.2.x, 2001:db8::x), no router."""
        self._host_count += 1
        n = self._host_count
        ns = self._add_ns(f"h{n}")
        ip, ip6 = f"192.0.2.{self._public_next}", f"2001:db8::{self._public_next:x}"
        self._public_next += 1
        up, hif = self.ifname(f"u{n}h"), self.ifname(f"h{n}")
        self._veth(self.internet.ns, up, ns, hif)
        self._ip(
            self.internet.ns, [f"link set {up} master {self.ifname('br')}", f"link set {up} up"]
        )
        self._ip(
            ns,
            [
                f"addr add {ip}/24 dev {hif}",
                f"addr add {ip6}/64 dev {hif} nodad",
                f"link set {hif} up",
                f"route add default via {INTERNET_GW4[1]}",
                f"route add default via {INTERNET_GW6}",
            ],
        )
        return Host(self, name, ns, ip=ip, ip6=ip6, ips=[ip, ip6])

    def add_site(
        self,
        name: str,
        nat: NatKind = "NAT3",
        *,
        portmap: bool = False,
        ipv6: bool = True,
        udp_timeout: int = 30,
    ) -> Site:
        """A site: its router (for ``CGNAT`` a carrier router in front of a home ``NAT3``),
        an empty LAN (``site.add_host``). ``ipv6`` gives it a global /64 behind a stateful
        IPv6 firewall (open for ``none``); ``nat="ipv6"`` is an IPv6-only site."""
        if nat not in KINDS:
            raise LabError(f"unknown router kind {nat!r}; one of {KINDS}")
        if name in self.sites:
            raise LabError(f"site {name!r} exists")
        if self._site_count >= MAX_SITES:
            raise LabError(f"at most {MAX_SITES} sites")
        if portmap and check_available(need_miniupnpd=True):
            raise LabUnavailable(str(check_available(need_miniupnpd=True)))
        self._site_count += 1
        k = self._site_count
        ipv4 = nat != "ipv6"
        ipv6 = ipv6 or nat == "ipv6"
        inet = self.internet
        br = self.ifname("br")
        carrier: Router | None = None
        outer_kind = nat
        if nat == "CGNAT":
            # carrier: WAN on the internet, inside 100.64.k.0/24 (RFC 6598), v6 routed openly
            cns = self._add_ns(f"c{k}")
            carrier = Router(
                self,
                f"c{k}",
                cns,
                kind="CGNAT",
                wan_if=self.ifname(f"x{k}"),
                lan_if=self.ifname(f"c{k}"),
                udp_timeout=udp_timeout,
            )
            self._attach_wan(carrier, k, ipv4=True, ipv6=ipv6)
            self._veth(cns, carrier.lan_if, self._add_ns(f"r{k}"), self.ifname(f"w{k}"))
            carrier.lan_ip = f"100.64.{k}.1"
            batch = [
                f"addr add 100.64.{k}.1/24 dev {carrier.lan_if}",
                f"link set {carrier.lan_if} up",
            ]
            if ipv6:
                batch += [
                    f"addr add 2001:db8:{k:x}:ff::1/64 dev {carrier.lan_if} nodad",
                    f"route add 2001:db8:{k:x}:1::/64 via 2001:db8:{k:x}:ff::2",
                ]
            self._ip(cns, batch)
            carrier.sysctl(net__ipv4__ip_forward=1, net__ipv6__conf__all__forwarding=1)
            self._set_timeouts(carrier, udp_timeout)
            carrier.nft(
                router_ruleset("CGNAT", carrier.wan_if, udp_timeout=udp_timeout, v6_open=True)
            )
            outer_kind = "NAT3"
            rns = self.namespaces[-1]
            router = Router(
                self,
                f"r{k}",
                rns,
                kind="NAT3",
                wan_if=self.ifname(f"w{k}"),
                lan_if=self.ifname(f"l{k}"),
                udp_timeout=udp_timeout,
                portmap=portmap,
                upstream=carrier,
            )
            router.wan_ip, router.wan_gw = f"100.64.{k}.2", f"100.64.{k}.1"
            batch = [
                f"addr add 100.64.{k}.2/24 dev {router.wan_if}",
                f"link set {router.wan_if} up",
                f"route add default via 100.64.{k}.1",
            ]
            if ipv6:
                router.wan_ip6, router.wan_gw6 = f"2001:db8:{k:x}:ff::2", f"2001:db8:{k:x}:ff::1"
                batch += [
                    f"addr add {router.wan_ip6}/64 dev {router.wan_if} nodad",
                    f"route add default via {router.wan_gw6}",
                ]
            self._ip(rns, batch)
        else:
            rns = self._add_ns(f"r{k}")
            router = Router(
                self,
                f"r{k}",
                rns,
                kind=nat,
                wan_if=self.ifname(f"w{k}"),
                lan_if=self.ifname(f"l{k}"),
                udp_timeout=udp_timeout,
                portmap=portmap,
            )
            self._attach_wan(router, k, ipv4=ipv4, ipv6=ipv6)
        del inet, br
        # the LAN: a bridge in the router's namespace
        if nat in PUBLIC_LAN_KINDS:
            router.lan_net4 = f"198.51.100.{16 * k}/28"
            router.lan_ip, router.lan_prefix = f"198.51.100.{16 * k + 1}", 28
            self.internet.run(["ip", "route", "add", router.lan_net4, "via", str(router.wan_ip)])
        else:
            router.lan_ip, router.lan_prefix = f"10.{k}.1.1", 24
        lan = router.lan_if
        batch = [
            f"link add {lan} address 02:00:5e:00:54:{k:02x} type bridge",  # fixed, as the internet
            f"link set {lan} up",
            f"addr add {router.lan_ip}/{router.lan_prefix} dev {lan}",
        ]
        if ipv6:
            router.lan_ip6 = f"2001:db8:{k:x}:1::1"
            batch.append(f"addr add {router.lan_ip6}/64 dev {lan} nodad")
        self._ip(router.ns, batch)
        router.sysctl(net__ipv4__ip_forward=1, net__ipv6__conf__all__forwarding=1)
        self._set_timeouts(router, udp_timeout)
        router.nft(
            router_ruleset(
                outer_kind,
                router.wan_if,
                lan=router.lan_if,
                portmap=portmap,
                udp_timeout=udp_timeout,
                v6_open=(nat == "none"),
            )
        )
        site = Site(self, name, k, nat, router, carrier, ipv6=ipv6, ipv4=ipv4)
        self.sites[name] = site
        if portmap:
            self._start_miniupnpd(router)
        return site

    def _attach_wan(self, router: Router, k: int, *, ipv4: bool, ipv6: bool) -> None:
        """Join ``router``'s WAN to the internet bridge; routes back to its networks."""
        inet = self.internet.ns
        up = self.ifname(f"u{k}")
        self._veth(inet, up, router.ns, router.wan_if)
        self._ip(inet, [f"link set {up} master {self.ifname('br')}", f"link set {up} up"])
        router.upstream = self.internet
        batch = [f"link set {router.wan_if} up"]
        if ipv4:
            router.wan_ip, router.wan_gw = self._next_wan_ip(), INTERNET_GW4[0]
            batch += [
                f"addr add {router.wan_ip}/24 dev {router.wan_if}",
                f"route add default via {router.wan_gw}",
            ]
        if ipv6:
            router.wan_ip6, router.wan_gw6 = f"2001:db8::1:{k:x}", INTERNET_GW6
            batch += [
                f"addr add {router.wan_ip6}/64 dev {router.wan_if} nodad",
                f"route add default via {INTERNET_GW6}",
            ]
            self.internet.run(
                ["ip", "-6", "route", "add", f"2001:db8:{k:x}::/48", "via", router.wan_ip6]
            )
        self._ip(router.ns, batch)

    def _set_timeouts(self, router: Router, seconds: int) -> None:
        # nft loads conntrack on first use; the sysctls exist per namespace from the start
        router.set_udp_timeout(seconds)

    def _add_site_host(self, site: Site, name: str, *, ipv6: bool) -> Host:
        router = site.router
        self._host_count += 1
        n = self._host_count
        i = len(site.hosts)
        ns = self._add_ns(f"h{n}")
        port, hif = self.ifname(f"p{n}"), self.ifname(f"h{n}")
        self._veth(router.ns, port, ns, hif)
        self._ip(router.ns, [f"link set {port} master {router.lan_if}", f"link set {port} up"])
        if site.kind in PUBLIC_LAN_KINDS:
            base = int(router.lan_ip.rsplit(".", 1)[1])
            if i + 2 > 13:
                raise LabError("a public LAN holds at most 13 hosts")
            ip = f"{router.lan_ip.rsplit('.', 1)[0]}.{base + 1 + i}"
        else:
            ip = f"10.{site.index}.1.{10 + i}"
        batch = [f"addr add {ip}/{router.lan_prefix} dev {hif}", f"link set {hif} up"]
        if site.ipv4:
            batch.append(f"route add default via {router.lan_ip}")
        ip6 = None
        if ipv6 and router.lan_ip6:
            ip6 = f"2001:db8:{site.index:x}:1::{10 + i:x}"
            batch += [
                f"addr add {ip6}/64 dev {hif} nodad",
                f"route add default via {router.lan_ip6}",
            ]
        self._ip(ns, batch)
        if not ipv6:
            _run(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                ]
            )
        host = Host(self, name, ns, ip=ip, ip6=ip6, site=site, ips=[ip] + ([ip6] if ip6 else []))
        site.hosts.append(host)
        return host

    def _start_miniupnpd(self, router: Router) -> None:
        """Debian's miniupnpd (nftables build) on the router: UPnP IGD, NAT-PMP and PCP for
        the LAN. Its external address is a documentation one, which it only accepts after a
        STUN check finds the outside unfiltered: the relay's probe responder answers it."""
        tmp = Path(f"/tmp/natlab-{self.pid}-{router.name}")  # noqa: S108
        tmp.mkdir(exist_ok=True)
        self._dirs.append(str(tmp))
        conf = tmp / "miniupnpd.conf"
        net = ipaddress.ip_network(f"{router.lan_ip}/{router.lan_prefix}", strict=False)
        conf.write_text(
            f"ext_ifname={router.wan_if}\n"
            f"listening_ip={router.lan_if}\n"
            "http_port=0\n"
            "enable_natpmp=yes\n"
            "enable_upnp=yes\n"
            "secure_mode=no\n"
            "system_uptime=yes\n"
            "ext_perform_stun=yes\n"
            f"ext_stun_host={RELAY_IPS[0]}\n"
            f"ext_stun_port={PROBE_PORTS[0]}\n"
            f"lease_file={tmp / 'leases'}\n"
            "uuid=3b0b6d1c-5a52-4c0e-9f4a-0000000000ab\n"
            f"allow 1024-65535 {net} 1024-65535\n"
            "deny 0-65535 0.0.0.0/0 0-65535\n"
        )
        log = tmp / "miniupnpd.log"
        router.miniupnpd_log = log  # type: ignore[attr-defined]
        with log.open("w") as out:
            proc = self._popen(
                router.ns,
                ["miniupnpd", "-d", "-f", str(conf), "-P", str(tmp / "pid")],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 15
        while b"Listening for NAT-PMP/PCP traffic" not in log.read_bytes():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise LabError(f"miniupnpd did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        if b"Port forwarding is now enabled" not in log.read_bytes():
            raise LabError(f"miniupnpd refuses to forward:\n{log.read_text()[-3000:]}")

    # processes ------------------------------------------------------------------------------

    def _popen(self, ns: str, args: Sequence[str], **kwargs: object) -> subprocess.Popen[str]:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("text", True)
        proc: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", ns, *args], start_new_session=True, **kwargs
        )
        self.procs.append(proc)
        self._write_manifest()
        return proc

    # paths ----------------------------------------------------------------------------------

    def block(self, node: Node, peer_ip: str) -> None:
        """Drop every packet between ``node`` (a router or host) and ``peer_ip``, both ways."""
        if node.ns not in self._blocking:
            node.nft(BLOCK_TABLE)
            self._blocking.add(node.ns)
        fam = "b6" if ":" in peer_ip else "b4"
        node.run(["nft", "add", "element", "inet", "labblock", fam, f"{{ {peer_ip} }}"])

    def unblock(self, node: Node, peer_ip: str) -> None:
        fam = "b6" if ":" in peer_ip else "b4"
        node.run(["nft", "delete", "element", "inet", "labblock", fam, f"{{ {peer_ip} }}"])

    # teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill our processes (by PID / their own process group), delete our namespaces (by
        name), check both. Raises LabError at the end if anything survived."""
        problems = []
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)  # the group this Popen started
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    problems.append(f"process {proc.pid} survived SIGKILL")
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        self.procs.clear()
        for ns in reversed(self.namespaces):
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)  # Host.use_resolver's file
            _run(["ip", "netns", "del", ns], check=False)
        left = set(_run(["ip", "netns", "list"], check=False).stdout.split())
        survivors = [ns for ns in self.namespaces if ns in left]
        if survivors:
            problems.append(f"namespaces survived: {survivors}")
        else:
            self.namespaces.clear()
            with contextlib.suppress(OSError):
                self.manifest.unlink()
        for tmp in self._dirs:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.made_netns_etc:
            with contextlib.suppress(OSError):  # not empty: someone else's files are in it
                NETNS_ETC.rmdir()
        if problems:
            raise LabError("; ".join(problems))


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of ``proc``'s stdout within ``timeout`` seconds ('' on timeout or exit)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    with Lab() as made:
        yield made


def cleanup(pid: int) -> list[str]:
    """Delete the namespaces a dead lab process listed in its manifest (exact names)."""
    manifest = Path(f"/tmp/natlab-{pid}.json")  # noqa: S108
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 0)
        raise LabError(f"process {pid} is alive: let it clean up itself")
    listed = json.loads(manifest.read_text())
    names = listed["namespaces"]
    # Kill the dead lab's processes, but only a PID that still lives in one of its namespaces
    # (a reused PID elsewhere is left alone).
    inodes = set()
    for ns in names:
        with contextlib.suppress(OSError):
            inodes.add(os.stat(f"/run/netns/{ns}").st_ino)
    for proc_pid in listed.get("processes", []):
        try:
            if os.stat(f"/proc/{proc_pid}/ns/net").st_ino in inodes:
                os.kill(proc_pid, signal.SIGKILL)
        except OSError:
            continue
    for ns in names:
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        _run(["ip", "netns", "del", ns], check=False)
    for tmp in listed.get("dirs", []):
        shutil.rmtree(tmp, ignore_errors=True)
    manifest.unlink()
    return list(names)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--cleanup":
        print("deleted:", " ".join(cleanup(int(sys.argv[2]))))
    else:
        print("usage: python tests/natlab/lab.py --cleanup PID", file=sys.stderr)
        sys.exit(2)
