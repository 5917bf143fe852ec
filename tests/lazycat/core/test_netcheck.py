"""The box's own network check: the action, the task wrapper, the dashboard card, the push."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from lazycat.celery import app as celery_app
from lazycat.core import actions, tasks
from lazycat.core.live import CONSOLE_GROUP
from lazycat.core.models import BoxNetcheck
from tests.broker import queued_task_names
from tests.layer import Listener
from transport.netcheck import (
    FamilyReport,
    Filtering,
    MappingBehavior,
    NatType,
    NetcheckReport,
    RelayLatency,
)

pytestmark = pytest.mark.django_db(transaction=True)


def canned_report(nat: NatType = NatType.NAT4, *, ipv6: bool = False) -> NetcheckReport:
    """What run_netcheck would answer behind a symmetric NAT (documentation addresses)."""
    v4 = FamilyReport(
        family=4,
        tested=True,
        reachable=True,
        local="10.0.0.2",
        interface="eth0",
        reflexive=("203.0.113.7", 40001),
        open=False,
        mapping=MappingBehavior.ADDRESS_AND_PORT_DEPENDENT
        if nat is NatType.NAT4
        else MappingBehavior.ENDPOINT_INDEPENDENT,
        filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT,
        nat_type=nat,
        hairpinning=False,
    )
    v6 = FamilyReport(
        family=6,
        tested=ipv6,
        reachable=ipv6,
        local="2001:db8::2" if ipv6 else None,
        interface="eth0" if ipv6 else None,
        reflexive=("2001:db8::2", 40001) if ipv6 else None,
        open=ipv6,
        mapping=MappingBehavior.ENDPOINT_INDEPENDENT if ipv6 else None,
        filtering=None,
        nat_type=NatType.OPEN if ipv6 else NatType.BLOCKED,
        hairpinning=None,
    )
    return NetcheckReport(
        udp=True,
        ipv4=v4,
        ipv6=v6,
        relays=(
            RelayLatency("home", ("203.0.113.10", 3478), 0.0123),
            RelayLatency("far", ("198.51.100.9", 3478), None),
        ),
        observations=(),
        notes=(),
        duration=1.5,
    )


# --- the action ---------------------------------------------------------------------------------


def test_record_stores_what_the_card_shows(box):
    check = actions.do_record_box_netcheck(
        canned_report(ipv6=True), port_mapping="203.0.113.7:7483"
    )
    check.refresh_from_db()
    assert check.nat_type == "NAT4" and check.udp and check.ipv6
    assert check.reflexive == "203.0.113.7:40001"
    assert check.port_mapping == "203.0.113.7:7483"
    assert check.relay_latencies == [
        {"name": "home", "rtt_ms": 12.3},
        {"name": "far", "rtt_ms": None},
    ]
    assert check.report["nat_type"] == "NAT4" and check.report["relays"][0]["name"] == "home"
    assert check.summary.startswith("UDP works. IPv4 203.0.113.7 behind a symmetric NAT (NAT4)")
    assert check.nat_facts().nat_type is NatType.NAT4 and check.nat_facts().port_mapping


def test_record_keeps_the_newest_fifty(box):
    start = timezone.now() - timedelta(days=1)
    for i in range(actions.NETCHECKS_KEPT + 3):
        actions.do_record_box_netcheck(canned_report(), at=start + timedelta(minutes=10 * i))
    assert BoxNetcheck.objects.count() == actions.NETCHECKS_KEPT
    oldest = BoxNetcheck.objects.order_by("at").first()
    assert oldest is not None and oldest.at == start + timedelta(minutes=30)
    latest = BoxNetcheck.objects.latest_run()
    assert latest is not None
    assert latest.at == start + timedelta(minutes=10 * (actions.NETCHECKS_KEPT + 2))


def test_record_pushes_the_card_after_commit(box):
    listener = Listener(CONSOLE_GROUP)
    with transaction.atomic():
        actions.do_record_box_netcheck(canned_report())
    (message,) = listener.messages()  # the rollback test below: nothing without the commit
    assert message["type"] == "console.fragment"
    html = message["html"]
    assert '<section id="box-netcheck"' in html and 'hx-swap-oob="true"' in html
    assert "Symmetric NAT (NAT4)" in html and "203.0.113.7:40001" in html
    assert "home 12 ms" in html and "far no answer" in html


def test_a_rolled_back_record_pushes_nothing(box):
    listener = Listener(CONSOLE_GROUP)
    with pytest.raises(RuntimeError), transaction.atomic():
        actions.do_record_box_netcheck(canned_report())
        raise RuntimeError("rolled back")
    assert listener.messages(timeout=0.5) == []
    assert not BoxNetcheck.objects.exists()


# --- the task wrapper ---------------------------------------------------------------------------


def test_task_checks_against_the_relays_and_records(box, monkeypatch):
    calls = []

    async def fake_run_netcheck(servers, relays, **kwargs):  # the network boundary only
        calls.append((list(servers), list(relays)))
        return canned_report(NatType.NAT3)

    monkeypatch.setattr(tasks, "run_netcheck", fake_run_netcheck)
    pk = tasks.check_box_network()
    assert calls == [([], [("home", ("203.0.113.10", 3478))])]  # tests/settings.py's relay
    check = BoxNetcheck.objects.get(pk=pk)
    assert check.nat_type == "NAT3"
    assert check.port_mapping == ""  # transportd published none


def test_task_records_the_port_mapping_transportd_holds(box, monkeypatch):
    from lazycat.devices.negotiation import publish_box_candidates

    async def fake_run_netcheck(servers, relays, **kwargs):
        return canned_report(NatType.NAT4)

    monkeypatch.setattr(tasks, "run_netcheck", fake_run_netcheck)
    publish_box_candidates([], port_mapping="203.0.113.7:40001")
    check = BoxNetcheck.objects.get(pk=tasks.check_box_network())
    assert check.port_mapping == "203.0.113.7:40001"
    assert check.nat_facts().port_mapping  # so NAT4 devices are not told the box is hopeless


def test_task_without_relays_does_nothing(box, monkeypatch, settings):
    settings.LAZYCAT_RELAYS = ()

    async def must_not_run(*args, **kwargs):
        raise AssertionError("no relay: nothing to ask")

    monkeypatch.setattr(tasks, "run_netcheck", must_not_run)
    assert tasks.check_box_network() is None
    assert not BoxNetcheck.objects.exists()


def test_beat_runs_the_check_every_ten_minutes(settings):
    entry = settings.CELERY_BEAT_SCHEDULE["check-box-network"]
    assert entry == {"task": "lazycat.core.tasks.check_box_network", "schedule": 600}
    assert entry["task"] in celery_app.tasks


# --- the dashboard card and "Check now" ---------------------------------------------------------


def test_card_before_the_first_check(owner_client):
    html = owner_client.get(reverse("core:dashboard")).content.decode()
    assert '<section id="box-netcheck"' in html
    assert "Not checked yet" in html and "Check now" in html


def test_card_shows_the_latest_check(owner_client):
    actions.do_record_box_netcheck(canned_report(NatType.NAT1), at=timezone.now() - timedelta(1))
    actions.do_record_box_netcheck(canned_report(ipv6=True), port_mapping="203.0.113.7:7483")
    html = owner_client.get(reverse("core:dashboard")).content.decode()
    assert "Symmetric NAT (NAT4)" in html and "Full cone" not in html
    assert '<dd class="ipv6">yes</dd>' in html
    assert "<code>203.0.113.7:40001</code>" in html and "<code>203.0.113.7:7483</code>" in html
    assert "home 12 ms" in html


def test_card_without_relays_says_what_to_set(owner_client, settings):
    settings.LAZYCAT_RELAYS = ()
    html = owner_client.get(reverse("core:dashboard")).content.decode()
    assert "No relay is configured" in html and "LAZYCAT_RELAYS" in html
    assert "Check now" not in html


def test_dashboard_queries_do_not_grow_with_history(owner_client):
    actions.do_record_box_netcheck(canned_report())

    def count() -> int:
        with CaptureQueriesContext(connection) as queries:
            assert owner_client.get(reverse("core:dashboard")).status_code == 200
        return len(queries)

    count()  # the first request of a session does a little more (session, messages)
    one = count()
    for _ in range(30):
        actions.do_record_box_netcheck(canned_report())
    assert count() == one


def test_check_now_queues_the_task(box, owner):
    queued_task_names()  # start from an empty queue
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    client.get(reverse("core:dashboard"))
    token = client.cookies["csrftoken"].value
    response = client.post(reverse("core:check_network"), HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 302 and response["Location"] == reverse("core:dashboard")
    assert queued_task_names() == ["lazycat.core.tasks.check_box_network"]
    htmx = client.post(reverse("core:check_network"), HTTP_X_CSRFTOKEN=token, HTTP_HX_REQUEST="1")
    assert htmx.status_code == 200 and "Checking…" in htmx.content.decode()
    assert queued_task_names() == ["lazycat.core.tasks.check_box_network"]


def test_check_now_enforces_csrf_login_and_post(box, owner):
    queued_task_names()
    anonymous = Client().post(reverse("core:check_network"))
    assert anonymous.status_code == 302 and "/login/" in anonymous["Location"]
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    assert client.post(reverse("core:check_network")).status_code == 403  # no CSRF token
    assert client.get(reverse("core:check_network")).status_code == 405
    assert queued_task_names() == []
