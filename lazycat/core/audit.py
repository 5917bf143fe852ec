"""One way to write the audit log, so every decision is recorded the same way."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AnonymousUser, User
from django.db import models

from lazycat.core.models import AuditEvent

SYSTEM = "system"


def record(
    action: str,
    *,
    actor: User | AnonymousUser | None = None,
    actor_label: str = "",
    target: models.Model | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    source: str = "",
    detail: str = "",
) -> AuditEvent:
    """Append one audit event. `actor` is a user; devices and the system pass `actor_label`."""
    user = actor if isinstance(actor, User) else None
    label = actor_label or (user.get_username() if user else SYSTEM)
    return AuditEvent.objects.create(
        actor=user,
        actor_label=label[:150],
        action=action,
        target_type=target._meta.model_name or "" if target is not None else "",
        target_id=str(target.pk) if target is not None else "",
        target_label=str(target)[:200] if target is not None else "",
        before=before,
        after=after,
        source=source[:64],
        detail=detail[:500],
    )
