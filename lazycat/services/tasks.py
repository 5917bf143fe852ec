"""On-demand jobs about services. Thin wrappers: the logic is in actions."""

from __future__ import annotations

from celery import shared_task

from lazycat.services import actions


@shared_task(ignore_result=True)
def check_service(service_id: int) -> str | None:
    """Probe a service's target (a few seconds at most) and push the verdict to the consoles.
    Returns the verdict's state, or None when the service no longer exists."""
    result = actions.do_check_service(service_id)
    return None if result is None else str(result.state)
