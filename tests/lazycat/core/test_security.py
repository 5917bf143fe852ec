"""What protects the console: sign-in, lockout, CSRF, CSP, the open and the guarded endpoints."""

from __future__ import annotations

import logging
import os
import re
import secrets
import string
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.template.loader import render_to_string
from django.test import Client
from django.urls import reverse

from lazycat.core import health
from lazycat.devices import actions
from lazycat.devices.actions import DeviceFacts
from lazycat.devices.models import Device
from transport.logfmt import LogfmtFormatter

pytestmark = pytest.mark.django_db

CONSOLE_URLS = [
    ("core:dashboard", []),
    ("devices:list", []),
    ("devices:pair", []),
    ("services:list", []),
    ("services:add", []),
    ("core:audit", []),
    ("core:settings", []),
]
WORK = Path(__file__).resolve().parents[3]


def approved_device(box, owner, n: int) -> Device:
    _, bundle = actions.do_create_pairing_code(box, owner)
    outcome = actions.do_request_pairing(
        bundle.secret, bytes([n]) * 32, DeviceFacts(name=f"Device {n}"), "192.0.2.1"
    )
    assert outcome.device is not None
    return actions.do_approve_device(outcome.device, owner)


@pytest.mark.parametrize(("name", "args"), CONSOLE_URLS)
def test_console_pages_require_sign_in(client, box, name, args):
    url = reverse(name, args=args)
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('core:login')}?next={url}"


@pytest.mark.parametrize("set_up", [False, True])
def test_healthz_answers_without_sign_in_or_database(
    request, client, django_assert_num_queries, set_up
):
    if set_up:
        request.getfixturevalue("box")
    with django_assert_num_queries(0):
        response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"ok": True}


def test_readyz_reports_each_check_and_fails_without_a_worker(client, box):
    # Database, Redis and the channel layer are real here; no Celery worker runs in unit tests.
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    checks = body["checks"]
    assert body["ok"] is False
    assert checks["database"]["ok"] is True
    assert checks["redis"]["ok"] is True
    assert checks["channel_layer"]["ok"] is True
    assert checks["celery"]["ok"] is False
    assert checks["celery"]["error"] == "celery: no worker answered a ping within 1 s"


def test_readyz_is_ready_when_a_worker_answers(client, box, monkeypatch):
    # The worker is a boundary these tests don't run; everything else is the real thing.
    monkeypatch.setitem(health.CHECKS, "celery", lambda: None)
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True
    assert set(body["checks"]) == {"database", "redis", "channel_layer", "celery"}
    assert all(check["ok"] for check in body["checks"].values())


def test_metrics_are_off_without_a_key(client, box, settings):
    settings.LAZYCAT_METRICS_KEY = ""
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer ")
    assert response.status_code == 404


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-key", "s3cret-metrics-key", "Basic x"]
)
def test_metrics_refuse_a_missing_or_wrong_key(client, box, settings, authorization):
    settings.LAZYCAT_METRICS_KEY = "s3cret-metrics-key"
    headers = {"HTTP_AUTHORIZATION": authorization} if authorization else {}
    response = client.get("/metrics", **headers)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert b"lazycat_devices" not in response.content


def test_metrics_with_the_key(client, box, owner, settings):
    settings.LAZYCAT_METRICS_KEY = "s3cret-metrics-key"
    approved_device(box, owner, 1)
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-metrics-key")
    assert response.status_code == 200
    text = response.content.decode()
    assert 'lazycat_devices{status="approved"} 1.0' in text
    assert 'lazycat_devices{status="pending"} 0.0' in text
    assert "lazycat_services 0.0" in text


def assert_csp(response) -> None:
    assert response["Content-Type"].startswith("text/html")
    policy = response["Content-Security-Policy"]
    assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    html = response.content.decode()
    # The policy only holds if the pages need nothing it forbids.
    assert not re.search(r"<script(?![^>]*\ssrc=)[^>]*>", html), "inline <script>"
    assert not re.search(r"\sstyle=", html), "inline style attribute"
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"


def test_setup_page_carries_csp(client, db):
    assert_csp(client.get(reverse("core:setup")))


def test_every_console_page_carries_csp(client, box, owner):
    approved_device(box, owner, 1)
    assert_csp(client.get(reverse("core:login")))
    client.force_login(owner)
    device = Device.objects.get()
    pages = [reverse(name, args=args) for name, args in CONSOLE_URLS]
    pages.append(reverse("devices:detail", args=[device.pk]))
    for url in pages:
        response = client.get(url)
        assert response.status_code == 200, url
        assert_csp(response)
    pair = client.post(reverse("devices:pair"))
    assert pair.status_code == 200
    assert_csp(pair)
    missing = client.get("/services/999/")
    assert missing.status_code == 404
    assert "'unsafe-inline'" not in missing["Content-Security-Policy"]


