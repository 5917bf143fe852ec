"""STUN Binding (RFC 8489) with NAT behaviour discovery (RFC 5780): codec, client, responder.

Everything here is sans-IO: the codec turns bytes into :class:`Message` and back, the client
(:class:`BindingTransaction`) and the server side (:class:`StunResponder`) take the current time
as an argument and hand back datagrams to send. ``transport.stun_aio`` puts them on sockets.

Why our own codec rather than ``aioice.stun``: aioice knows neither PADDING, RESPONSE-PORT nor
UNKNOWN-ATTRIBUTES, keeps attributes in a dict (order and repeats are lost), lets ``ValueError``,
``struct.error`` and ``UnicodeDecodeError`` escape its parser, does not check the magic cookie,
and its transactions are bound to an asyncio loop. The codec below is small, total (only
:class:`StunError` escapes), and aioice stays useful as an *independent* implementation the
tests check ours against byte for byte.

The message (RFC 8489 §5)
=========================

::

     byte 0          1               2               3
    +-+-+-----------+---------------+---------------+---------------+
    |0 0| message type (14 bits)    | message length (bytes after   |
    |   | M11-M7 C1 M6-M4 C0 M3-M0  | the header, a multiple of 4)  |
    +---+---------------------------+---------------+---------------+
    | magic cookie 0x2112A442                                       |
    +---------------------------------------------------------------+
    | transaction id (12 bytes, random, chosen by the client)       |
    |                                                               |
    |                                                               |
    +---------------+---------------+-------------------------------+
    | attribute type (2)            | value length (2, unpadded)    |
    +-------------------------------+-------------------------------+
    | value, zero-padded to a multiple of 4 bytes     ...           |
    +---------------------------------------------------------------+
    | ... more attributes; FINGERPRINT, if present, is the last     |

The class bits C1 C0 say request (00), indication (01), success (10) or error response (11);
the method is spread over the other 12 bits (Binding is 0x001). The two top bits are always zero
and the cookie sits at bytes 4-8, which is how ``transport.wire.classify`` tells STUN from the
other datagrams sharing our one UDP socket. Messages without the cookie (RFC 3489 clients) are
rejected: such clients' 28-byte requests could never be answered within our no-amplification
rule anyway (see :class:`StunResponder`).

Attributes we speak
===================

==========================  ======  ==================================================
attribute                   type    value
==========================  ======  ==================================================
MAPPED-ADDRESS              0x0001  0 | family (1=IPv4, 2=IPv6) | port (2) | ip (4/16)
CHANGE-REQUEST (5780)       0x0003  32 bits, 0x4 = change IP, 0x2 = change port
SOURCE-ADDRESS (3489)       0x0004  as MAPPED-ADDRESS (old servers' RESPONSE-ORIGIN)
CHANGED-ADDRESS (3489)      0x0005  as MAPPED-ADDRESS (old servers' OTHER-ADDRESS)
ERROR-CODE                  0x0009  0 (21 bits) | class (3 bits) | number (8) | reason
UNKNOWN-ATTRIBUTES          0x000A  list of 16-bit attribute types
XOR-MAPPED-ADDRESS          0x0020  as MAPPED-ADDRESS, port XOR 0x2112, ip XOR cookie
                                    (IPv4) or cookie || transaction id (IPv6)
PADDING (5780)              0x0026  any bytes: makes a request big enough to be answered
RESPONSE-PORT (5780)        0x0027  port (2) | 2 bytes padding: answer to this port
SOFTWARE                    0x8022  UTF-8, fewer than 128 characters
FINGERPRINT                 0x8028  CRC-32 of everything before it XOR 0x5354554e
RESPONSE-ORIGIN (5780)      0x802B  as MAPPED-ADDRESS: where the answer was sent from
OTHER-ADDRESS (5780)        0x802C  as MAPPED-ADDRESS: the server's other IP *and* port
==========================  ======  ==================================================

Types below 0x8000 are *comprehension-required*: a receiver that does not know one must not
act on the message (a server answers 420 listing it in UNKNOWN-ATTRIBUTES, a client fails the
transaction, RFC 8489 §7.3.1 and §7.3.3). Unknown types from 0x8000 up are skipped. The
authentication attributes (USERNAME, MESSAGE-INTEGRITY, ...) and ICE's are kept as opaque
bytes: parsed past, never checked (we use no STUN credentials; the tunnel is Noise).
"""

from __future__ import annotations

import binascii
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import ClassVar, TypeVar

from transport.ratelimit import KeyedBuckets
from transport.wire import STUN_MAGIC_COOKIE, Address, WireError

