"""The kernel side of service forwarding: nftables, policy routing, sysctls, conntrack, and the
userspace forwarder. Blocking (subprocess and netlink): transportd calls it from an executor.

:class:`KernelExposure` takes the whole desired state each time (``apply``) and makes the kernel
match it, in the current network namespace:

1. the ruleset of ``transport.exposure.ruleset`` through ``nft -f -`` (one atomic transaction);
2. for services the forwarder carries (IPv4 or loopback targets): the forwarder's thread (it owns
   one :class:`~transport.forwarder_aio.Forwarder`), then ``ip -6 rule fwmark <mark> lookup
   <table>`` and ``local ::/0 dev lo table <table>`` (pyroute2), which deliver TPROXY'd packets
   locally although the service addresses are not local addresses (Linux
   ``Documentation/networking/tproxy.rst``);
3. for NAT66 services: ``net.ipv6.conf.all.forwarding=1`` — after first turning ``accept_ra=1``
   into ``2`` on every interface, because a forwarding interface ignores router advertisements
   unless ``accept_ra`` is 2 (``Documentation/networking/ip-sysctl.rst``), and a box that loses
   its default route is worse than one without services. Both are written through ``/proc/sys``
   and restored when no NAT66 service is left, and by ``close()``;
4. flows of (service, device) pairs that lost access (``transport.exposure.revoked``): the
   forwarder resets its own; conntrack entries of NAT66 flows are deleted (pyroute2's netlink
   ``Conntrack``: no ``conntrack`` binary needed), so the target's next packet meets no NAT
   binding and is answered with a RST by the box, while the device's next packet is rejected by
   the new ruleset.

Order matters: the ruleset goes in before forwarding is switched on (so there is never an
instant where forwarding is on without the rule that keeps devices off the LAN), and routes
before the TPROXY rules that need them.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
from collections.abc import Iterable, Sequence
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

from transport.exposure import Exposure, ExposureError, revoked, ruleset, uses_nat66
from transport.forwarder_aio import Forwarder

__all__ = ["KernelExposure"]

CONF = Path("/proc/sys/net/ipv6/conf")
NFT_TIMEOUT = 10.0
RULE_PRIORITY = 1136  # before "main" (32766); lazycat's number, easy to find in `ip -6 rule`
LIVE_TCP_STATES = {"SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK"}


def _read(path: Path) -> str:
    return path.read_text().strip()


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value + "\n")
    except OSError as exc:
        raise ExposureError(f"cannot write {value} to {path}: {exc}") from exc


class KernelExposure:
    def __init__(
        self,
        *,
        tun: str = "lzc0",
        table: str = "lazycat",
        tproxy_port: int = 7481,
        mark: int = 0x1136,
        route_table: int = 1136,
        nft: str = "nft",
        forwarder: Forwarder | None = None,
    ) -> None:
        """``forwarder``: the one to run for IPv4 and loopback targets (its port must be
        ``tproxy_port``); by default one with default timeouts is made on first need."""
        self.tun = tun
        self.table = table
        self.tproxy_port = tproxy_port
        self.mark = mark
        self.route_table = route_table
        self.nft = nft
        if forwarder is not None and forwarder.port != tproxy_port:
            raise ExposureError(f"the forwarder listens on {forwarder.port}, not {tproxy_port}")
        self.forwarder: Forwarder | None = forwarder
        self._applied: tuple[Exposure, ...] = ()
        self._table_made = False
        self._routing = False
        self._saved: dict[Path, str] = {}  # sysctl files we changed -> their value before

    # --- the whole state ----------------------------------------------------------------------

    def apply(self, exposures: Sequence[Exposure]) -> None:
        """Make the kernel match ``exposures`` (idempotent). Raises :class:`ExposureError`."""
        state = tuple(exposures)
        text = ruleset(
            state, tun=self.tun, table=self.table, tproxy_port=self.tproxy_port, mark=self.mark
        )  # validates before anything changes
        proxied = [e for e in state if not uses_nat66(e)]
        nat66 = any(uses_nat66(e) for e in state)
        if proxied:
            if self.forwarder is None:
                self.forwarder = Forwarder(self.tproxy_port)
            self.forwarder.start()  # idempotent; raises ExposureError if it cannot listen
            self._routes_up()
        self._nft(text)
        self._table_made = True
        if nat66:
            self._forwarding_on()
        if self.forwarder is not None and self.forwarder.running:
            self.forwarder.update(proxied)
        gone = revoked(self._applied, state)
        if gone:
            self.forget_flows(gone)
        if not proxied:
            self._routes_down()
        if not nat66:
            self._restore_sysctls()
        self._applied = state

    def close(self) -> None:
        """Remove everything this object made and restore the sysctls it changed."""
        errors: list[str] = []
        if self._table_made:
            try:
                self._nft(f"add table inet {self.table}\ndelete table inet {self.table}\n")
                self._table_made = False
            except ExposureError as exc:
                errors.append(str(exc))
        if self.forwarder is not None:
            self.forwarder.close()
        try:
            self._routes_down()
        except ExposureError as exc:
            errors.append(str(exc))
        try:
            self._restore_sysctls()
        except ExposureError as exc:
            errors.append(str(exc))
        self._applied = ()
        if errors:
            raise ExposureError("; ".join(errors))

    # --- nftables -----------------------------------------------------------------------------

    def _nft(self, text: str) -> None:
        binary = shutil.which(self.nft)
        if binary is None:
            raise ExposureError(f"{self.nft} not found (Debian: nftables)")
        try:
            proc = subprocess.run(
                [binary, "-f", "-"],
                input=text,
                capture_output=True,
                text=True,
                timeout=NFT_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ExposureError(f"nft did not finish in {NFT_TIMEOUT} s") from exc
        if proc.returncode != 0:
            why = (proc.stderr or proc.stdout).strip()
            raise ExposureError(f"nft refused the ruleset (needs CAP_NET_ADMIN): {why}")

    # --- policy routing for TPROXY ------------------------------------------------------------

    def _routes_up(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            with IPRoute() as ipr:
                if not self._rule_present(ipr):
                    self._rule(ipr, "add")
                self._local_route(ipr, "replace")
        except (NetlinkError, OSError, IndexError) as exc:
            raise ExposureError(f"cannot add the TPROXY policy route: {exc}") from exc
        self._routing = True

    def _rule(self, ipr: Any, action: str) -> None:
        """``ip -6 rule <action> fwmark <mark> lookup <route_table>``."""
        ipr.rule(
            action,
            family=socket.AF_INET6,
            fwmark=self.mark,
            table=self.route_table,
            priority=RULE_PRIORITY,
        )

    def _local_route(self, ipr: Any, action: str) -> None:
        """``ip -6 route <action> local ::/0 dev lo table <route_table>``: every marked packet
        is delivered locally, to the forwarder's transparent socket."""
        ipr.route(
            action,
            family=socket.AF_INET6,
            dst="::/0",
            type="local",
            oif=ipr.link_lookup(ifname="lo")[0],
            table=self.route_table,
        )

    def _rule_present(self, ipr: object) -> bool:
        for rule in ipr.get_rules(family=socket.AF_INET6):  # type: ignore[attr-defined]
            if rule.get("table") == self.route_table and rule.get("fwmark") == self.mark:
                return True
        return False

    def _routes_down(self) -> None:
        if not self._routing:
            return
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            with IPRoute() as ipr:
                while self._rule_present(ipr):
                    self._rule(ipr, "del")
                with contextlib.suppress(NetlinkError):  # already gone
                    self._local_route(ipr, "del")
        except (NetlinkError, OSError, IndexError) as exc:
            raise ExposureError(f"cannot remove the TPROXY policy route: {exc}") from exc
        self._routing = False

    # --- sysctls ------------------------------------------------------------------------------

    def _set(self, path: Path, value: str) -> None:
        before = _read(path)
        if before == value:
            return
        self._saved.setdefault(path, before)
        _write(path, value)

    def _forwarding_on(self) -> None:
        forwarding = CONF / "all" / "forwarding"
        if _read(forwarding) == "1":
            return  # already a router (ours from an earlier apply, or the owner's choice)
        # Writing all/forwarding also rewrites default/ and every interface's forwarding, so
        # remember them all to put back exactly what was there.
        for conf in sorted(CONF.iterdir()):
            if conf.name != "all":
                self._saved.setdefault(conf / "forwarding", _read(conf / "forwarding"))
        for conf in sorted(CONF.iterdir()):
            if conf.name != "all" and _read(conf / "accept_ra") == "1":
                self._set(conf / "accept_ra", "2")
        self._set(forwarding, "1")

    def _restore_sysctls(self) -> None:
        if not self._saved:
            return
        saved, self._saved = self._saved, {}
        # "all" first: writing it rewrites the others, which are then put back one by one.
        for path in sorted(saved, key=lambda p: (p.parent.name != "all", str(p))):
            if path.exists() and _read(path) != saved[path]:  # an interface may have gone
                _write(path, saved[path])

    # --- conntrack ----------------------------------------------------------------------------

    def _entries(self) -> Iterable[tuple[object, IPv6Address, IPv6Address, str]]:
        """(entry, original destination, original source, TCP state or "") of IPv6 flows."""
        from pyroute2 import Conntrack

        with Conntrack(nfgen_family=socket.AF_INET6) as ct:
            for entry in ct.dump_entries():
                orig = entry.tuple_orig
                if orig.family != socket.AF_INET6 or orig.saddr is None or orig.daddr is None:
                    continue
                state = entry.protoinfo.state_name() if entry.protoinfo is not None else ""
                yield entry, IPv6Address(orig.daddr), IPv6Address(orig.saddr), state

    def forget_flows(self, pairs: Iterable[tuple[IPv6Address, IPv6Address]]) -> int:
        """Delete the conntrack entries of flows from each device to each service of ``pairs``
        ((service address, device address)); returns how many were deleted."""
        from pyroute2 import Conntrack
        from pyroute2.netlink.exceptions import NetlinkError

        wanted = set(pairs)
        if not wanted:
            return 0
        doomed = [e for e, dst, src, _ in self._entries() if (dst, src) in wanted]
        deleted = 0
        with Conntrack(nfgen_family=socket.AF_INET6) as ct:
            for entry in doomed:
                try:
                    ct.delete(entry)
                    deleted += 1
                except NetlinkError:  # it ended on its own meanwhile
                    continue
        return deleted

    def flows(self) -> dict[IPv6Address, set[IPv6Address]]:
        """Service address -> devices with a live flow to it: NAT66 flows from conntrack, and
        the forwarder's open TCP connections and UDP flows from the forwarder."""
        # The forwarder knows its own flows exactly; conntrack is asked only about NAT66 ones
        # (its entries outlive a flow: a UDP one lasts 30 s after its last datagram, 120 s
        # once replied to, nf_conntrack_udp_timeout[_stream]; TCP counts until it closes).
        services = {e.address for e in self._applied if uses_nat66(e)}
        out: dict[IPv6Address, set[IPv6Address]] = {}
        if services:
            for _entry, dst, src, state in self._entries():
                if dst in services and (not state or state in LIVE_TCP_STATES):
                    out.setdefault(dst, set()).add(src)
        if self.forwarder is not None and self.forwarder.running:
            for service, devices in self.forwarder.usage().items():
                out.setdefault(service, set()).update(devices)
        return out
