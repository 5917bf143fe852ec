"""First run: every page leads to /setup/, which names the box, makes its key and the owner once."""

from __future__ import annotations

import base64
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from django.contrib.auth import get_user_model
from django.urls import reverse

from lazycat.core.forms import SetupForm
from lazycat.core.models import AuditEvent, Box, key_fingerprint

pytestmark = pytest.mark.django_db

GOOD = {
    "box_name": "MyBox",
    "username": "owner",
    "password": "correct horse battery",
    "password_again": "correct horse battery",
}


@pytest.fixture
def key_file(settings, tmp_path):
    """A key file path of this test's own: the session's box.key may already exist."""
    settings.LAZYCAT_BOX_KEY_FILE = tmp_path / "box.key"
    return settings.LAZYCAT_BOX_KEY_FILE


CONSOLE_PATHS = [
    "/",
    "/devices/",
    "/devices/pair/",
    "/services/",
    "/services/add/",
    "/audit/",
    "/settings/",
    "/login/",
]


@pytest.mark.parametrize("path", CONSOLE_PATHS)
def test_first_visit_redirects_every_page_to_setup(client, path):
    response = client.get(path)
    assert response.status_code == 302
    assert response["Location"] == reverse("core:setup")


def test_setup_page_is_open_before_setup(client):
    response = client.get(reverse("core:setup"))
    assert response.status_code == 200
    assert "Set up your box" in response.content.decode()


def test_box_name_is_lower_cased():
    form = SetupForm(data=GOOD)
    assert form.is_valid(), form.errors
    assert form.cleaned_data["box_name"] == "mybox"


@pytest.mark.parametrize(
    ("box_name", "message"),
    [
        ("-bad", "the name cannot start or end with a hyphen ('-bad')"),
        ("bad-", "the name cannot start or end with a hyphen ('bad-')"),
        ("a_b", "the name may contain only letters a-z, digits and hyphens (found '_' in 'a_b')"),
        ("1234", "the name cannot be all digits ('1234')"),
        # Form-field checks run before the label rules; their messages are Django's own.
        ("a" * 64, "Ensure this value has at most 63 characters (it has 64)."),
        ("", "This field is required."),
    ],
)
def test_bad_box_names_are_refused_with_a_reason(box_name, message):
    form = SetupForm(data={**GOOD, "box_name": box_name})
    assert not form.is_valid()
    assert form.errors["box_name"] == [message]


def test_box_name_of_63_characters_is_accepted():
    form = SetupForm(data={**GOOD, "box_name": "a" * 63})
    assert form.is_valid(), form.errors


def test_short_password_is_refused():
    form = SetupForm(data={**GOOD, "password": "short", "password_again": "short"})
    assert not form.is_valid()
    assert (
        "This password is too short. It must contain at least 10 characters."
        in form.errors["password"]
    )


def test_mismatched_passwords_are_refused():
    form = SetupForm(data={**GOOD, "password_again": "correct horse battery!"})
    assert not form.is_valid()
    assert form.errors["password_again"] == ["The two passwords differ."]
    assert "password" not in form.errors


def test_invalid_form_creates_nothing(client, key_file):
    response = client.post(reverse("core:setup"), {**GOOD, "box_name": "a_b"})
    assert response.status_code == 200
    assert "found &#x27;_&#x27; in &#x27;a_b&#x27;" in response.content.decode()
    assert not Box.objects.exists()
    assert not get_user_model().objects.exists()


def test_setup_creates_box_owner_and_key_and_signs_in(client, key_file):
    assert not key_file.exists()
    response = client.post(reverse("core:setup"), GOOD)
    assert response.status_code == 302
    assert response["Location"] == reverse("core:dashboard")

    box = Box.objects.get()
    assert box.name == "mybox" and box.fqdn == "mybox.heiyu.space"
    owner = get_user_model().objects.get()
    assert owner.username == "owner" and owner.is_superuser and owner.is_staff
    assert owner.check_password("correct horse battery")

    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    private = key_file.read_bytes()
    assert len(private) == 32
    public = X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
    assert box.key == public

    event = AuditEvent.objects.get(action="box.setup")
    assert event.actor == owner and event.source == "127.0.0.1"
    assert event.after == {"name": "mybox", "fingerprint": box.fingerprint, "owner": "owner"}

    dashboard = client.get(response["Location"])
    assert dashboard.status_code == 200
    assert dashboard.context["user"] == owner
    assert "Your box is ready." in dashboard.content.decode()


def test_after_setup_the_setup_page_is_gone(client, key_file):
    client.post(reverse("core:setup"), GOOD)
    client.logout()
    assert client.get(reverse("core:setup")).status_code == 404
    second = {**GOOD, "box_name": "other", "username": "mallory"}
    assert client.post(reverse("core:setup"), second).status_code == 404
    assert list(get_user_model().objects.values_list("username", flat=True)) == ["owner"]
    assert list(Box.objects.values_list("name", flat=True)) == ["mybox"]
    # And the rest of the console no longer leads to setup.
    assert client.get(reverse("core:dashboard"))["Location"].startswith(reverse("core:login"))


def test_private_key_never_appears_in_a_page(client, key_file):
    client.post(reverse("core:setup"), GOOD)
    private = key_file.read_bytes()
    box = Box.objects.get()
    secret_forms = {
        base64.b64encode(private).decode(),
        base64.b64encode(private).decode().rstrip("="),
        base64.urlsafe_b64encode(private).decode().rstrip("="),
        private.hex(),
        private.hex().upper(),
    }
    pages = ["core:dashboard", "core:settings", "core:audit", "devices:list", "services:list"]
    for name in pages:
        response = client.get(reverse(name))
        assert response.status_code == 200, name
        html = response.content.decode()
        for text in secret_forms:
            assert text not in html, f"the private key is on {name}"
    for name in ["core:dashboard", "core:settings"]:
        assert key_fingerprint(box.key) in client.get(reverse(name)).content.decode()
