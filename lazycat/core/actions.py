"""Writes to the box itself. Views call these; they own the transaction and the audit entry."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db import transaction

from lazycat.core import audit, keys
from lazycat.core.models import Box
from transport import names


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