def test_post_without_csrf_token_is_refused(owner, box):
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    response = client.post(reverse("core:settings"), {"accept_without_code": "on"})
    assert response.status_code == 403
    box.refresh_from_db()
    assert box.accept_without_code is False


def test_login_locks_out_after_five_wrong_passwords(client, owner):
    login = reverse("core:login")
    for _ in range(4):
        response = client.post(login, {"username": "owner", "password": "wrong password"})
        assert response.status_code == 200  # the form again, with its error
    # The fifth failure reaches the limit: django-axes answers 429 from then on.
    response = client.post(login, {"username": "owner", "password": "wrong password"})
    assert response.status_code == 429
    response = client.post(login, {"username": "owner", "password": "correct horse battery"})
    assert response.status_code == 429
    assert "_auth_user_id" not in client.session
    html = response.content.decode()
    assert "Too many failed sign-ins" in html
    assert "Wait 15 minutes and try again." in html
    assert_csp(response)
    # Another user name from the same address is not locked out by someone else's failures.
    other = client.post(login, {"username": "nobody", "password": "wrong password"})
    assert other.status_code == 200


def test_login_works_before_the_limit(client, owner):
    login = reverse("core:login")
    for _ in range(4):
        client.post(login, {"username": "owner", "password": "wrong password"})
    response = client.post(login, {"username": "owner", "password": "correct horse battery"})
    assert response.status_code == 302
    assert client.session["_auth_user_id"] == str(owner.pk)


def test_check_deploy_is_clean_with_production_settings(tmp_path):
    alphabet = string.ascii_letters + string.digits + "!@#%^&*(-_=+)"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DJANGO_SETTINGS_MODULE": "lazycat.settings",
        "LAZYCAT_DATA_DIR": str(tmp_path),
        "LAZYCAT_HTTPS": "true",
        "LAZYCAT_SECRET_KEY": "".join(secrets.choice(alphabet) for _ in range(50)),
        "LAZYCAT_ALLOWED_HOSTS": "box.example",
    }
    result = subprocess.run(
        [sys.executable, "-m", "django", "check", "--deploy", "--fail-level", "WARNING"],
        env=env,
        cwd=WORK,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_logfmt_redacts_secrets_and_quotes_spaces():
    record = logging.LogRecord(
        "lazycat.test", logging.WARNING, __file__, 1, 'paired "%s"', ("Alice",), None
    )
    record.secret = "hunter2 is my code"
    record.token = "abc"
    record.device = "Alice's phone"
    record.count = 3
    line = LogfmtFormatter().format(record)
    assert "hunter2" not in line and "abc" not in line
    assert "secret=[redacted]" in line and "token=[redacted]" in line
    assert 'device="Alice\'s phone"' in line
    assert "count=3" in line
    assert 'msg="paired \\"Alice\\""' in line
    assert re.match(
        r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=warning logger=lazycat.test ", line
    )


def test_logfmt_through_a_logger():
    handler = logging.StreamHandler()
    handler.setFormatter(LogfmtFormatter())
    records: list[str] = []
    handler.emit = lambda record: records.append(handler.format(record))  # type: ignore[method-assign]
    log = logging.getLogger("lazycat.test.logfmt")
    log.addHandler(handler)
    try:
        log.warning("pairing refused", extra={"secret": "s3cret", "source": "198.51.100.7"})
    finally:
        log.removeHandler(handler)
    assert len(records) == 1
    assert "s3cret" not in records[0]
    assert "secret=[redacted]" in records[0] and "source=198.51.100.7" in records[0]
    assert 'msg="pairing refused"' in records[0]
    assert "\n" not in records[0]


@pytest.mark.parametrize(
    ("cooloff", "text"),
    [(timedelta(minutes=15), "Wait 15 minutes"), (timedelta(minutes=1), "Wait 1 minute and")],
)
def test_lockout_page_says_how_long_to_wait(rf, cooloff, text):
    request = rf.get("/login/")
    html = render_to_string(
        "core/locked_out.html",
        {"cooloff_time": "PT15M", "cooloff_timedelta": cooloff},
        request=request,
    )
    assert text in html
    assert "PT15M" not in html
