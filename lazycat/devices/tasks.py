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
