"""Writes to services. Each change is audited and announced to the tunnel daemon after commit."""

from __future__ import annotations

from django.contrib.auth.models import User
from django.db import transaction

from lazycat import overlay
from lazycat.core import audit
from lazycat.core.live import after_commit, send_to_transportd
from lazycat.core.models import Box
from lazycat.services.forms import ServiceForm
from lazycat.services.models import Service
from transport import addressing


def _notify(uid: str, deleted: bool = False) -> None:
    send_to_transportd({"type": "service.changed", "uid": uid, "deleted": deleted})


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
        service = form.save()
        audit.record(
            "service.created" if creating else "service.changed",
            actor=by,
            target=service,
            before=before,
            after=service.audit_state(),
        )
        after_commit(_notify, str(service.uid))
    return service


def do_delete_service(service: Service, by: User) -> None:
    with transaction.atomic():
        before = service.audit_state()
        uid = str(service.uid)
        audit.record("service.deleted", actor=by, target=service, before=before)
        service.delete()
        after_commit(_notify, uid, True)
