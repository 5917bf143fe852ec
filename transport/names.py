"""DNS name rules for ``heiyu.space``.

Every box, device and service is named in one zone::

    <box>.heiyu.space            the box itself
    <name>.<box>.heiyu.space     a device or a service of that box

Each ``<box>`` and ``<name>`` is one DNS label under RFC 1123 (section 2.1) host rules, narrowed
so that a name is unambiguous and safe to show:

* 1-63 characters (RFC 1035 section 2.3.4);
* ASCII letters, digits and hyphens only, compared case-insensitively and stored lower-case;
* no hyphen at either end;
* not all digits — such a label reads like a number and clashes with IPv4 parsing in some tools;
* no ``--`` in the third and fourth positions: RFC 5891 section 4.2.3.1 reserves that shape for
  internationalised labels (``xn--…``), which browsers would show as different, Unicode text.

Free text typed by people ("Alice's iPhone 15") becomes a label with :func:`label_from_text`, and
:func:`unique_label` adds ``-2``, ``-3``… when the label is already taken in a box.

:func:`validate_hostname` checks the more general host names of relays, which live outside
``heiyu.space``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Container

DOMAIN = "heiyu.space"

MAX_LABEL_LENGTH = 63  # RFC 1035 section 2.3.4
MAX_HOSTNAME_LENGTH = 253  # 255 octets on the wire, minus the length byte and the root label

_LETTERS_DIGITS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_LABEL_CHARS = _LETTERS_DIGITS | {"-"}

# Letters that NFKD does not decompose into ASCII but that have a customary Latin spelling; without
# them "Straße" would lose its "ß" and read "stra-e".
_EXTRA_TRANSLITERATIONS = {
    "ß": "ss",
    "æ": "ae",
    "œ": "oe",
    "ø": "o",
    "đ": "d",
    "ð": "d",
    "ł": "l",
    "þ": "th",
    "\u0131": "i",  # dotless i
}
# Apostrophes vanish rather than split a word: "Alice's" -> "alices", not "alice-s". Besides the
# ASCII ones: right single quotation mark, modifier letter apostrophe, acute accent.
_DROPPED = frozenset("'`\u2019\u02bc\u00b4")


class InvalidName(ValueError):
    """A name that cannot be used in ``heiyu.space``; the message is meant for the user."""


def _check_label(label: str, what: str) -> None:
    """Raise InvalidName unless ``label`` is a well-formed RFC 1123 host label.

    The checks shared by ``heiyu.space`` labels and relay host names; ``what`` names the thing in
    the message ("the name", "the host name") so the user knows which field is wrong.
    """
    if not 1 <= len(label) <= MAX_LABEL_LENGTH:
        raise InvalidName(f"{what} must be 1-63 characters (got {len(label)})")
    # Check the character set before lower-casing: str.lower() maps some non-ASCII characters to
    # ASCII (the Kelvin sign "K" becomes "k"), which would let look-alikes through.
    bad = next((c for c in label if c not in _LABEL_CHARS), None)
    if bad is not None:
        raise InvalidName(
            f"{what} may contain only letters a-z, digits and hyphens (found {bad!r} in {label!r})"
        )
    if label[0] == "-" or label[-1] == "-":
        raise InvalidName(f"{what} cannot start or end with a hyphen ({label!r})")


def validate_label(label: str) -> str:
    """Return ``label`` lower-cased if it can name a box, device or service, else raise InvalidName.

    >>> validate_label("Alices-iPhone")
    'alices-iphone'
    """
    _check_label(label, "the name")
    if label.isdigit():
        raise InvalidName(f"the name cannot be all digits ({label!r})")
    if label[2:4] == "--":
        raise InvalidName(
            f"the name cannot have '--' as its third and fourth characters ({label!r}); "
            "that shape is reserved for internationalised names"
        )
    return label.lower()


def validate_hostname(host: str) -> str:
    """Return a DNS host name (e.g. a relay's ``relay.example.net``) lower-cased, or raise.

    Accepts dotted names of RFC 1123 labels, without a trailing dot. The last label may not be all
    digits, so that "192.0.2.300" is refused instead of being taken for a name.
    """
    if not 1 <= len(host) <= MAX_HOSTNAME_LENGTH:
        raise InvalidName(f"the host name must be 1-253 characters (got {len(host)})")
    labels = host.split(".")
    for label in labels:
        _check_label(label, "each part of a host name")
    if labels[-1].isdigit():
        raise InvalidName(f"{host!r} is neither an IP address nor a host name")
    return host.lower()


def _transliterate(char: str) -> str:
    """Return the ASCII spelling of one character, "" to drop it, or "-" to break the word there."""
    lower = char.lower()
    if lower in _EXTRA_TRANSLITERATIONS:
        return _EXTRA_TRANSLITERATIONS[lower]
    if char in _DROPPED:
        return ""
    out = []
    # NFKD splits "é" into "e" plus a combining accent and folds compatibility forms (full-width
    # letters, "①" -> "1", "¼" -> "1", fraction slash, "4"); keep ASCII letters and digits, drop
    # accents, break words on anything else.
    for part in unicodedata.normalize("NFKD", char):
        if part in _LETTERS_DIGITS:
            out.append(part.lower())
        elif not unicodedata.combining(part):
            out.append("-")
    return "".join(out)


def label_from_text(text: str, fallback: str = "device") -> str:
    """Turn a free-text name into a valid label: "Alice's iPhone 15" -> "alices-iphone-15".

    Letters are transliterated to ASCII where Unicode decomposition allows; any run of other
    characters becomes one hyphen. Text with nothing usable (say, only CJK characters) gives
    ``fallback``; an all-digit result gets ``fallback`` as a prefix ("15" -> "device-15"). The
    result always passes :func:`validate_label`, so callers never need to handle InvalidName unless
    ``fallback`` itself is invalid.
    """
    fallback = validate_label(fallback)
    spelled = "".join(_transliterate(c) for c in text)
    # Collapse hyphen runs, which also rules out the reserved "ab--" shape.
    label = "-".join(part for part in spelled.split("-") if part)
    label = label[:MAX_LABEL_LENGTH].rstrip("-")
    if not label:
        return fallback
    if label.isdigit():
        label = f"{fallback}-{label}"[:MAX_LABEL_LENGTH].rstrip("-")
    return label


def unique_label(base: str, taken: Container[str]) -> str:
    """Return ``base``, or the first of ``base-2``, ``base-3``… not in ``taken``.

    ``taken`` holds lower-case labels (as :func:`validate_label` returns them). The base is
    shortened when the suffix would push the label past 63 characters, so
    ``unique_label("a" * 63, {"a" * 63})`` is ``"a" * 61 + "-2"``.
    """
    base = validate_label(base)
    if base not in taken:
        return base
    # Terminates: a finite ``taken`` cannot hold every candidate.
    n = 2
    while True:
        suffix = f"-{n}"
        # rstrip keeps "ab-" + "-2" from making a double hyphen; a valid base starts with a
        # letter or digit, so the stem is never empty.
        candidate = base[: MAX_LABEL_LENGTH - len(suffix)].rstrip("-") + suffix
        if candidate not in taken:
            return candidate
        n += 1


def box_fqdn(box: str) -> str:
    """``"mybox"`` -> ``"mybox.heiyu.space"``; the box label is validated and lower-cased."""
    return f"{validate_label(box)}.{DOMAIN}"


def host_fqdn(name: str, box: str) -> str:
    """``("nas", "mybox")`` -> ``"nas.mybox.heiyu.space"``, for a device or a service."""
    return f"{validate_label(name)}.{validate_label(box)}.{DOMAIN}"


def split_fqdn(fqdn: str) -> tuple[str | None, str] | None:
    """Parse ``name.box.heiyu.space`` -> ``(name, box)`` and ``box.heiyu.space`` -> ``(None, box)``.

    Case-insensitive; one trailing dot (the DNS root) is allowed. Returns None when ``fqdn`` is not
    under ``heiyu.space`` (including ``heiyu.space`` itself), so a resolver can pass it on.
    Raises InvalidName when it is under ``heiyu.space`` but cannot name anything there (bad label,
    empty label, or more than two labels in front), so a resolver can answer NXDOMAIN instead of
    leaking the query upstream.
    """
    name = fqdn[:-1] if fqdn.endswith(".") else fqdn
    # Compare label by label so that "notheiyu.space" is not taken for a name in the zone. Only
    # ASCII is lower-cased: str.lower() turns some non-ASCII characters into ASCII letters.
    labels = name.split(".")
    zone = DOMAIN.split(".")
    tail = labels[-len(zone) :]
    if len(labels) <= len(zone) or not all(
        label.isascii() and label.lower() == want for label, want in zip(tail, zone, strict=True)
    ):
        return None
    front = labels[: -len(zone)]
    if len(front) > 2:
        raise InvalidName(f"{fqdn!r} has too many labels: expected name.box.{DOMAIN}")
    checked = [validate_label(label) for label in front]
    if len(checked) == 1:
        return None, checked[0]
    return checked[0], checked[1]
