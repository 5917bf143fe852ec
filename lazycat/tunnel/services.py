"""transportd's side of exposing services: the database's services become kernel forwarding.

``transport.exposure`` turns a list of :class:`~transport.exposure.Exposure` (one per service: its
overlay address, its target on the box's LAN, the port ranges of its policy and the overlay
addresses of the devices allowed to reach it) into one nftables table; ``KernelExposure`` applies
it, with the policy routing and sysctls it needs and its userspace ``Forwarder`` for the services
whose target has no IPv6 (docs/forwarding.md). This module only feeds it::

    database (services, approved devices)  --load_exposures-->  [Exposure]
    service.changed / device.changed / resync  -->  ServiceExposure.refresh()
        --> KernelExposure.apply: one nft transaction, the forwarder's new map; the pairs
            that lost access have their conntrack entries deleted and their forwarded
            connections reset (other devices' connections are not touched)
    every USAGE_INTERVAL: KernelExposure.flows (conntrack + forwarder) --> report_usage
        (the console) when it changed

The database is the truth here as for the allow-list: every refresh reloads the whole state, so
a lost message is repaired by the next one or by the periodic resync.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable
from ipaddress import IPv6Address

from asgiref.sync import sync_to_async

from transport.exposure import Exposure, ExposureError
from transport.exposure_linux import KernelExposure
from transport.ports import PortPolicyError

log = logging.getLogger("lazycat.transportd")

USAGE_INTERVAL = 1.0  # seconds between looks at who uses which service

Usage = dict[IPv6Address, set[IPv6Address]]


def load_exposures() -> list[Exposure]:
    """Every service as the forwarding layer needs it. "Every approved device" is expanded to
    the approved devices' addresses: a device not approved is in no set, whatever the service
    says."""
    from lazycat.devices.models import Device, DeviceStatus
    from lazycat.services.models import Service

    approved = {
        pk: IPv6Address(address)
        for pk, address in Device.objects.filter(
            status=DeviceStatus.APPROVED, overlay_address__isnull=False
        ).values_list("pk", "overlay_address")
    }
    exposures = []
    for service in Service.objects.prefetch_related("allowed_devices"):
        if service.access_all:
            devices = frozenset(approved.values())
        else:
            chosen = (d.pk for d in service.allowed_devices.all())
            devices = frozenset(approved[pk] for pk in chosen if pk in approved)
        try:
            policy = service.policy
            exposures.append(
                Exposure(
                    name=service.name,
                    address=IPv6Address(service.overlay_address),
                    target=ipaddress.ip_address(service.target),
                    tcp=tuple(policy.effective_ranges("tcp")),
                    udp=tuple(policy.effective_ranges("udp")),
                    devices=devices,
                )
            )
        except (ExposureError, PortPolicyError, ValueError) as exc:
            # A row the form would refuse now (written by an older version, or by hand): that
            # one service is not forwarded; every other one still is, and access still holds.
            log.error("service not forwarded", extra={"service": service.name, "error": str(exc)})
    return exposures


def report_usage(usage: Usage) -> None:
    from lazycat.services.live import report_usage as to_console

    to_console({str(s): sorted(str(d) for d in devices) for s, devices in usage.items()})


class ServiceExposure:
    """The services' forwarding for one transportd. ``start`` after the TUN is up; ``refresh``
    whenever services or devices may have changed; ``close`` removes everything it set up."""

    def __init__(
        self,
        kernel: KernelExposure,
        *,
        load: Callable[[], list[Exposure]] = load_exposures,
        on_usage: Callable[[Usage], None] = report_usage,
        usage_interval: float = USAGE_INTERVAL,
    ) -> None:
        self.kernel = kernel
        self.load = load
        self.on_usage = on_usage
        self.usage_interval = usage_interval
        self.usage: Usage | None = None  # None: not reported yet (the first look always is)
        self._lock = asyncio.Lock()  # one refresh at a time, and close waits for it
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh("start")
        self._task = asyncio.get_running_loop().create_task(
            self._watch_usage(), name="transportd-usage"
        )

    async def refresh(self, why: str) -> None:
        """Make forwarding what the database says now. Never raises: a failure is logged, and
        the next refresh (a change, or the periodic resync) tries again with the whole state."""
        async with self._lock:
            if self._closed:
                return
            try:
                exposures = await sync_to_async(self.load)()
                await asyncio.get_running_loop().run_in_executor(None, self.kernel.apply, exposures)
            except ExposureError as exc:
                log.error("forwarding not updated", extra={"why": why, "error": str(exc)})
                return
            except Exception:  # the database is away, a bug: transportd itself must go on
                log.exception("forwarding not updated", extra={"why": why})
                return
            log.info("forwarding updated", extra={"why": why, "services": len(exposures)})

    async def _watch_usage(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.usage_interval)
            try:
                usage: Usage = await loop.run_in_executor(None, self.kernel.flows)
            except ExposureError as exc:
                log.warning("flows unreadable", extra={"error": str(exc)})
                continue
            except Exception:
                log.exception("flows unreadable")
                continue
            usage = {s: d for s, d in usage.items() if d}
            if usage != self.usage:
                self.usage = usage
                try:
                    await sync_to_async(self.on_usage)(usage)
                except Exception:  # the console is away (Redis restarting): the next look retries
                    log.exception("usage not reported")
                    self.usage = None

    async def close(self) -> None:
        """Stop watching, wait for a refresh in progress, remove the forwarding, and tell the
        console nobody uses anything any more (it would otherwise show the last picture)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        async with self._lock:
            self._closed = True
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.kernel.close)
            except ExposureError as exc:
                log.error("forwarding not fully removed", extra={"error": str(exc)})
        try:
            await sync_to_async(self.on_usage)({})
        except Exception:
            log.exception("usage not cleared")
