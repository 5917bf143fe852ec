"""Writes to the box itself. Views call these; they own the transaction and the audit entry."""

from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from lazycat.core import audit, keys, push
from lazycat.core.live import after_commit
from lazycat.core.models import Box, BoxNetcheck
from transport import names
from transport.netcheck import NetcheckReport
from transport.stun import format_address

# The box's netcheck history: enough to see a change of router, small enough to never matter.
NETCHECKS_KEPT = 50


class SetupError(Exception):
    pass


def do_setup_box(box_name: str, username: str, password: str, source: str = "") -> Box:
    """First run: name the box, create its key pair and the owner account. Only once."""
    label = names.validate_label(box_name)
    _, public = keys.load_or_create(settings.LAZYCAT_BOX_KEY_FILE)
    with transaction.atomic():
        if Box.objects.exists():
            raise SetupError("This box is already set up.")
        box = Box.objects.create(name=label, public_key=public)
        owner = get_user_model().objects.create_superuser(username=username, password=password)
        audit.record(
            "box.setup",
            actor=owner,
            target=box,
            after={"name": box.name, "fingerprint": box.fingerprint, "owner": username},
            source=source,
        )
    return box


def do_set_accept_without_code(box: Box, enabled: bool, by: User) -> None:
    with transaction.atomic():
        before = {"accept_without_code": box.accept_without_code}
        box.accept_without_code = enabled
        box.save(update_fields=["accept_without_code"])
        audit.record(
            "box.settings",
            actor=by,
            target=box,
            before=before,
            after={"accept_without_code": enabled},
        )


def do_record_box_netcheck(
    report: NetcheckReport, port_mapping: str = "", at: datetime | None = None
) -> BoxNetcheck:
    """Store one run of the box's network check, forget all but the newest NETCHECKS_KEPT, and
    after commit push the dashboard card (and the relay reasons of relayed devices, which
    depend on it) to every console."""
    reflexive = report.ipv4.reflexive or report.ipv6.reflexive
    with transaction.atomic():
        check = BoxNetcheck.objects.create(
            at=at or timezone.now(),
            report=report.to_json(),
            nat_type=str(report.nat_type),
            udp=report.udp,
            ipv6=report.ipv6.reachable,
            reflexive=format_address(reflexive) if reflexive else "",
            port_mapping=port_mapping,
            relay_latencies=[
                {"name": r.name, "rtt_ms": None if r.rtt is None else round(r.rtt * 1000, 1)}
                for r in report.relays
            ],
            summary=report.summary(),
        )
        stale = BoxNetcheck.objects.order_by("-at", "-pk").values_list("pk", flat=True)
        BoxNetcheck.objects.filter(pk__in=list(stale[NETCHECKS_KEPT:])).delete()
        after_commit(push.netcheck_changed)
    return check
