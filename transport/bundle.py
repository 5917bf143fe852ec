"""The pairing bundle: what the console shows (as a QR code and as text) and ``lazycat-client pair``
reads to make first contact with a box.

The text form is one URI, short enough for a QR code (about 160 characters with one relay)::

    lazycat://pair?v=1&box=mybox&key=<43 chars>&secret=<22 chars>&exp=1767225600
        &relay=eu@relay.example.net:443&relay=hk@[2001:db8::1]:443

    v       format version; this module reads and writes 1 only
    box     the box's label in heiyu.space (names.validate_label)
    key     the box's 32-byte X25519 static public key, base64url without padding (RFC 4648 sec. 5)
    secret  a 128-bit one-time pairing secret, base64url without padding
    exp     when the code expires, in unix seconds
    relay   repeated: name@host:port, an IPv6 host in brackets (RFC 3986 sec. 3.2.2; the
            brackets are percent-encoded in the query, as RFC 3986 requires, and accepted raw)
    lan     repeated: ip:port where the box answers on its own LAN (for pairing with no relay)
    ticket  optional: the box's pairing ticket for its relays (``wire.Ticket`` for ANY_CLIENT,
            base64url), without which a relay forwards nothing from a device it does not know

A code names at least one relay or one LAN address: otherwise a client could not reach the box.

Unknown parameters are ignored so a later 1.x box can add fields old clients skip; anything that
changes the meaning of a field must bump ``v``. The secret is only proof of the owner's intent:
it rides inside the Noise handshake and is never used as a PSK (see ARCHITECTURE.md, "Pairing").

Relays are also configured on the box with :func:`parse_relays`, from a settings value such as
``eu=relay.example.net:443,hk=[2001:db8::1]:443``.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address
from urllib.parse import quote, unquote

from transport.names import InvalidName, validate_hostname, validate_label
from transport.wire import TICKET_LEN

SCHEME = "lazycat"
VERSION = 1
KEY_LENGTH = 32
SECRET_LENGTH = 16
# Far beyond any real expiry (year 36812); bounds what a parser must accept.
MAX_EXPIRES_AT = 2**40

_PREFIX = f"{SCHEME}://pair?"
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


class BundleError(ValueError):
    """A pairing code or relay setting that cannot be used; the message is meant for the user."""


def _check_host(host: str) -> str:
    """Return ``host`` (an IP address or a DNS name) in canonical form, or raise BundleError."""
    try:
        address = ip_address(host)
    except ValueError:
        pass
    else:
        if isinstance(address, IPv6Address) and address.scope_id is not None:
            raise BundleError(f"relay host {host!r}: addresses with a zone (%) are not supported")
        return str(address)
    try:
        return validate_hostname(host)
    except InvalidName as exc:
        raise BundleError(f"relay host {host!r}: {exc}") from None


@dataclass(frozen=True)
class Relay:
    """A relay the client can reach the box through: a short name, a host and a port."""

    name: str
    host: str  # an IPv6 address is stored without brackets
    port: int

    def __post_init__(self) -> None:
        try:
            name = validate_label(self.name)
        except InvalidName as exc:
            raise BundleError(f"relay name {self.name!r}: {exc}") from None
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "host", _check_host(self.host))
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise BundleError(f"relay {name}: the port must be a number")
        if not 1 <= self.port <= 65535:
            raise BundleError(f"relay {name}: port {self.port} is out of range (1-65535)")

    @property
    def endpoint(self) -> str:
        """``host:port`` with an IPv6 host in brackets, as in a URI authority."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _split_endpoint(what: str, text: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port``; ``what`` names the field in error messages."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise BundleError(f"{what}: expected [IPv6 address]:port, got {text!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise BundleError(f"{what}: {text!r} has no port (expected host:port)")
        if ":" in host:
            raise BundleError(f"{what}: write an IPv6 address in brackets, like [{host}]:443")
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise BundleError(f"{what}: {port_text!r} is not a port number")
    return host, int(port_text)


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_lan(host: str, port: int) -> None:
    """A LAN address is an IP literal (the box's own address on its LAN), never a name."""
    try:
        ip_address(host)
    except ValueError:
        raise BundleError(f"LAN address {host!r} is not an IP address") from None
    if not 0 < port < 65536:
        raise BundleError(f"LAN address {host}: port {port} is out of range (1-65535)")


def _parse_relay(text: str, separator: str) -> Relay:
    name, sep, endpoint = (part.strip() for part in text.partition(separator))
    if not sep or not name:
        raise BundleError(f"relay {text!r}: expected name{separator}host:port")
    host, port = _split_endpoint(f"relay {name}", endpoint)
    return Relay(name, host, port)


def _check_relays(relays: tuple[Relay, ...]) -> None:
    seen: set[str] = set()
    for relay in relays:
        if relay.name in seen:
            raise BundleError(f"relay {relay.name} is listed twice")
        seen.add(relay.name)


def parse_relays(spec: str) -> tuple[Relay, ...]:
    """Parse the relay setting ``name=host:port,name2=[2001:db8::1]:443``; "" gives ``()``."""
    items = [item.strip() for item in spec.split(",")]
    if items == [""]:
        return ()
    if "" in items:
        raise BundleError("the relay list has an empty entry (check the commas)")
    relays = tuple(_parse_relay(item, "=") for item in items)
    _check_relays(relays)
    return relays


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _decode(value: str, what: str, length: int) -> bytes:
    """Decode unpadded base64url ``value`` of exactly ``length`` bytes, or raise BundleError."""
    if not _BASE64URL.fullmatch(value):
        raise BundleError(f"the {what} is not valid base64url")
    try:
        data = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except binascii.Error:
        raise BundleError(f"the {what} is not valid base64url") from None
    if len(data) != length:
        raise BundleError(f"the {what} must be {length} bytes (got {len(data)})")
    return data


@dataclass(frozen=True)
class PairingBundle:
    """Everything a client needs to ask a box to pair; the module docstring shows the text form."""

    box: str
    box_key: bytes
    relays: tuple[Relay, ...]
    secret: bytes
    expires_at: int  # unix seconds
    version: int = VERSION
    lan: tuple[tuple[str, int], ...] = ()
    ticket: bytes = b""  # an encoded wire.Ticket, or empty

    def __post_init__(self) -> None:
        if self.version != VERSION:
            raise BundleError(f"unsupported version {self.version}: update lazycat-client")
        try:
            object.__setattr__(self, "box", validate_label(self.box))
        except InvalidName as exc:
            raise BundleError(f"box name {self.box!r}: {exc}") from None
        if not isinstance(self.box_key, bytes) or len(self.box_key) != KEY_LENGTH:
            raise BundleError(f"the box key must be {KEY_LENGTH} bytes")
        if not isinstance(self.secret, bytes) or len(self.secret) != SECRET_LENGTH:
            raise BundleError(f"the secret must be {SECRET_LENGTH} bytes")
        object.__setattr__(self, "relays", tuple(self.relays))
        object.__setattr__(self, "lan", tuple(self.lan))
        # Without a relay or a LAN address the client has no way to reach the box.
        if not self.relays and not self.lan:
            raise BundleError("the code lists no relay and no LAN address")
        _check_relays(self.relays)
        for host, port in self.lan:
            _check_lan(host, port)
        if self.ticket and len(self.ticket) != TICKET_LEN:
            raise BundleError(f"the ticket must be {TICKET_LEN} bytes")
        if isinstance(self.expires_at, bool) or not isinstance(self.expires_at, int):
            raise BundleError("the expiry must be a whole number of unix seconds")
        if not 0 <= self.expires_at <= MAX_EXPIRES_AT:
            raise BundleError(f"the expiry {self.expires_at} is not a plausible unix time")

    def is_expired(self, now: float) -> bool:
        """True from ``expires_at`` on; ``now`` is unix seconds (time passed in, no clock here)."""
        return now >= self.expires_at

    def to_text(self) -> str:
        """The ``lazycat://pair?...`` URI shown as text and encoded in the QR code."""
        params = [
            f"v={self.version}",
            f"box={self.box}",
            f"key={_encode(self.box_key)}",
            f"secret={_encode(self.secret)}",
            f"exp={self.expires_at}",
        ]
        params += [f"relay={quote(f'{r.name}@{r.endpoint}', safe='@:')}" for r in self.relays]
        params += [f"lan={quote(_endpoint(host, port), safe=':')}" for host, port in self.lan]
        if self.ticket:
            params.append(f"ticket={_encode(self.ticket)}")
        return _PREFIX + "&".join(params)

    @classmethod
    def parse(cls, text: str) -> PairingBundle:
        """Read a pairing code (surrounding whitespace is ignored), or raise BundleError."""
        text = text.strip()
        # The scheme and host are case-insensitive (RFC 3986 sections 3.1 and 3.2.2).
        if text[: len(_PREFIX)].lower() != _PREFIX:
            raise BundleError("this is not a lazycat pairing code")
        query = text[len(_PREFIX) :].split("#", 1)[0]
        values: dict[str, str] = {}
        relay_texts: list[str] = []
        lan_texts: list[str] = []
        for part in query.split("&"):
            if not part:
                continue
            key, _, value = part.partition("=")
            key, value = unquote(key), unquote(value)
            if key == "relay":
                relay_texts.append(value)
            elif key == "lan":
                lan_texts.append(value)
            elif key in values:
                raise BundleError(f"the code has two {key!r} values")
            else:
                values[key] = value

        # Version first: a future code may lay its other fields out differently.
        version = values.get("v")
        if version is None:
            raise BundleError("the code has no version")
        if not version.isascii() or not version.isdigit() or len(version) > 6:
            raise BundleError(f"the version {version!r} is not a number")
        if int(version) != VERSION:
            raise BundleError(f"unsupported version {int(version)}: update lazycat-client")

        for field, what in (("box", "box name"), ("key", "box key"), ("secret", "secret")):
            if not values.get(field):
                raise BundleError(f"the code has no {what}")
        exp = values.get("exp")
        if not exp:
            raise BundleError("the code has no expiry")
        if not exp.isascii() or not exp.isdigit() or len(exp) > len(str(MAX_EXPIRES_AT)):
            raise BundleError(f"the expiry {exp!r} is not a unix time")
        return cls(
            box=values["box"],
            box_key=_decode(values["key"], "box key", KEY_LENGTH),
            relays=tuple(_parse_relay(r, "@") for r in relay_texts),
            secret=_decode(values["secret"], "secret", SECRET_LENGTH),
            expires_at=int(exp),
            version=VERSION,
            lan=tuple(_split_endpoint("LAN address", text) for text in lan_texts),
            ticket=_decode(values["ticket"], "ticket", TICKET_LEN) if values.get("ticket") else b"",
        )
