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

Fail closed: if the forwarder cannot start or its policy route cannot be set (or forwarding
cannot be switched on), the ruleset is loaded all the same with that path's services *refused*
(``ruleset(refuse_forwarder=/refuse_nat66=)``: a RST or admin-prohibited, not a hang), so access
changes are enforced, and then :class:`ExposureError` says what failed; the next ``apply()``
tries again. Only if ``nft`` itself fails does the previous ruleset stay.

A crashed run leaves things behind. ``start()`` (called by the first ``apply()`` if the caller
did not) first puts back the sysctls recorded in ``state_file`` (written atomically, mode 0600,
*before* any sysctl is changed, deleted once they are restored; ignored after a reboot, which
restored them already: the file records ``/proc/sys/kernel/random/boot_id``), then deletes any
``inet <table>``, every ``fwmark <mark> lookup <route_table>`` rule and the local route of
``route_table``.

``apply``, ``forget_flows``, ``flows`` and ``close`` may be called from different threads: a lock
serialises them. After ``close()``, ``apply()`` and ``start()`` raise :class:`ExposureError`,
``flows()`` returns ``{}`` and ``forget_flows()`` 0; an ``apply()`` running when ``close()`` is
called finishes first, and ``close()`` then removes what it made.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterable, Sequence
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

from transport.exposure import Exposure, ExposureError, revoked, ruleset, uses_nat66
from transport.forwarder_aio import Forwarder

__all__ = ["KernelExposure"]

log = logging.getLogger("lazycat.exposure")

CONF = Path("/proc/sys/net/ipv6/conf")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
NFT_TIMEOUT = 10.0
RULE_PRIORITY = 1136  # before "main" (32766); lazycat's number, easy to find in `ip -6 rule`
LIVE_TCP_STATES = {"SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK"}
# What a state file may name: "<interface>/forwarding" or "<interface>/accept_ra" under CONF.
_STATE_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,15}/(forwarding|accept_ra)")
_STATE_VALUE = re.compile(r"-?[0-9]{1,3}")
_OURS = {"forwarding": "1", "accept_ra": "2"}  # what this module leaves while NAT66 is on


