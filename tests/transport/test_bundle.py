import contextlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport.bundle import MAX_EXPIRES_AT, BundleError, PairingBundle, Relay, parse_relays

BOX_KEY = bytes(range(32))
SECRET = bytes(range(100, 116))
EU = Relay("eu", "relay.example.net", 443)
HK = Relay("hk", "2001:db8::1", 443)


def make_bundle(**changes: object) -> PairingBundle:
    fields: dict[str, object] = {
        "box": "mybox",
        "box_key": BOX_KEY,
        "relays": (EU, HK),
        "secret": SECRET,
        "expires_at": 1767225600,
    }
    fields.update(changes)
    return PairingBundle(**fields)  # type: ignore[arg-type]


def test_to_text_golden() -> None:
    """The exact text form; a change here breaks clients in the field."""
    assert make_bundle().to_text() == (
        "lazycat://pair?v=1&box=mybox"
        "&key=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
        "&secret=ZGVmZ2hpamtsbW5vcHFycw"
        "&exp=1767225600"
        "&relay=eu@relay.example.net:443"
        "&relay=hk@%5B2001:db8::1%5D:443"
    )


def test_round_trip() -> None:
    bundle = make_bundle()
    assert PairingBundle.parse(bundle.to_text()) == bundle


def test_parse_is_tolerant() -> None:
    """Whitespace, case in scheme and box, raw brackets, a fragment and unknown fields are fine."""
    text = (
        "\n  LAZYCAT://PAIR?v=1&box=MyBox&key=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
        "&secret=ZGVmZ2hpamtsbW5vcHFycw&exp=1767225600&relay=hk@[2001:DB8::1]:443"
        "&future=1&&relay=eu@Relay.Example.NET:443#ignored  \t"
    )
    assert PairingBundle.parse(text) == make_bundle(relays=(HK, EU))


def test_text_is_short_enough_for_a_qr_code() -> None:
    # QR version 10 at error correction M holds 213 bytes; three relays still fit.
    three = (EU, HK, Relay("us", "203.0.113.7", 3478))
    assert len(make_bundle(relays=three).to_text()) <= 213


def test_expiry() -> None:
    bundle = make_bundle(expires_at=1000)
    assert not bundle.is_expired(999.9)
    assert bundle.is_expired(1000)
    assert bundle.is_expired(1000.5)


def replace_param(text: str, name: str, value: str | None) -> str:
    """``text`` with the ``name=`` parameter set to ``value``, or removed when None."""
    prefix, query = text.split("?", 1)
    parts = [p for p in query.split("&") if not p.startswith(f"{name}=")]
    if value is not None:
        parts.append(f"{name}={value}")
    return prefix + "?" + "&".join(parts)


GOOD = make_bundle().to_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "this is not a lazycat pairing code"),
        ("https://example.com/?v=1", "this is not a lazycat pairing code"),
        ("lazycat://login?v=1", "this is not a lazycat pairing code"),
        (replace_param(GOOD, "v", "2"), "unsupported version 2: update lazycat-client"),
        (replace_param(GOOD, "v", None), "the code has no version"),
        (replace_param(GOOD, "v", "one"), "the version 'one' is not a number"),
        (replace_param(GOOD, "secret", None), "the code has no secret"),
        (replace_param(GOOD, "key", None), "the code has no box key"),
        (replace_param(GOOD, "box", None), "the code has no box name"),
        (replace_param(GOOD, "exp", None), "the code has no expiry"),
        (replace_param(GOOD, "exp", "tomorrow"), "the expiry 'tomorrow' is not a unix time"),
        (replace_param(GOOD, "exp", "9" * 13), "is not a plausible unix time"),
        (replace_param(GOOD, "exp", "9" * 5000), "is not a unix time"),
        (replace_param(GOOD, "key", "AAEC"), "the box key must be 32 bytes"),
        (replace_param(GOOD, "key", "AAEC+/"), "the box key is not valid base64url"),
        (replace_param(GOOD, "key", "A"), "the box key is not valid base64url"),
        (replace_param(GOOD, "secret", "AAAA"), "the secret must be 16 bytes"),
        (replace_param(GOOD, "box", "my_box"), "may contain only letters"),
        (replace_param(GOOD, "relay", None), "the code lists no relay"),
        (replace_param(GOOD, "relay", "eu"), "expected name@host:port"),
        (replace_param(GOOD, "relay", "eu@host"), "has no port"),
        (replace_param(GOOD, "relay", "eu@host:99999"), "out of range"),
        (replace_param(GOOD, "relay", "eu@2001:db8::1:443"), "in brackets"),
        (GOOD + "&box=other", "the code has two 'box' values"),
        (GOOD + "&relay=eu@other.example:1", "relay eu is listed twice"),
    ],
)
def test_parse_errors_tell_the_user_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        PairingBundle.parse(text)


