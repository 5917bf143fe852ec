"""Reachability checks through the console: on save, on "check again", the stored verdict, the
live push, and the Celery task wrapper. The probes go to real listeners on loopback."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from lazycat.celery import app as celery_app
from lazycat.core.live import CONSOLE_GROUP
from lazycat.services import actions, reachability, tasks
from lazycat.services.forms import ServiceForm
from lazycat.services.models import CheckState, Service
from tests.broker import queued_task_names
from tests.layer import Listener

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def save(owner, instance: Service | None = None, **changes: object) -> Service:
    data = {
        "kind": "dev-app",
        "name": "web",
        "target": "127.0.0.1",
        "ports": "tcp 8000",
        "exclude_ports": "",
        "access_all": "on",
        **changes,
    }
    form = ServiceForm(data=data, instance=instance)
    assert form.is_valid(), form.errors
    return actions.do_save_service(form, owner)


def fragments(listener: Listener) -> str:
    return "".join(m["html"] for m in listener.messages() if m["type"] == "console.fragment")


def test_saving_marks_checking_pushes_the_row_and_queues_the_check(box, owner):
    queued_task_names()
    consoles = Listener(CONSOLE_GROUP)
    service = save(owner)
    assert Service.objects.get(pk=service.pk).check_state == CheckState.CHECKING
    html = fragments(consoles)
    row = re.search(rf'<tr id="service-{service.pk}"[^>]*>', html)
    assert row is not None
    assert 'hx-swap-oob="true"' in row.group(0) and 'data-fresh="true"' in row.group(0)
    assert "checking…" in html
    assert queued_task_names() == ["lazycat.services.tasks.check_service"]

    consoles = Listener(CONSOLE_GROUP)
    save(owner, instance=service, target="127.0.0.2")
    edited = fragments(consoles)
    assert f'id="service-{service.pk}"' in edited and 'data-fresh="true"' not in edited
    assert queued_task_names() == ["lazycat.services.tasks.check_service"]


def test_check_records_the_verdict_and_pushes_it(box, owner, listening):
    service = save(owner, ports=f"tcp {listening}")
    consoles = Listener(CONSOLE_GROUP)
    result = actions.do_check_service(service.pk)
    assert result is not None and result.state is reachability.State.OK
    stored = Service.objects.get(pk=service.pk)
    assert stored.check_state == CheckState.OK
    assert stored.check_summary == f"reachable (tcp {listening} open)"
    assert stored.check_details["probes"][0]["outcome"] == "open"
    assert stored.checked_at is not None
    assert stored.updated_at == service.updated_at  # a check is not an edit
    html = fragments(consoles)
    assert f'<tr id="service-{service.pk}"' in html
    assert f'<section id="service-check-{service.pk}"' in html
    assert f"reachable (tcp {listening} open)" in html and "checking…" not in html


def test_a_problem_is_stored_with_its_advice(box, owner, listening):
    with socket.socket() as s:  # a port that was just free: nothing listens there now
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    service = save(owner, kind="vm", ports=f"tcp {closed}")
    actions.do_check_service(service.pk)
    stored = Service.objects.get(pk=service.pk)
    assert stored.check_state == CheckState.PROBLEM
    assert stored.check_summary == (
        f"127.0.0.1 refuses tcp {closed}: is the service listening on that port?"
    )


def test_a_check_overtaken_by_an_edit_is_not_recorded(box, owner, listening, monkeypatch):
    service = save(owner, ports=f"tcp {listening}")
    real_check = reachability.check

    def check_while_the_owner_edits(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = real_check(*args, **kwargs)
        save(owner, instance=Service.objects.get(pk=service.pk), target="127.0.0.2")
        return result

    monkeypatch.setattr(reachability, "check", check_while_the_owner_edits)
    actions.do_check_service(service.pk)
    stored = Service.objects.get(pk=service.pk)
    assert stored.target == "127.0.0.2"
    assert stored.check_state == CheckState.CHECKING  # the newer check will answer
    assert stored.check_summary == ""


def test_a_deleted_service_is_not_checked(box, owner):
    service = save(owner)
    actions.do_delete_service(service, owner)
    assert actions.do_check_service(service.pk) is None


def test_deleting_pushes_the_rows_removal(box, owner):
    service = save(owner)
    pk = service.pk
    consoles = Listener(CONSOLE_GROUP)
    actions.do_delete_service(service, owner)
    assert f'<tr id="service-{pk}" hx-swap-oob="delete"></tr>' in fragments(consoles)


def test_the_task_runs_the_check(box, owner, listening):
    service = save(owner, ports=f"tcp {listening}")
    assert tasks.check_service(service.pk) == "ok"
    assert Service.objects.get(pk=service.pk).check_state == CheckState.OK
    assert tasks.check_service(service.pk + 1000) is None
    assert "lazycat.services.tasks.check_service" in celery_app.tasks


# --- the pages ----------------------------------------------------------------------------------


def test_check_again_queues_and_answers_htmx_with_the_row(box, owner, listening):
    service = save(owner, ports=f"tcp {listening}")
    actions.do_check_service(service.pk)
    queued_task_names()
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    client.get(reverse("services:list"))
    token = client.cookies["csrftoken"].value
    url = reverse("services:check", args=[service.pk])

    response = client.post(url, HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 302 and response["Location"] == reverse("services:list")
    assert queued_task_names() == ["lazycat.services.tasks.check_service"]

    htmx = client.post(url, HTTP_X_CSRFTOKEN=token, HTTP_HX_REQUEST="1")
    html = htmx.content.decode()
    assert html.startswith(f'<tr id="service-{service.pk}"') and "checking…" in html
    assert queued_task_names() == ["lazycat.services.tasks.check_service"]

    panel = client.post(url, {"from": "edit"}, HTTP_X_CSRFTOKEN=token, HTTP_HX_REQUEST="1")
    assert panel.content.decode().startswith(f'<section id="service-check-{service.pk}"')
    assert queued_task_names() == ["lazycat.services.tasks.check_service"]


def test_check_again_needs_login_csrf_and_post(box, owner):
    service = save(owner)
    queued_task_names()
    url = reverse("services:check", args=[service.pk])
    anonymous = Client().post(url)
    assert anonymous.status_code == 302 and "/login/" in anonymous["Location"]
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    assert client.post(url).status_code == 403
    assert client.get(url).status_code == 405
    assert queued_task_names() == []


def test_the_list_and_edit_page_show_the_last_verdict(owner_client, owner, listening):
    service = save(owner, ports=f"tcp {listening}")
    actions.do_check_service(service.pk)
    listed = owner_client.get(reverse("services:list")).content.decode()
    assert f"reachable (tcp {listening} open)" in listed
    edit = owner_client.get(reverse("services:edit", args=[service.pk])).content.decode()
    assert f'<section id="service-check-{service.pk}"' in edit
    assert f"reachable (tcp {listening} open)" in edit
    assert f'tcp {listening}</td><td class="outcome-open">open' in edit


def test_a_check_that_never_reports_says_so(owner_client, owner):
    service = save(owner)
    Service.objects.filter(pk=service.pk).update(
        check_started_at=timezone.now() - timedelta(minutes=5)
    )
    listed = owner_client.get(reverse("services:list")).content.decode()
    assert "the check did not finish: is the Celery worker running?" in listed


def test_htmx_delete_answers_empty(box, owner):
    service = save(owner)
    client = Client()
    client.force_login(owner)
    response = client.post(reverse("services:delete", args=[service.pk]), HTTP_HX_REQUEST="1")
    assert response.status_code == 200 and response.content == b""
    assert not Service.objects.exists()
