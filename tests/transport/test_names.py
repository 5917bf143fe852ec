import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport.names import (
    DOMAIN,
    InvalidName,
    box_fqdn,
    host_fqdn,
    label_from_text,
    split_fqdn,
    unique_label,
    validate_hostname,
    validate_label,
)

# Valid labels: starting with a letter rules out all-digit ones; the filter, the reserved "ab--".
labels = st.from_regex(r"[a-z][a-z0-9-]{0,61}[a-z0-9]", fullmatch=True).filter(
    lambda s: s[2:4] != "--"
)


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("nas", "nas"),
        ("MyBox", "mybox"),
        ("a", "a"),
        ("a" * 63, "a" * 63),
        ("1password", "1password"),
    ],
)
def test_validate_label_accepts_and_lowercases(label: str, expected: str) -> None:
    assert validate_label(label) == expected


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("", "must be 1-63 characters"),
        ("a" * 64, "must be 1-63 characters"),
        ("my_box", "may contain only letters a-z, digits and hyphens"),
        ("café", "may contain only letters a-z, digits and hyphens"),
        ("\u212abox", "may contain only letters"),  # Kelvin sign lower-cases to ASCII "k"
        ("my.box", "may contain only letters"),
        ("-box", "cannot start or end with a hyphen"),
        ("box-", "cannot start or end with a hyphen"),
        ("12345", "cannot be all digits"),
        ("xn--nxasmq6b", "reserved for internationalised names"),
    ],
)
def test_validate_label_rejects_with_specific_message(label: str, message: str) -> None:
    with pytest.raises(InvalidName, match=message):
        validate_label(label)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Alice's iPhone 15", "alices-iphone-15"),
        ("  Bob\u2019s   MacBook Pro!! ", "bobs-macbook-pro"),  # typographic apostrophe
        ("Crème Brûlée", "creme-brulee"),
        ("Straße", "strasse"),
        ("\uff49\uff30\uff41\uff44", "ipad"),  # full-width "iPad"
        ("小明的手机", "device"),
        ("", "device"),
        ("---", "device"),
        ("2024", "device-2024"),
        ("a--b", "a-b"),
    ],
)
def test_label_from_text(text: str, expected: str) -> None:
    assert label_from_text(text) == expected


def test_label_from_text_uses_given_fallback() -> None:
    assert label_from_text("💻", fallback="laptop") == "laptop"
    with pytest.raises(InvalidName):
        label_from_text("x", fallback="not valid")


def test_label_from_text_caps_length_without_trailing_hyphen() -> None:
    label = label_from_text("a" * 62 + " b")
    assert label == "a" * 62
    assert len(label_from_text("word " * 40)) <= 63


@given(st.text())
def test_label_from_text_always_gives_a_valid_label(text: str) -> None:
    label = label_from_text(text)
    assert validate_label(label) == label


def test_unique_label_counts_up() -> None:
    assert unique_label("nas", set()) == "nas"
    assert unique_label("nas", {"nas"}) == "nas-2"
    assert unique_label("NAS", {"nas", "nas-2"}) == "nas-3"


def test_unique_label_stays_within_63_characters() -> None:
    base = "a" * 62 + "b"
    taken = {base} | {f"{'a' * 61}-{n}" for n in range(2, 10)}
    result = unique_label(base, taken)
    assert result == "a" * 60 + "-10"
    assert validate_label(result) == result


def test_unique_label_never_makes_a_double_hyphen() -> None:
    base = "a" * 60 + "-bc"
    assert unique_label(base, {base}) == "a" * 60 + "-2"


@given(labels, st.integers(0, 30))
def test_unique_label_is_valid_and_free(base: str, n_taken: int) -> None:
    taken: set[str] = set()
    for _ in range(n_taken):
        taken.add(unique_label(base, taken))
    result = unique_label(base, taken)
    assert result not in taken
    assert validate_label(result) == result


def test_fqdns() -> None:
    assert box_fqdn("MyBox") == "mybox.heiyu.space"
    assert host_fqdn("NAS", "mybox") == "nas.mybox.heiyu.space"
    with pytest.raises(InvalidName):
        host_fqdn("bad name", "mybox")


@pytest.mark.parametrize(
    ("fqdn", "expected"),
    [
        ("mybox.heiyu.space", (None, "mybox")),
        ("nas.mybox.heiyu.space", ("nas", "mybox")),
        ("NAS.MyBox.HEIYU.Space.", ("nas", "mybox")),
        ("heiyu.space", None),
        ("heiyu.space.", None),
        ("example.com", None),
        ("mybox.notheiyu.space", None),
        ("mybox.heiyu.space.evil.com", None),
        ("", None),
        ("mybox.heiyu.\u212aspace", None),
    ],
)
def test_split_fqdn(fqdn: str, expected: tuple[str | None, str] | None) -> None:
    assert split_fqdn(fqdn) == expected


@pytest.mark.parametrize(
    "fqdn", ["a.b.c.heiyu.space", ".heiyu.space", "x..heiyu.space", "bad_name.heiyu.space"]
)
def test_split_fqdn_rejects_malformed_names_in_the_zone(fqdn: str) -> None:
    with pytest.raises(InvalidName):
        split_fqdn(fqdn)


@given(labels, st.booleans())
def test_split_fqdn_round_trips(label: str, with_name: bool) -> None:
    if with_name:
        assert split_fqdn(host_fqdn(label, "box")) == (label, "box")
    else:
        assert split_fqdn(box_fqdn(label)) == (None, label)


@given(st.text())
def test_split_fqdn_only_raises_invalid_name(text: str) -> None:
    try:
        result = split_fqdn(text)
    except InvalidName:
        assert text.lower().rstrip(".").endswith(DOMAIN)
    else:
        assert result is None or all(validate_label(p) == p for p in result if p is not None)


@pytest.mark.parametrize(
    ("host", "expected"), [("Relay.Example.NET", "relay.example.net"), ("r1", "r1")]
)
def test_validate_hostname_accepts(host: str, expected: str) -> None:
    assert validate_hostname(host) == expected


@pytest.mark.parametrize("host", ["", "a..b", "-a.b", "192.0.2.300", "a_b.example", "a" * 254])
def test_validate_hostname_rejects(host: str) -> None:
    with pytest.raises(InvalidName):
        validate_hostname(host)