def test_constructor_validates() -> None:
    with pytest.raises(BundleError, match="box key must be 32 bytes"):
        make_bundle(box_key=bytes(31))
    with pytest.raises(BundleError, match="secret must be 16 bytes"):
        make_bundle(secret=bytes(32))
    with pytest.raises(BundleError, match="unsupported version 2"):
        make_bundle(version=2)
    with pytest.raises(BundleError, match="not a plausible unix time"):
        make_bundle(expires_at=-1)
    with pytest.raises(BundleError, match="no relay"):
        make_bundle(relays=())
    assert make_bundle(box="MyBox").box == "mybox"


hosts = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(r"[a-z][a-z0-9]{0,10}(\.[a-z][a-z0-9]{0,10}){0,3}", fullmatch=True),
)
relay_names = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True).filter(
    lambda s: s[2:4] != "--"
)


@st.composite
def bundles(draw: st.DrawFn) -> PairingBundle:
    names = draw(st.lists(relay_names, min_size=1, max_size=4, unique=True))
    relays = tuple(Relay(n, draw(hosts), draw(st.integers(1, 65535))) for n in names)
    return PairingBundle(
        box=draw(relay_names),
        box_key=draw(st.binary(min_size=32, max_size=32)),
        relays=relays,
        secret=draw(st.binary(min_size=16, max_size=16)),
        expires_at=draw(st.integers(0, MAX_EXPIRES_AT)),
    )


@given(bundles())
def test_round_trip_property(bundle: PairingBundle) -> None:
    assert PairingBundle.parse(bundle.to_text()) == bundle


@given(st.text())
def test_arbitrary_text_raises_only_bundle_error(text: str) -> None:
    with contextlib.suppress(BundleError):
        PairingBundle.parse(text)


@given(bundles(), st.integers(0, 200), st.text(max_size=5))
def test_corrupted_codes_raise_only_bundle_error(bundle: PairingBundle, at: int, junk: str) -> None:
    text = bundle.to_text()
    with contextlib.suppress(BundleError):
        PairingBundle.parse(text[:at] + junk + text[at:])


def test_parse_relays() -> None:
    assert parse_relays("eu=relay.example.net:443, hk=[2001:db8::1]:443") == (EU, HK)
    assert parse_relays("") == ()
    assert parse_relays("  ") == ()
    assert parse_relays("local=192.0.2.10:3478") == (Relay("local", "192.0.2.10", 3478),)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("relay.example.net:443", "expected name=host:port"),
        ("=relay.example.net:443", "expected name=host:port"),
        ("eu=relay.example.net", "has no port"),
        ("eu=relay.example.net:https", "'https' is not a port number"),
        ("eu=relay.example.net:0", "out of range"),
        ("eu=2001:db8::1:443", r"in brackets, like \[2001:db8::1\]:443"),
        ("eu=[2001:db8::1]443", r"expected \[IPv6 address\]:port"),
        ("eu=[fe80::1%eth0]:443", "zone"),
        ("eu=bad_host:443", "relay host 'bad_host'"),
        ("eu=:443", "relay host ''"),
        ("EU!=host:1", "relay name 'EU!'"),
        ("eu=a:1,,hk=b:2", "empty entry"),
        ("eu=a:1,eu=b:2", "relay eu is listed twice"),
    ],
)
def test_parse_relays_errors(spec: str, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        parse_relays(spec)


def test_relay_endpoint_brackets_ipv6() -> None:
    assert HK.endpoint == "[2001:db8::1]:443"
    assert EU.endpoint == "relay.example.net:443"
    assert Relay("x", "2001:DB8:0::1", 1).host == "2001:db8::1"


def test_lan_addresses_and_ticket_round_trip() -> None:
    bundle = PairingBundle(
        box="home",
        box_key=bytes(range(32)),
        relays=(),
        secret=bytes(16),
        expires_at=1_800_000_000,
        lan=(("192.168.1.10", 7483), ("fd00::10", 7483)),
        ticket=bytes(range(104)),
    )
    text = bundle.to_text()
    assert "lan=192.168.1.10:7483" in text and "ticket=" in text
    assert PairingBundle.parse(text) == bundle


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("&lan=box.lan:7483", "LAN address 'box.lan' is not an IP address"),
        ("&lan=192.168.1.10", "LAN address: '192.168.1.10' has no port"),
        ("&ticket=AAAA", "the ticket must be 104 bytes"),
    ],
)
def test_bad_lan_address_or_ticket_says_what(extra: str, message: str) -> None:
    good = PairingBundle("home", bytes(32), (Relay("eu", "192.0.2.1", 443),), bytes(16), 1000)
    with pytest.raises(BundleError, match=re.escape(message)):
        PairingBundle.parse(good.to_text() + extra)


def test_a_code_with_only_a_lan_address_is_enough_and_with_neither_is_refused() -> None:
    assert PairingBundle("home", bytes(32), (), bytes(16), 1000, lan=(("10.0.0.2", 1),)).lan
    with pytest.raises(BundleError, match="no relay and no LAN address"):
        PairingBundle("home", bytes(32), (), bytes(16), 1000)