MAGIC_COOKIE = STUN_MAGIC_COOKIE
HEADER_LEN = 20
TXID_LEN = 12
FINGERPRINT_XOR = 0x5354554E  # RFC 8489 §14.7: "STUN" in ASCII
FINGERPRINT_LEN = 8  # attribute header (4) + CRC-32 (4)
MAX_BODY = 0xFFFC  # the 16-bit length field, a multiple of 4
BINDING = 0x001

# Attribute types.
MAPPED_ADDRESS = 0x0001
CHANGE_REQUEST = 0x0003
SOURCE_ADDRESS = 0x0004
CHANGED_ADDRESS = 0x0005
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
REALM = 0x0014
NONCE = 0x0015
MESSAGE_INTEGRITY_SHA256 = 0x001C
PASSWORD_ALGORITHM = 0x001D
USERHASH = 0x001E
XOR_MAPPED_ADDRESS = 0x0020
PRIORITY = 0x0024
USE_CANDIDATE = 0x0025
PADDING = 0x0026
RESPONSE_PORT = 0x0027
SOFTWARE = 0x8022
FINGERPRINT = 0x8028
RESPONSE_ORIGIN = 0x802B
OTHER_ADDRESS = 0x802C

# Comprehension-required types we recognise but keep as opaque bytes (authentication, ICE).
OPAQUE_KNOWN = frozenset(
    {
        USERNAME,
        MESSAGE_INTEGRITY,
        REALM,
        NONCE,
        MESSAGE_INTEGRITY_SHA256,
        PASSWORD_ALGORITHM,
        USERHASH,
        PRIORITY,
        USE_CANDIDATE,
    }
)

# Client defaults, RFC 8489 §6.2.1: RTO 500 ms doubling, Rc = 7 sends, give up Rm = 16 RTOs
# after the last one (39.5 s in all).
RTO = 0.5
ATTEMPTS = 7
RM = 16

DEFAULT_SOFTWARE = "lazycat"

# Requests are padded to this size by default so that the fullest answer our responder gives
# (IPv6, RFC 5780 mode: XOR-MAPPED, MAPPED, RESPONSE-ORIGIN, OTHER-ADDRESS of 24 bytes each,
# SOFTWARE "lazycat" 12, FINGERPRINT 8, header 20) fits under the no-amplification rule.
DEFAULT_REQUEST_SIZE = 136


class StunError(WireError):
    """A STUN message that cannot be parsed or built. The only exception the parsers raise."""


class Class(IntEnum):
    """The message class (RFC 8489 §5), as the two bits C1 C0."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


# --- attributes ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _AddressAttribute:
    address: Address
    TYPE: ClassVar[int] = 0


class MappedAddress(_AddressAttribute):
    """The client's reflexive address, in the clear (RFC 8489 §14.1); kept for old clients."""

    __slots__ = ()
    TYPE = MAPPED_ADDRESS


class XorMappedAddress(_AddressAttribute):
    """The client's reflexive address, XOR-ed so that NAT ALGs leave it alone (§14.2)."""

    __slots__ = ()
    TYPE = XOR_MAPPED_ADDRESS


class ResponseOrigin(_AddressAttribute):
    """Where the server sent the response from (RFC 5780 §7.3)."""

    __slots__ = ()
    TYPE = RESPONSE_ORIGIN


class OtherAddress(_AddressAttribute):
    """The server's alternate address: other IP and other port (RFC 5780 §7.4)."""

    __slots__ = ()
    TYPE = OTHER_ADDRESS


class SourceAddress(_AddressAttribute):
    """RFC 3489's RESPONSE-ORIGIN; old servers (``stund``) still send it."""

    __slots__ = ()
    TYPE = SOURCE_ADDRESS


class ChangedAddress(_AddressAttribute):
    """RFC 3489's OTHER-ADDRESS; old servers (``stund``) still send it."""

    __slots__ = ()
    TYPE = CHANGED_ADDRESS


@dataclass(frozen=True, slots=True)
class Software:
    text: str
    TYPE: ClassVar[int] = SOFTWARE


@dataclass(frozen=True, slots=True)
class ErrorCode:
    code: int  # 300-699
    reason: str = ""
    TYPE: ClassVar[int] = ERROR_CODE


@dataclass(frozen=True, slots=True)
class UnknownAttributes:
    types: tuple[int, ...]
    TYPE: ClassVar[int] = UNKNOWN_ATTRIBUTES


@dataclass(frozen=True, slots=True)
class Padding:
    """RFC 5780 §7.6. Its content does not matter; we send zeros and keep only the length."""

    length: int
    TYPE: ClassVar[int] = PADDING


@dataclass(frozen=True, slots=True)
class ChangeRequest:
    change_ip: bool = False
    change_port: bool = False
    TYPE: ClassVar[int] = CHANGE_REQUEST


