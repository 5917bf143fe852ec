"""Prometheus metrics, read from the database at scrape time.

Gauges computed per scrape (not counters kept in memory) give the same answer whichever of the
processes serves /metrics.
"""

from __future__ import annotations

from collections.abc import Iterator

from django.db.models import Count, Sum
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from lazycat.devices.models import Device, DeviceStatus, PairingCode, PathKind
from lazycat.services.models import Service


class LazycatCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        by_status = GaugeMetricFamily(
            "lazycat_devices", "Devices by approval status", labels=["status"]
        )
        counts = dict(Device.objects.values_list("status").annotate(n=Count("pk")))
        for status in DeviceStatus:
            by_status.add_metric([status.value], counts.get(status.value, 0))
        yield by_status

        by_path = GaugeMetricFamily(
            "lazycat_device_paths", "Approved devices by tunnel path", labels=["path"]
        )
        approved = Device.objects.filter(status=DeviceStatus.APPROVED)
        paths = dict(approved.values_list("path").annotate(n=Count("pk")))
        for kind in PathKind:
            by_path.add_metric([kind.value], paths.get(kind.value, 0))
        yield by_path

        totals = approved.aggregate(rx=Sum("rx_bytes"), tx=Sum("tx_bytes"))
        traffic = GaugeMetricFamily(
            "lazycat_tunnel_bytes", "Bytes through current device sessions", labels=["direction"]
        )
        traffic.add_metric(["rx"], totals["rx"] or 0)
        traffic.add_metric(["tx"], totals["tx"] or 0)
        yield traffic

        yield GaugeMetricFamily(
            "lazycat_pairing_codes_active",
            "Pairing codes that can still be used",
            value=PairingCode.objects.filter(
                used_at=None, cancelled=False, expires_at__gt=timezone.now()
            ).count(),
        )
        yield GaugeMetricFamily(
            "lazycat_services", "Services the box exposes", value=Service.objects.count()
        )


registry = CollectorRegistry(auto_describe=False)
registry.register(LazycatCollector())
