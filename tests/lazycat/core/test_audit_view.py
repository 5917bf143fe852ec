"""The audit log page: newest first, 50 a page, filtered by action, showing what changed."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from lazycat.core import audit
from lazycat.core.models import AuditEvent

pytestmark = pytest.mark.django_db


def details(html: str) -> list[str]:
    """The event details in page order (each test event carries "n=<number>")."""
    return re.findall(r'<div class="detail">(n=\d+)</div>', html)


def test_events_are_listed_newest_first_fifty_a_page(owner_client):
    AuditEvent.objects.all().delete()  # the box.setup event
    for n in range(60):
        audit.record("test.event", actor_label="tester", detail=f"n={n}")

    first = owner_client.get(reverse("core:audit"))
    assert first.status_code == 200
    assert details(first.content.decode()) == [f"n={n}" for n in range(59, 9, -1)]
    assert "page 1 of 2" in first.content.decode()

    second = owner_client.get(reverse("core:audit"), {"page": 2})
    assert details(second.content.decode()) == [f"n={n}" for n in range(9, -1, -1)]
    assert "page 2 of 2" in second.content.decode()


def test_filter_by_action_prefix(owner_client):
    audit.record("device.approved", actor_label="tester", detail="n=1")
    audit.record("device.rejected", actor_label="tester", detail="n=2")
    audit.record("service.created", actor_label="tester", detail="n=3")
    audit.record("devices-other", actor_label="tester", detail="n=4")

    response = owner_client.get(reverse("core:audit"), {"action": "device."})
    html = response.content.decode()
    assert details(html) == ["n=2", "n=1"]
    assert "<code>service.created</code>" not in html

    everything = owner_client.get(reverse("core:audit")).content.decode()
    assert details(everything) == ["n=4", "n=3", "n=2", "n=1"]
    # Every action seen is offered in the filter, the chosen one selected.
    assert '<option value="device.approved">' in html
    assert '<option value="box.setup">' in html
    exact = owner_client.get(reverse("core:audit"), {"action": "device.approved"}).content
    assert details(exact.decode()) == ["n=1"]
    assert '<option value="device.approved" selected>' in exact.decode()


def test_filter_keeps_the_action_across_pages(owner_client):
    for n in range(55):
        audit.record("service.changed", actor_label="tester", detail=f"n={n}")
    html = owner_client.get(reverse("core:audit"), {"action": "service."}).content.decode()
    assert "page 1 of 2" in html
    assert 'href="?action=service.&amp;page=2"' in html


def test_changes_show_before_and_after(owner_client):
    audit.record(
        "device.approved",
        actor_label="owner",
        before={"status": "pending", "label": None, "name": "Phone"},
        after={"status": "approved", "label": "phone", "name": "Phone"},
    )
    html = owner_client.get(reverse("core:audit"), {"action": "device."}).content.decode()
    row = re.search(r"<code>device.approved</code>.*?</tr>", html, re.S)
    assert row is not None
    changes = re.findall(r'<div class="change">(.*?)</div>', row.group(0), re.S)
    assert changes == [
        '<span class="field">label</span> <ins>phone</ins>',
        '<span class="field">status</span> <del>pending</del> → <ins>approved</ins>',
    ]  # "name" did not change, so it is not shown


def test_a_deletion_shows_what_was_removed(owner_client):
    audit.record("service.deleted", actor_label="owner", before={"name": "nas"})
    html = owner_client.get(reverse("core:audit"), {"action": "service."}).content.decode()
    assert '<span class="field">name</span> <del>nas</del> → <ins>—</ins>' in html