@dataclass(frozen=True, slots=True)
class ResponsePort:
    port: int
    TYPE: ClassVar[int] = RESPONSE_PORT


@dataclass(frozen=True, slots=True)
class Opaque:
    """An attribute carried as bytes: authentication and ICE attributes we parse past, and
    unknown comprehension-required ones (which :attr:`Message.unknown_required` lists)."""

    type: int
    value: bytes


Attribute = (
    MappedAddress
    | XorMappedAddress
    | ResponseOrigin
    | OtherAddress
    | SourceAddress
    | ChangedAddress
    | Software
    | ErrorCode
    | UnknownAttributes
    | Padding
    | ChangeRequest
    | ResponsePort
    | Opaque
)

_ADDRESS_TYPES: dict[int, type[_AddressAttribute]] = {
    cls.TYPE: cls
    for cls in (
        MappedAddress,
        XorMappedAddress,
        ResponseOrigin,
        OtherAddress,
        SourceAddress,
        ChangedAddress,
    )
}
_TYPED = frozenset(
    {
        *_ADDRESS_TYPES,
        SOFTWARE,
        ERROR_CODE,
        UNKNOWN_ATTRIBUTES,
        PADDING,
        CHANGE_REQUEST,
        RESPONSE_PORT,
        FINGERPRINT,
    }
)

A = TypeVar("A")


@dataclass(frozen=True, slots=True)
class Message:
    """One STUN message. ``fingerprint`` says whether it carries (or will carry) FINGERPRINT,
    which :func:`encode` computes and :func:`decode` verifies."""

    cls: Class
    transaction_id: bytes
    attributes: tuple[Attribute, ...] = ()
    method: int = BINDING
    fingerprint: bool = True

    def find(self, kind: type[A]) -> A | None:
        """The first attribute of this kind: repeats are ignored (RFC 8489 §14)."""
        for attr in self.attributes:
            if isinstance(attr, kind):
                return attr
        return None

    @property
    def unknown_required(self) -> tuple[int, ...]:
        """Comprehension-required attribute types this module does not understand."""
        return tuple(
            dict.fromkeys(
                a.type
                for a in self.attributes
                if isinstance(a, Opaque) and a.type < 0x8000 and a.type not in OPAQUE_KNOWN
            )
        )

    @property
    def mapped_address(self) -> Address | None:
        """XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS (RFC 8489 §14.2: prefer the XOR form)."""
        xor = self.find(XorMappedAddress)
        if xor is not None:
            return xor.address
        plain = self.find(MappedAddress)
        return plain.address if plain is not None else None

    @property
    def other_address(self) -> Address | None:
        """OTHER-ADDRESS, else RFC 3489's CHANGED-ADDRESS (same meaning, RFC 5780 §7.4)."""
        other = self.find(OtherAddress) or self.find(ChangedAddress)
        return other.address if other is not None else None


def new_transaction_id() -> bytes:
    """96 random bits (RFC 8489 §6: uniformly and cryptographically random)."""
    return secrets.token_bytes(TXID_LEN)


def unmap_address(addr: Address) -> Address:
    """Canonical form of a socket address: IPv4-mapped IPv6 (from a dual-stack socket) becomes
    plain IPv4, a scope id is dropped, the text is ``ipaddress``'s."""
    host, port = addr[0], addr[1]
    try:
        ip = ip_address(host.split("%", 1)[0])
    except ValueError:
        raise StunError(f"{host!r} is not an IP address") from None
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return (str(ip.ipv4_mapped), port)
    return (str(ip), port)


