"""Periodic jobs (Celery beat). Thin wrappers: the logic is in actions."""

from __future__ import annotations

from celery import shared_task

from lazycat.devices import actions


@shared_task(ignore_result=True)
def expire_pairing_codes() -> int:
    return actions.do_expire_pairing_codes()


@shared_task(ignore_result=True)
def expire_approvals() -> int:
    return actions.do_expire_approvals()


@shared_task(ignore_result=True)
def mark_stale_devices_offline() -> int:
    return actions.do_mark_stale_devices_offline()


# --- the negotiation (docs/negotiation.md) -----------------------------------------------------


@shared_task(ignore_result=True)
def negotiate(device_id: int, generation: int) -> None:
    """Pair the candidates and start both sides; check the outcome a few seconds later."""
    from lazycat.devices import negotiation

    started = negotiation.do_negotiate(device_id, generation)
    if started is not None:
        check_negotiation.apply_async(
            (device_id, generation),
            countdown=started.plan.box_delay + negotiation.CHECK_AFTER,
        )


@shared_task(ignore_result=True)
def check_negotiation(device_id: int, generation: int) -> None:
    """Direct by now? Done. Otherwise try again later (5, 10, 20 … 300 s)."""
    from lazycat.devices import negotiation

    delay = negotiation.do_check_negotiation(device_id, generation)
    if delay is not None:
        negotiate.apply_async((device_id, generation), countdown=delay)
