"""Writes to services. Each change is audited and announced to the tunnel daemon after commit.

Every save also starts a reachability check (``lazycat.services.reachability``): the row says
"checking…" at once, the Celery task ``check_service`` runs the probes outside any transaction
and :func:`do_check_service` stores the verdict and pushes the row to every open console.
"""

from __future__ import annotations

from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from lazycat import overlay
from lazycat.core import audit
from lazycat.core.live import after_commit, send_to_transportd
from lazycat.core.models import Box
from lazycat.services import push, reachability
from lazycat.services.forms import ServiceForm
from lazycat.services.models import CheckState, Service
from transport import addressing


def _notify(uid: str, deleted: bool = False) -> None:
    send_to_transportd({"type": "service.changed", "uid": uid, "deleted": deleted})


def _queue_check(service_id: int) -> None:
    from lazycat.services import tasks

    tasks.check_service.delay(service_id)


def do_save_service(form: ServiceForm, by: User) -> Service:
    """Create or update the service a valid form describes. A new service gets its overlay
    address here, derived from its stable id (docs/addressing.md)."""
    box = Box.get()
    assert box is not None
    with transaction.atomic():
        service: Service = form.instance
        creating = service.pk is None
        before = None if creating else Service.objects.get(pk=service.pk).audit_state()
        if creating:
            service.overlay_address = str(
                addressing.service_address(
                    box.key, str(service.uid), taken=overlay.taken_addresses()
                )
            )
        # The target or ports may have changed: the last verdict no longer applies.
        service.check_state = CheckState.CHECKING
        service.check_started_at = timezone.now()
        service = form.save()
        audit.record(
            "service.created" if creating else "service.changed",
            actor=by,
            target=service,
            before=before,
            after=service.audit_state(),
        )
        after_commit(_notify, str(service.uid))
        after_commit(push.services_changed, [service.pk], creating)
        after_commit(_queue_check, service.pk)
    return service


def do_request_check(service: Service) -> Service:
    """ "Check again": mark the service as checking, push that, and queue the check."""
    with transaction.atomic():
        now = timezone.now()
        Service.objects.filter(pk=service.pk).update(
            check_state=CheckState.CHECKING, check_started_at=now
        )
        service.check_state, service.check_started_at = CheckState.CHECKING, now
        after_commit(push.services_changed, [service.pk])
        after_commit(_queue_check, service.pk)
    return service


def do_check_service(service_id: int, *, timeout: float = 2.0) -> reachability.Result | None:
    """Probe the service's target now and record the verdict. None if the service is gone.

    The probes take up to `timeout` seconds and run outside any transaction. The verdict is
    stored only if the target and ports are still the ones probed: a check that an edit
    overtook must not describe the new target."""
    service = Service.objects.filter(pk=service_id).first()
    if service is None:
        return None
    result = reachability.check(
        service.target, service.policy, timeout=timeout, subject=service.check_subject
    )
    state = {
        reachability.State.OK: CheckState.OK,
        reachability.State.PROBLEM: CheckState.PROBLEM,
        reachability.State.UNCONFIRMED: CheckState.UNCONFIRMED,
    }[result.state]
    recorded = Service.objects.filter(
        pk=service.pk,
        target=service.target,
        ports=service.ports,
        exclude_ports=service.exclude_ports,
    ).update(
        check_state=state,
        check_summary=result.summary[:500],
        check_details=result.to_json(),
        checked_at=timezone.now(),
    )
    if recorded:
        push.services_changed([service.pk])
    return result


def do_delete_service(service: Service, by: User) -> None:
    with transaction.atomic():
        before = service.audit_state()
        uid, pk = str(service.uid), service.pk
        audit.record("service.deleted", actor=by, target=service, before=before)
        service.delete()
        after_commit(_notify, uid, True)
        after_commit(push.service_removed, pk)
