"""Periodic and on-demand jobs about the box itself. Thin wrappers: the logic is in actions."""

from __future__ import annotations

import asyncio

from celery import shared_task
from django.conf import settings

from lazycat.core import actions
from transport.netcheck_aio import run_netcheck


@shared_task(ignore_result=True)
def check_box_network() -> int | None:
    """Run netcheck against the configured relays (each relay answers STUN on its address) and
    record it. Returns the run's id, or None when no relay is configured (nothing to ask)."""
    relays = [(r.name, (r.host, r.port)) for r in settings.LAZYCAT_RELAYS]
    if not relays:
        return None
    # Relays are the STUN servers: every relay answers Binding requests on its own address.
    report = asyncio.run(run_netcheck((), relays))
    # The router's port mapping is transportd's (it holds it on the tunnel's port): as published.
    from lazycat.devices.negotiation import box_candidates

    _, port_mapping = box_candidates()
    return actions.do_record_box_netcheck(report, port_mapping=port_mapping).pk