def _read(path: Path) -> str:
    """A sysctl's value; FileNotFoundError (the interface went) is left to the caller."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ExposureError(f"cannot read {path}: {exc}") from exc


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value + "\n")
    except FileNotFoundError:
        raise
    except OSError as exc:
        hint = " (needs CAP_NET_ADMIN)" if isinstance(exc, PermissionError) else ""
        raise ExposureError(f"cannot write {value} to {path}{hint}: {exc}") from exc


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _netlink_error(what: str, exc: BaseException) -> ExposureError:
    code = getattr(exc, "code", None) or getattr(exc, "errno", None)
    hint = " (needs CAP_NET_ADMIN)" if code in (errno.EPERM, errno.EACCES) else ""
    return ExposureError(f"{what}{hint}: {exc}")


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
        state_file: Path | None = None,
    ) -> None:
        """``forwarder``: the one to run for IPv4 and loopback targets (its port must be
        ``tproxy_port``); by default one with default timeouts is made on first need.
        ``state_file``: where the original values of the sysctls this object changes are kept
        while they are changed, so that a crashed run's are put back by the next ``start()``;
        without it they are kept in memory only."""
        self.tun = tun
        self.table = table
        self.tproxy_port = tproxy_port
        self.mark = mark
        self.route_table = route_table
        self.nft = nft
        self.state_file = state_file
        if forwarder is not None and forwarder.port != tproxy_port:
            raise ExposureError(f"the forwarder listens on {forwarder.port}, not {tproxy_port}")
        self.forwarder: Forwarder | None = forwarder
        self._lock = threading.Lock()
        self._closed = False
        self._started = False
        self._applied: tuple[Exposure, ...] = ()
        self._table_made = False
        self._routing = False  # our rule or route may exist
        self._saved: dict[Path, str] = {}  # sysctl files we changed -> their value before

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ExposureError("service forwarding is closed (transportd is stopping)")

    # --- the whole state ----------------------------------------------------------------------

    def start(self) -> None:
        """Remove what a crashed run may have left, in this order: put back the sysctls its
        ``state_file`` records (then delete the file), delete ``inet <table>``, the ``fwmark
        <mark>`` rules to ``route_table`` and its local route. Idempotent; the first ``apply()``
        calls it. Raises :class:`ExposureError` (nothing else is changed then)."""
        with self._lock:
            self._check_open()
            self._start()

    def _start(self) -> None:
        if self._started:
            return
        self._recover_sysctls()  # first: forwarding goes off before the table that guards it
        self._nft(f"add table inet {self.table}\ndelete table inet {self.table}\n")
        self._routing = True
        self._routes_down()
        self._started = True

    def apply(self, exposures: Sequence[Exposure]) -> None:
        """Make the kernel match ``exposures`` (idempotent). Raises :class:`ExposureError`: if
        the forwarder or the NAT66 path could not be set up, after loading a ruleset that
        refuses that path's services (see the module docstring)."""
        state = tuple(exposures)
        names: dict[str, Any] = {
            "tun": self.tun,
            "table": self.table,
            "tproxy_port": self.tproxy_port,
            "mark": self.mark,
        }
        ruleset(state, **names)  # validates before anything changes
        with self._lock:
            self._check_open()
            self._start()
            self._apply(state, names)

    def _apply(self, state: tuple[Exposure, ...], names: dict[str, Any]) -> None:
        proxied = [e for e in state if not uses_nat66(e)]
        nat66 = any(uses_nat66(e) for e in state)
        failed: list[str] = []
        refuse_forwarder = False
        if proxied:
            try:
                if self.forwarder is None:
                    self.forwarder = Forwarder(self.tproxy_port)
                self.forwarder.start()  # idempotent; a dead or never started one starts afresh
                self._routes_up()
            except ExposureError as exc:
                failed.append(f"forwarder services refused: {exc}")
                refuse_forwarder = True
        try:
            self._nft(ruleset(state, refuse_forwarder=refuse_forwarder, **names))
            self._table_made = True
            if nat66:
                try:
                    self._forwarding_on()
                except ExposureError as exc:
                    failed.append(f"NAT66 services refused: {exc}")
                    text = ruleset(
                        state, refuse_forwarder=refuse_forwarder, refuse_nat66=True, **names
                    )
                    self._nft(text)
        except ExposureError as exc:  # the previous ruleset stays
            raise ExposureError("; ".join([*failed, str(exc)])) from exc
        # Whatever failed above, the rest still runs: revoked flows must end.
        steps: list[tuple[bool, Any]] = [
            (self.forwarder is not None and self.forwarder.running, lambda: self._update(proxied)),
            (True, lambda: self._forget_flows(revoked(self._applied, state))),
            (not proxied, self._routes_down),
            (not nat66, self._restore_sysctls),
        ]
        for wanted, step in steps:
            if wanted:
                try:
                    step()
                except ExposureError as exc:
                    failed.append(str(exc))
        self._applied = state
        if failed:
            raise ExposureError("; ".join(failed))

    def _update(self, proxied: Sequence[Exposure]) -> None:
        assert self.forwarder is not None
        self.forwarder.update(proxied)

    def close(self) -> None:
        """Remove everything this object made and restore the sysctls it changed. Idempotent;
        a second call retries what the first could not do."""
        with self._lock:
            self._closed = True
            errors: list[str] = []
            # Sysctls first: forwarding goes off before the table that keeps devices off the LAN.
            steps = [self._restore_sysctls, self._close_forwarder, self._drop_table]
            for step in [*steps, self._routes_down]:
                try:
                    step()
                except ExposureError as exc:
                    errors.append(str(exc))
            self._applied = ()
            if errors:
                raise ExposureError("; ".join(errors))

    def _close_forwarder(self) -> None:
        if self.forwarder is not None:
            self.forwarder.close()

    def _drop_table(self) -> None:
        if self._table_made:
            self._nft(f"add table inet {self.table}\ndelete table inet {self.table}\n")
            self._table_made = False

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
        except OSError as exc:
            raise ExposureError(f"cannot run {binary}: {exc}") from exc
        if proc.returncode != 0:
            why = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
            if "Operation not permitted" in why:
                raise ExposureError(f"nft needs CAP_NET_ADMIN: {why}")
            raise ExposureError(f"nft refused the ruleset: {why}")

    # --- policy routing for TPROXY ------------------------------------------------------------

    def _routes_up(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        self._routing = True  # from here on something of ours may exist
        try:
            with IPRoute() as ipr:
                if not self._our_rules(ipr):
                    self._rule(ipr, "add", RULE_PRIORITY)
                self._local_route(ipr, "replace")
        except (NetlinkError, OSError, IndexError) as exc:
            raise _netlink_error("cannot add the TPROXY policy route", exc) from exc

    def _rule(self, ipr: Any, action: str, priority: int) -> None:
        """``ip -6 rule <action> fwmark <mark> lookup <route_table> pref <priority>``."""
        ipr.rule(
            action,
            family=socket.AF_INET6,
            fwmark=self.mark,
            table=self.route_table,
            priority=priority,
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

    def _our_rules(self, ipr: Any) -> list[int]:
        """Priorities of the ``fwmark <mark> lookup <route_table>`` rules."""
        return [
            int(rule.get("priority") or 0)
            for rule in ipr.get_rules(family=socket.AF_INET6)
            if rule.get("table") == self.route_table and rule.get("fwmark") == self.mark
        ]

    def _routes_down(self) -> None:
        if not self._routing:
            return
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        gone = (errno.ENOENT, errno.ESRCH)
        try:
            with IPRoute() as ipr:
                for priority in self._our_rules(ipr):
                    try:
                        self._rule(ipr, "del", priority)
                    except NetlinkError as exc:
                        if exc.code not in gone:
                            raise
                try:
                    self._local_route(ipr, "del")
                except NetlinkError as exc:
                    if exc.code not in gone:
                        raise
        except (NetlinkError, OSError, IndexError) as exc:
            raise _netlink_error("cannot remove the TPROXY policy route", exc) from exc
        self._routing = False

    # --- sysctls ------------------------------------------------------------------------------

    def _interfaces(self) -> list[Path]:
        try:
            return sorted(p for p in CONF.iterdir() if p.name != "all")
        except OSError as exc:
            raise ExposureError(f"cannot list {CONF} (is IPv6 disabled?): {exc}") from exc

    def _forwarding_on(self) -> None:
        forwarding = CONF / "all" / "forwarding"
        try:
            before = _read(forwarding)
        except FileNotFoundError as exc:
            raise ExposureError(f"{forwarding} is missing (is IPv6 disabled?)") from exc
        if before == "1":
            return  # already a router (ours from an earlier apply, or the owner's choice)
        # Writing all/forwarding also rewrites default/ and every interface's forwarding, so
        # remember them all to put back exactly what was there.
        originals: dict[Path, str] = {}
        ra: list[Path] = []
        for conf in self._interfaces():
            try:
                originals[conf / "forwarding"] = _read(conf / "forwarding")
                if _read(conf / "accept_ra") == "1":
                    originals[conf / "accept_ra"] = "1"
                    ra.append(conf / "accept_ra")
            except FileNotFoundError:
                continue  # the interface went away meanwhile: nothing to remember
        originals[forwarding] = before
        for path, value in originals.items():
            self._saved.setdefault(path, value)  # an earlier, truer original wins
        self._save_state()  # on disk before anything changes
        for path in ra:
            try:
                _write(path, "2")
            except FileNotFoundError:
                continue
        _write(forwarding, "1")

    def _restore_sysctls(self) -> None:
        if not self._saved:
            return
        failed: dict[Path, str] = {}
        errors: list[str] = []
        # "all" first: writing it rewrites the others, which are then put back one by one.
        for path in sorted(self._saved, key=lambda p: (p.parent.name != "all", str(p))):
            value = self._saved[path]
            try:
                if _read(path) != value:
                    _write(path, value)
            except FileNotFoundError:
                continue  # the interface went away
            except ExposureError as exc:
                failed[path] = value
                errors.append(str(exc))
        self._saved = failed
        self._save_state()
        if errors:
            raise ExposureError("; ".join(errors))

    def _save_state(self) -> None:
        """Write ``_saved`` to ``state_file`` atomically (mode 0600), or delete the file when
        nothing is changed any more."""
        path = self.state_file
        if path is None:
            return
        try:
            if not self._saved:
                path.unlink(missing_ok=True)
                return
            data = {
                "boot_id": _boot_id(),
                "sysctls": {str(p.relative_to(CONF)): v for p, v in sorted(self._saved.items())},
            }
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, (json.dumps(data, indent=1) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            raise ExposureError(
                f"cannot write {path} (the original sysctl values; nothing was changed): {exc}"
            ) from exc

    def _recover_sysctls(self) -> None:
        """Put back what a crashed run's ``state_file`` recorded, then delete it."""
        path = self.state_file
        if path is None or not path.exists():
            return
        try:
            data = json.loads(path.read_text())
            sysctls = data["sysctls"]
            booted = data["boot_id"]
            if not isinstance(sysctls, dict) or not all(
                isinstance(k, str)
                and _STATE_KEY.fullmatch(k)
                and isinstance(v, str)
                and _STATE_VALUE.fullmatch(v)
                for k, v in sysctls.items()
            ):
                raise ValueError("unexpected content")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ExposureError(
                f"cannot read {path}: {exc}; check net.ipv6.conf.*.forwarding and accept_ra by"
                " hand, then delete it"
            ) from exc
        if booted != _boot_id():
            log.info("sysctl state file from an earlier boot, dropped", extra={"file": str(path)})
        else:
            log.warning(
                "restoring sysctls left changed by an earlier run",
                extra={"file": str(path), "sysctls": sysctls},
            )
            for key, value in sysctls.items():
                # Only what still holds the value we set: one the owner changed since stays.
                try:
                    if _read(CONF / key) == _OURS[key.rsplit("/", 1)[1]]:
                        self._saved.setdefault(CONF / key, value)
                except FileNotFoundError:
                    continue
            self._restore_sysctls()  # deletes the file when all went back
            return
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise ExposureError(f"cannot delete {path}: {exc}") from exc

    # --- conntrack ----------------------------------------------------------------------------

    def _entries(self) -> list[tuple[object, IPv6Address, IPv6Address, str]]:
        """(entry, original destination, original source, TCP state or "") of the NAT66 flows:
        the kernel returns only entries whose ct mark has our bits (``nat66_in`` sets them), so
        a big conntrack table (a Docker host) is not copied to us every time."""
        from pyroute2 import Conntrack
        from pyroute2.netlink.exceptions import NetlinkError

        out: list[tuple[object, IPv6Address, IPv6Address, str]] = []
        try:
            with Conntrack(nfgen_family=socket.AF_INET6) as ct:
                for entry in ct.dump_entries(mark=self.mark, mark_mask=self.mark):
                    orig = entry.tuple_orig
                    if (
                        orig.family != socket.AF_INET6
                        or orig.saddr is None
                        or orig.daddr is None
                        or (entry.mark or 0) & self.mark != self.mark  # a kernel without filter
                    ):
                        continue
                    state = entry.protoinfo.state_name() if entry.protoinfo is not None else ""
                    out.append((entry, IPv6Address(orig.daddr), IPv6Address(orig.saddr), state))
        except (NetlinkError, OSError, ValueError) as exc:
            raise _netlink_error("cannot read conntrack", exc) from exc
        return out

    def forget_flows(self, pairs: Iterable[tuple[IPv6Address, IPv6Address]]) -> int:
        """Delete the conntrack entries of NAT66 flows from each device to each service of
        ``pairs`` ((service address, device address)); returns how many were deleted. (The
        forwarder ends its own flows.) After ``close()``: 0."""
        with self._lock:
            if self._closed:
                return 0
            return self._forget_flows(pairs)

    def _forget_flows(self, pairs: Iterable[tuple[IPv6Address, IPv6Address]]) -> int:
        from pyroute2 import Conntrack
        from pyroute2.netlink.exceptions import NetlinkError

        wanted = set(pairs)
        if not wanted:
            return 0
        doomed = [e for e, dst, src, _ in self._entries() if (dst, src) in wanted]
        if not doomed:
            return 0
        deleted = 0
        try:
            with Conntrack(nfgen_family=socket.AF_INET6) as ct:
                for entry in doomed:
                    try:
                        ct.delete(entry)
                        deleted += 1
                    except NetlinkError as exc:
                        if exc.code != errno.ENOENT:  # else it ended on its own meanwhile
                            raise
        except (NetlinkError, OSError) as exc:
            raise _netlink_error("cannot delete revoked conntrack entries", exc) from exc
        return deleted

    def flows(self) -> dict[IPv6Address, set[IPv6Address]]:
        """Service address -> devices with a live flow to it: NAT66 flows from conntrack, and
        the forwarder's open TCP connections and UDP flows from the forwarder. After
        ``close()``: empty."""
        # The forwarder knows its own flows exactly; conntrack is asked only about NAT66 ones
        # (its entries outlive a flow: a UDP one lasts 30 s after its last datagram, 120 s
        # once replied to, nf_conntrack_udp_timeout[_stream]; TCP counts until it closes).
        with self._lock:
            if self._closed:
                return {}
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