def format_address(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def family_of(host: str) -> int:
    """4 or 6."""
    try:
        return ip_address(host.split("%", 1)[0]).version
    except ValueError:
        raise StunError(f"{host!r} is not an IP address") from None


# --- codec --------------------------------------------------------------------------------------


def _message_type(method: int, cls: Class) -> int:
    # RFC 8489 §5: M11-M7 | C1 | M6-M4 | C0 | M3-M0
    return (
        ((method & 0xF80) << 2)
        | ((method & 0x070) << 1)
        | (method & 0x00F)
        | ((cls & 0b10) << 7)
        | ((cls & 0b01) << 4)
    )


def _split_type(value: int) -> tuple[int, Class]:
    method = ((value >> 2) & 0xF80) | ((value >> 1) & 0x070) | (value & 0x00F)
    return method, Class(((value >> 7) & 0b10) | ((value >> 4) & 0b01))


def _xor_key(transaction_id: bytes) -> bytes:
    # Port XOR the cookie's top 16 bits, address XOR cookie (IPv4) or cookie || txid (IPv6).
    return struct.pack("!HI", MAGIC_COOKIE >> 16, MAGIC_COOKIE) + transaction_id


def _pack_address(addr: Address, xor_key: bytes | None) -> bytes:
    host, port = addr
    try:
        ip = ip_address(host.split("%", 1)[0])
    except ValueError:
        raise StunError(f"{host!r} is not an IP address") from None
    if not 0 <= port <= 0xFFFF:
        raise StunError(f"port {port} out of range")
    body = port.to_bytes(2, "big") + ip.packed
    if xor_key is not None:
        body = bytes(a ^ b for a, b in zip(body, xor_key, strict=False))
    return bytes([0, 1 if ip.version == 4 else 2]) + body


def _unpack_address(value: bytes, xor_key: bytes | None) -> Address:
    if len(value) not in (8, 20):
        raise StunError(f"an address attribute is 8 or 20 bytes, not {len(value)}")
    family = value[1]  # value[0] is reserved: ignored
    if (family, len(value)) not in ((1, 8), (2, 20)):
        raise StunError(f"address family {family} does not match length {len(value)}")
    body = value[2:]
    if xor_key is not None:
        body = bytes(a ^ b for a, b in zip(body, xor_key, strict=False))
    port = int.from_bytes(body[:2], "big")
    ip: IPv4Address | IPv6Address = IPv4Address(body[2:]) if family == 1 else IPv6Address(body[2:])
    return (str(ip), port)


def _text(value: bytes) -> str:
    # SOFTWARE and reason phrases are for humans: a bad byte must not make the message useless.
    return value.decode("utf-8", errors="replace")


def _encode_value(attr: Attribute, transaction_id: bytes) -> tuple[int, bytes]:
    if isinstance(attr, _AddressAttribute):
        xor = _xor_key(transaction_id) if attr.TYPE == XOR_MAPPED_ADDRESS else None
        return attr.TYPE, _pack_address(attr.address, xor)
    if isinstance(attr, Software):
        if len(attr.text) >= 128:  # RFC 8489 §14.14
            raise StunError("SOFTWARE must be fewer than 128 characters")
        return SOFTWARE, attr.text.encode()
    if isinstance(attr, ErrorCode):
        if not 300 <= attr.code <= 699:  # RFC 8489 §14.8: classes 3 to 6
            raise StunError(f"error code {attr.code} out of range")
        if len(attr.reason) >= 128:
            raise StunError("an error reason must be fewer than 128 characters")
        head = bytes([0, 0, attr.code // 100, attr.code % 100])
        return ERROR_CODE, head + attr.reason.encode()
    if isinstance(attr, UnknownAttributes):
        if any(not 0 <= t <= 0xFFFF for t in attr.types):
            raise StunError("attribute types are 16 bits")
        return UNKNOWN_ATTRIBUTES, b"".join(t.to_bytes(2, "big") for t in attr.types)
    if isinstance(attr, Padding):
        if not 0 <= attr.length <= MAX_BODY:
            raise StunError(f"padding of {attr.length} bytes")
        return PADDING, bytes(attr.length)
    if isinstance(attr, ChangeRequest):
        flags = (0x4 if attr.change_ip else 0) | (0x2 if attr.change_port else 0)
        return CHANGE_REQUEST, flags.to_bytes(4, "big")
    if isinstance(attr, ResponsePort):
        if not 0 <= attr.port <= 0xFFFF:
            raise StunError(f"port {attr.port} out of range")
        # RFC 5780 §7.5: the port then 2 bytes of padding, which the 4-byte alignment supplies.
        return RESPONSE_PORT, attr.port.to_bytes(2, "big")
    if isinstance(attr, Opaque):
        if attr.type in _TYPED or not 0 <= attr.type <= 0xFFFF:
            raise StunError(f"attribute 0x{attr.type:04x} cannot be opaque")
        return attr.type, attr.value
    raise StunError(f"not a STUN attribute: {type(attr).__name__}")


def _decode_value(kind: int, value: bytes, transaction_id: bytes) -> Attribute | None:
    address_cls = _ADDRESS_TYPES.get(kind)
    if address_cls is not None:
        xor = _xor_key(transaction_id) if kind == XOR_MAPPED_ADDRESS else None
        return address_cls(_unpack_address(value, xor))  # type: ignore[return-value]
    if kind == SOFTWARE:
        return Software(_text(value))
    if kind == ERROR_CODE:
        if len(value) < 4:
            raise StunError("truncated ERROR-CODE")
        klass, number = value[2] & 0x07, value[3]
        if not 3 <= klass <= 6 or number > 99:
            raise StunError(f"bad error code class {klass} number {number}")
        return ErrorCode(klass * 100 + number, _text(value[4:]))
    if kind == UNKNOWN_ATTRIBUTES:
        if len(value) % 2:
            raise StunError("UNKNOWN-ATTRIBUTES has an odd length")
        return UnknownAttributes(tuple(struct.unpack(f"!{len(value) // 2}H", value)))
    if kind == PADDING:
        return Padding(len(value))
    if kind == CHANGE_REQUEST:
        if len(value) != 4:
            raise StunError("CHANGE-REQUEST is 4 bytes")
        flags = int.from_bytes(value, "big")
        return ChangeRequest(bool(flags & 0x4), bool(flags & 0x2))
    if kind == RESPONSE_PORT:
        if len(value) not in (2, 4):  # with or without its 2 bytes of padding counted
            raise StunError("RESPONSE-PORT is 2 bytes (plus padding)")
        return ResponsePort(int.from_bytes(value[:2], "big"))
    if kind < 0x8000 or kind in OPAQUE_KNOWN:
        return Opaque(kind, value)
    return None  # unknown comprehension-optional: skipped (RFC 8489 §14)


def attribute_size(attr: Attribute) -> int:
    """Bytes the attribute takes in a message: header and padded value."""
    _, value = _encode_value(attr, bytes(TXID_LEN))
    return 4 + _padded(len(value))


def _padded(n: int) -> int:
    return (n + 3) & ~3


def encode(msg: Message) -> bytes:
    """The message's bytes, FINGERPRINT appended and computed when ``msg.fingerprint``."""
    if len(msg.transaction_id) != TXID_LEN:
        raise StunError("a transaction id is 12 bytes")
    if not 0 <= msg.method <= 0xFFF:
        raise StunError(f"method 0x{msg.method:x} is not 12 bits")
    body = bytearray()
    for attr in msg.attributes:
        kind, value = _encode_value(attr, msg.transaction_id)
        if len(value) > MAX_BODY:
            raise StunError("attribute too long")
        body += (
            struct.pack("!HH", kind, len(value)) + value + bytes(_padded(len(value)) - len(value))
        )
    length = len(body) + (FINGERPRINT_LEN if msg.fingerprint else 0)
    if length > MAX_BODY:
        raise StunError(f"a STUN message body of {length} bytes does not fit the length field")
    out = (
        struct.pack("!HHI", _message_type(msg.method, msg.cls), length, MAGIC_COOKIE)
        + msg.transaction_id
        + bytes(body)
    )
    if msg.fingerprint:
        # RFC 8489 §14.7: CRC-32 over the message so far, whose length field already counts the
        # FINGERPRINT attribute, XOR-ed so that other CRC-32-carrying protocols don't match.
        crc = binascii.crc32(out) ^ FINGERPRINT_XOR
        out += struct.pack("!HHI", FINGERPRINT, 4, crc)
    return out


def is_stun(data: bytes) -> bool:
    """A cheap check for demultiplexing: header shape, cookie and length (RFC 8489 §6.3)."""
    if len(data) < HEADER_LEN or data[0] & 0xC0:
        return False
    length, cookie = struct.unpack_from("!HI", data, 2)
    return cookie == MAGIC_COOKIE and length % 4 == 0 and len(data) == HEADER_LEN + length


def decode(data: bytes) -> Message:
    """Parse one STUN message (a whole UDP datagram). Raises only :class:`StunError`."""
    if len(data) < HEADER_LEN:
        raise StunError("shorter than a STUN header")
    kind, length, cookie = struct.unpack_from("!HHI", data)
    if kind & 0xC000:
        raise StunError("the top two bits of a STUN message are zero")
    if cookie != MAGIC_COOKIE:
        raise StunError("no magic cookie (RFC 3489 messages are not supported)")
    if length % 4:
        raise StunError("the message length is a multiple of 4")
    if len(data) != HEADER_LEN + length:
        raise StunError(f"length field says {length} bytes, datagram has {len(data) - 20}")
    method, cls = _split_type(kind)
    transaction_id = bytes(data[8:HEADER_LEN])
    attributes: list[Attribute] = []
    fingerprint = False
    integrity_seen = False
    pos, end = HEADER_LEN, len(data)
    while pos < end:
        atype, alen = struct.unpack_from("!HH", data, pos)  # end - pos >= 4: lengths are x4
        start = pos + 4
        after = start + _padded(alen)
        if after > end:
            raise StunError(f"attribute 0x{atype:04x} runs past the end of the message")
        value = bytes(data[start : start + alen])
        if atype == FINGERPRINT:
            if after != end:
                raise StunError("FINGERPRINT must be the last attribute")  # RFC 8489 §14.7
            if alen != 4:
                raise StunError("FINGERPRINT is 4 bytes")
            if int.from_bytes(value, "big") != binascii.crc32(data[:pos]) ^ FINGERPRINT_XOR:
                raise StunError("FINGERPRINT does not match")
            fingerprint = True
        elif integrity_seen and atype != MESSAGE_INTEGRITY_SHA256:
            pass  # RFC 8489 §14.5: what follows MESSAGE-INTEGRITY is not covered: ignore it
        else:
            attr = _decode_value(atype, value, transaction_id)
            if attr is not None:
                attributes.append(attr)
            integrity_seen = atype in (MESSAGE_INTEGRITY, MESSAGE_INTEGRITY_SHA256)
        pos = after
    return Message(cls, transaction_id, tuple(attributes), method, fingerprint)


# --- client -------------------------------------------------------------------------------------


class Retransmitter:
    """RFC 8489 §6.2.1's schedule for one request over UDP: send at ``start``, then after RTO,
    2 RTO, 4 RTO ... (``attempts`` sends in all), and give up ``final_wait`` after the last
    (Rm * RTO by default). With the defaults: 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s, fail at
    39.5 s."""

    def __init__(
        self,
        start: float,
        *,
        rto: float = RTO,
        attempts: int = ATTEMPTS,
        final_wait: float | None = None,
    ) -> None:
        if rto <= 0 or attempts < 1:
            raise ValueError("rto must be positive and attempts at least 1")
        self.start = start
        self.rto = rto
        self.attempts = attempts
        self.final_wait = RM * rto if final_wait is None else final_wait
        self.sent = 0
        self.last_sent: float | None = None
        self.expired = False

    def _send_time(self, k: int) -> float:
        return self.start + self.rto * (2**k - 1)

    def poll(self, now: float) -> bool:
        """True when a (re)transmission is due now; marks :attr:`expired` when time is up."""
        if self.expired:
            return False
        if self.sent < self.attempts:
            if now >= self._send_time(self.sent):
                self.sent += 1
                self.last_sent = now
                return True
            return False
        if now >= self._send_time(self.attempts - 1) + self.final_wait:
            self.expired = True
        return False

    def next_timer(self) -> float | None:
        if self.expired:
            return None
        if self.sent < self.attempts:
            return self._send_time(self.sent)
        return self._send_time(self.attempts - 1) + self.final_wait

    @property
    def total(self) -> float:
        """Seconds from the first send until the transaction fails."""
        return self._send_time(self.attempts - 1) - self.start + self.final_wait


@dataclass(frozen=True, slots=True)
class BindingResult:
    mapped: Address  # our reflexive address as the server saw it
    source: Address  # where the response came from (not the server's address after a change)
    rtt: float  # seconds since the latest transmission: ambiguous if transmissions > 1 (Karn)
    transmissions: int
    response_origin: Address | None = None
    other_address: Address | None = None  # the server's alternate address (RFC 5780)
    software: str | None = None


class BindingTransaction:
    """One Binding request and its retransmissions (RFC 8489 §6.2.1), sans-IO.

    Call :meth:`datagrams_to_send` at :meth:`next_timer` and after every :meth:`receive`;
    when :attr:`done`, read :attr:`result` or :attr:`error`. Responses are matched by
    transaction id only, not by source: after a CHANGE-REQUEST they come from elsewhere.

    ``pad_to`` adds PADDING so the request is at least that many bytes and the answer of a
    server that never amplifies (ours) fits. A server that does not know PADDING and says so
    (420 listing it) is asked again, once, without it.
    """

    def __init__(
        self,
        server: Address,
        now: float,
        *,
        rto: float = RTO,
        attempts: int = ATTEMPTS,
        final_wait: float | None = None,
        pad_to: int = DEFAULT_REQUEST_SIZE,
        change_ip: bool = False,
        change_port: bool = False,
        response_port: int | None = None,
        software: str | None = None,
        transaction_id: bytes | None = None,
    ) -> None:
        self.server = server
        self._timing = (rto, attempts, final_wait)
        self._change = ChangeRequest(change_ip, change_port) if change_ip or change_port else None
        self._response_port = response_port
        self._software = software
        self._stale: set[bytes] = set()
        self.result: BindingResult | None = None
        self.error: str | None = None
        self.error_code: int | None = None
        self._start(now, transaction_id or new_transaction_id(), pad_to)

    def _start(self, now: float, transaction_id: bytes, pad_to: int) -> None:
        rto, attempts, final_wait = self._timing
        self.retransmitter = Retransmitter(now, rto=rto, attempts=attempts, final_wait=final_wait)
        self.transaction_id = transaction_id
        attrs: list[Attribute] = []
        if self._change is not None:
            attrs.append(self._change)
        if self._response_port is not None:
            attrs.append(ResponsePort(self._response_port))
        if self._software:
            attrs.append(Software(self._software))
        size = len(encode(Message(Class.REQUEST, transaction_id, tuple(attrs))))
        self.padded = pad_to > size
        if self.padded:
            attrs.append(Padding(_padded(max(0, pad_to - size - 4))))
        self.request = encode(Message(Class.REQUEST, transaction_id, tuple(attrs)))

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        if self.done:
            return []
        if self.retransmitter.poll(now):
            return [(self.request, self.server)]
        if self.retransmitter.expired:
            self.error = f"timeout after {self.retransmitter.sent} transmissions"
        return []

    def next_timer(self) -> float | None:
        return None if self.done else self.retransmitter.next_timer()

    def receive(self, data: bytes, source: Address, now: float) -> bool:
        """Feed a datagram; True if it was this transaction's (consumed)."""
        try:
            msg = decode(data)
        except StunError:
            return False
        return self.handle_message(msg, source, now)

    def handle_message(self, msg: Message, source: Address, now: float) -> bool:
        if msg.transaction_id != self.transaction_id:
            return msg.transaction_id in self._stale
        if msg.method != BINDING or msg.cls not in (Class.SUCCESS, Class.ERROR):
            return False
        if self.done:
            return True  # an answer to a retransmission
        if msg.cls == Class.ERROR:
            err = msg.find(ErrorCode)
            unknown = msg.find(UnknownAttributes)
            if (
                err is not None
                and err.code == 420
                and self.padded
                and unknown is not None
                and PADDING in unknown.types
            ):
                self._stale.add(self.transaction_id)
                self._start(now, new_transaction_id(), 0)
                return True
            self.error_code = err.code if err is not None else None
            self.error = f"error {err.code} {err.reason}".rstrip() if err else "error response"
            return True
        if msg.unknown_required:  # RFC 8489 §7.3.3
            names = ", ".join(f"0x{t:04x}" for t in msg.unknown_required)
            self.error = f"response carries unknown comprehension-required attributes {names}"
            return True
        mapped = msg.mapped_address
        if mapped is None:
            self.error = "response without a mapped address"
            return True
        origin = msg.find(ResponseOrigin) or msg.find(SourceAddress)
        software = msg.find(Software)
        last = self.retransmitter.last_sent
        self.result = BindingResult(
            mapped=mapped,
            source=source,
            rtt=max(0.0, now - (last if last is not None else now)),
            transmissions=self.retransmitter.sent,
            response_origin=origin.address if origin is not None else None,
            other_address=msg.other_address,
            software=software.text if software is not None else None,
        )
        return True


# --- responder ----------------------------------------------------------------------------------

Reply = tuple[bytes, Address, Address]  # (datagram, destination, local address to send from)


@dataclass
class StunResponder:
    """Answers Binding requests, sans-IO: ``handle(data, source, local, now)`` returns the
    replies as (datagram, destination, local address to send from).

    * **No amplification**: a reply is never larger than the request. XOR-MAPPED-ADDRESS is
      required; OTHER-ADDRESS, RESPONSE-ORIGIN, FINGERPRINT, MAPPED-ADDRESS and SOFTWARE are
      added in that order while they fit. If even the minimum does not fit: no answer.
    * Rate-limited per source IP (token bucket); over the limit: no answer.
    * Only Binding requests are answered; malformed messages, indications, responses and other
      methods get nothing.
    * Unknown comprehension-required attributes get a 420 listing them (if it fits).
    * **RFC 5780** when given ``primary`` and ``other`` (which differ in IP *and* port): the
      adapter listens on the four combinations of the two IPs and two ports; replies carry
      OTHER-ADDRESS (the other IP and other port than the one the request came to) and
      RESPONSE-ORIGIN, and CHANGE-REQUEST moves the reply to the other IP and/or port. Without
      them, CHANGE-REQUEST is unknown (420, RFC 5780 §6.1).
    * RESPONSE-PORT sends the reply to that port of the requester's IP (RFC 5780 §7.5).
    """

    software: str | None = DEFAULT_SOFTWARE
    primary: Address | None = None
    other: Address | None = None
    rate: float = 20.0  # requests per second per source IP
    burst: float = 40.0
    max_sources: int = 4096
    _limiter: KeyedBuckets = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if (self.primary is None) != (self.other is None):
            raise ValueError("RFC 5780 needs both a primary and an other address")
        if self.primary is not None and self.other is not None:
            self.primary = unmap_address(self.primary)
            self.other = unmap_address(self.other)
            if self.primary[0] == self.other[0] or self.primary[1] == self.other[1]:
                raise ValueError("the other address must differ in both IP and port")
            if family_of(self.primary[0]) != family_of(self.other[0]):
                raise ValueError("primary and other addresses must be of one family")
        self._limiter = KeyedBuckets(self.rate, self.burst, self.max_sources)

    @property
    def rfc5780(self) -> bool:
        return self.primary is not None

    def local_addresses(self) -> list[Address]:
        """The four (IP, port) combinations an RFC 5780 adapter must listen on."""
        if self.primary is None or self.other is None:
            return []
        ips, ports = (self.primary[0], self.other[0]), (self.primary[1], self.other[1])
        return [(ip, port) for ip in ips for port in ports]

    def _alternate(self, local: Address) -> tuple[str, int] | None:
        """The other IP and the other port than ``local``'s, or None if local is not ours."""
        if self.primary is None or self.other is None:
            return None
        (p_ip, p_port), (o_ip, o_port) = self.primary, self.other
        ip, port = local
        alt_ip = o_ip if ip == p_ip else p_ip if ip == o_ip else None
        alt_port = o_port if port == p_port else p_port if port == o_port else None
        if alt_ip is None or alt_port is None:
            return None
        return alt_ip, alt_port

    def handle(self, data: bytes, source: Address, local: Address, now: float) -> list[Reply]:
        try:
            msg = decode(data)
            source, local = unmap_address(source), unmap_address(local)
        except StunError:
            return []
        if msg.method != BINDING or msg.cls != Class.REQUEST:
            return []
        if source[1] == 0 or not self._limiter.allow(source[0], now):
            return []
        limit = len(data)
        alternate = self._alternate(local)
        change = msg.find(ChangeRequest)
        unknown = list(msg.unknown_required)
        if change is not None and alternate is None:
            unknown.append(CHANGE_REQUEST)  # RFC 5780 §6.1: no alternate address to answer from
        destination = source
        port_attr = msg.find(ResponsePort)
        if port_attr is not None:
            if port_attr.port == 0:
                return []
            destination = (source[0], port_attr.port)
        if unknown:
            essential: list[Attribute] = [
                ErrorCode(420, "Unknown Attribute"),
                UnknownAttributes(tuple(unknown)),
            ]
            reply = self._fit(msg.transaction_id, Class.ERROR, essential, [], limit)
            return [(reply, destination, local)] if reply is not None else []
        sender = local
        if change is not None and alternate is not None:
            sender = (
                alternate[0] if change.change_ip else local[0],
                alternate[1] if change.change_port else local[1],
            )
        optional: list[Attribute | None] = []  # None stands for FINGERPRINT
        if alternate is not None:
            optional += [OtherAddress(alternate), ResponseOrigin(sender)]
        optional += [None, MappedAddress(source)]
        if self.software:
            optional.append(Software(self.software))
        reply = self._fit(
            msg.transaction_id, Class.SUCCESS, [XorMappedAddress(source)], optional, limit
        )
        return [(reply, destination, sender)] if reply is not None else []

    @staticmethod
    def _fit(
        transaction_id: bytes,
        cls: Class,
        essential: Sequence[Attribute],
        optional: Sequence[Attribute | None],
        limit: int,
    ) -> bytes | None:
        size = HEADER_LEN + sum(attribute_size(a) for a in essential)
        if size > limit:
            return None
        chosen = list(essential)
        fingerprint = False
        for attr in optional:
            cost = FINGERPRINT_LEN if attr is None else attribute_size(attr)
            if size + cost > limit:
                continue
            size += cost
            if attr is None:
                fingerprint = True
            else:
                chosen.append(attr)
        out = encode(Message(cls, transaction_id, tuple(chosen), BINDING, fingerprint))
        return out if len(out) <= limit else None  # never amplify, even if a size was off


__all__ = [
    "ATTEMPTS",
    "BINDING",
    "DEFAULT_REQUEST_SIZE",
    "RTO",
    "Attribute",
    "BindingResult",
    "BindingTransaction",
    "ChangeRequest",
    "ChangedAddress",
    "Class",
    "ErrorCode",
    "MappedAddress",
    "Message",
    "Opaque",
    "OtherAddress",
    "Padding",
    "Reply",
    "ResponseOrigin",
    "ResponsePort",
    "Retransmitter",
    "Software",
    "SourceAddress",
    "StunError",
    "StunResponder",
    "UnknownAttributes",
    "XorMappedAddress",
    "attribute_size",
    "decode",
    "encode",
    "family_of",
    "format_address",
    "is_stun",
    "new_transaction_id",
    "unmap_address",
]
