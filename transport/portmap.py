"""Port mapping: ask the home router to forward a UDP port to the box, so devices behind hard NATs
(symmetric, CGNAT) can still reach it directly. Sans-IO: codecs plus the :class:`PortMapper` state
machine; ``transport.portmap_aio`` owns the sockets. ``docs/portmap.md`` is the owner's view.

Order of attempts: **PCP** (RFC 6887), then **NAT-PMP** (RFC 6886), then **UPnP IGD** (SSDP +
SOAP). PCP and NAT-PMP are one datagram each way to the default gateway's UDP port 5351, so they
are cheap and fail fast (a router that runs neither usually answers ICMP port unreachable, which
the adapter reports). UPnP needs multicast discovery and HTTP, so it comes last. The mapping is
renewed at half its lifetime and deleted on :meth:`PortMapper.close`.

PCP MAP request (RFC 6887 §7.1 header + §11.1 MAP body), 60 bytes::

     0               1               2               3
    +---------------+-+-------------+-------------------------------+
    | version = 2   |R| opcode = 1  |          reserved (0)         |  R = 0: request
    +---------------+-+-------------+-------------------------------+
    |                  requested lifetime (seconds)                 |
    +---------------------------------------------------------------+
    |      PCP client's IP address (16, IPv4-mapped ::ffff:a.b.c.d)  |
    +---------------------------------------------------------------+
    |                   mapping nonce (12, random)                  |
    +---------------+-----------------------------------------------+
    | protocol (17) |                 reserved (3)                  |
    +---------------+---------------+-------------------------------+
    |       internal port           |   suggested external port     |
    +-------------------------------+-------------------------------+
    |   suggested external IP address (16, ::ffff:0.0.0.0 = any)    |
    +---------------------------------------------------------------+

PCP response (RFC 6887 §7.2 + §11.1), 60 bytes for MAP::

    | version = 2   |1| opcode      |  reserved     | result code   |
    |                  lifetime (granted, or how long an error lasts) |
    |                  epoch time (seconds since the server's state began) |
    |                  reserved (12)                                |
    | nonce (12) | protocol (1) | reserved (3) | internal port (2) | assigned external port (2) |
    | assigned external IP address (16)                             |

NAT-PMP (RFC 6886 §3.2 and §3.3), to the same port 5351, version 0::

    external address request   0 | 0                                              (2 bytes)
    external address response  0 | 128 | result (2) | epoch (4) | external IPv4 (4)   (12)
    UDP mapping request        0 | 1 | reserved (2) | internal port (2) |
                               suggested external port (2) | requested lifetime (4)   (12)
    UDP mapping response       0 | 129 | result (2) | epoch (4) | internal port (2) |
                               mapped external port (2) | lifetime (4)                (16)

UPnP IGD: an SSDP ``M-SEARCH`` (UDA 1.1 §1.3.2) to 239.255.255.250:1900 and unicast to the
gateway's port 1900; the answer's ``LOCATION`` names the device description (XML), whose
``WANIPConnection:1/2`` or ``WANPPPConnection:1`` service names a ``controlURL``; SOAP actions
``GetExternalIPAddress``, ``AddPortMapping`` and ``DeletePortMapping`` go there by HTTP POST.

Safety: every parser here raises only :class:`PortMapError`, whatever the bytes. XML is parsed
with :mod:`xml.etree.ElementTree` from text we decoded ourselves (so no declared encoding can hide
markup), after refusing any ``<!DOCTYPE``/``<!ENTITY`` (UPnP documents never need them) and
anything over :data:`MAX_XML`. We only follow URLs that point at the default gateway itself.
"""

from __future__ import annotations

import enum
import random
import secrets
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from urllib.parse import urljoin, urlsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape

PCP_PORT = 5351  # RFC 6887 §19.1: the PCP server's port; NAT-PMP (RFC 6886 §3.1) uses the same
PCP_VERSION = 2
NATPMP_VERSION = 0
SSDP_MULTICAST = ("239.255.255.250", 1900)  # UDA 1.1 §1.1.2
IPPROTO_UDP = 17

DEFAULT_LIFETIME = 7200  # RFC 6886 §3.3 recommends two hours; PCP servers clamp as they like
PCP_TIMEOUTS = (3.0, 6.0)  # RFC 6887 §8.1.1: IRT = 3 s, then double; we stop after two tries
NATPMP_TIMEOUTS = (0.25, 0.5, 1.0, 2.0)  # RFC 6886 §3.1: 250 ms, doubling (we stop after four)
SSDP_TIMEOUT = 3.0  # MX = 2 gives devices 2 s to answer (UDA 1.1 §1.3.2), plus slack
SSDP_RESEND = 1.0  # M-SEARCH is multicast UDP: send it twice
HTTP_TIMEOUT = 5.0
CLOSE_TIMEOUT = 2.0
RETRY_BACKOFF = (30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)  # after a failure; the last repeats
MIN_RENEW = 2.0  # an unanswered renewal with less than this left waits for the expiry
MAX_CONFLICTS = 4  # UPnP 718 ConflictInMappingEntry: try this many external ports in all
UPNP_PERMANENT_REFRESH = 1800  # a lease-0 ("permanent") UPnP mapping is re-added this often

MAX_PCP = 1100  # RFC 6887 §7: a PCP message is at most 1100 bytes
MAX_SSDP = 8192
MAX_XML = 128 * 1024
MAX_HTTP_HEADER = 16 * 1024
MAX_HTTP = MAX_XML + MAX_HTTP_HEADER

SEARCH_TARGETS = (
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
)
# Most preferred first. IGD:2's WANIPConnection:2 is a superset of :1 for the actions we use.
SERVICE_TYPES = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)

Addr = tuple[str, int]


class PortMapError(ValueError):
    """A message that cannot be parsed or a URL we refuse. The only error this module's parsers
    raise."""


class UpnpFault(PortMapError):
    """A SOAP fault (or a bare HTTP error) from the UPnP gateway."""

    def __init__(self, code: int | None, description: str) -> None:
        self.code = code
        self.description = description
        meaning = UPNP_ERRORS.get(code or 0)
        text = f"UPnP error {code} {description}" if code is not None else description
        super().__init__(f"{text} ({meaning})" if meaning else text)


class Method(enum.StrEnum):
    """The three ways to ask for a mapping, in the order they are tried."""

    PCP = "pcp"
    NATPMP = "nat-pmp"
    UPNP = "upnp"


_METHOD_NAMES = {Method.PCP: "PCP", Method.NATPMP: "NAT-PMP", Method.UPNP: "UPnP"}

# RFC 6887 §7.4, in words an owner can act on.
PCP_RESULTS = {
    0: "success",
    1: "the router does not support PCP version 2",
    2: "the router refuses port mappings (PCP is turned off or restricted)",
    3: "the router found the request malformed",
    4: "the router does not support the MAP operation",
    5: "the router does not support a PCP option we sent",
    6: "the router found a PCP option malformed",
    7: "the router has a network failure (its internet side is down or has no address)",
    8: "the router is out of mappings",
    9: "the router does not map UDP",
    10: "this device has too many mappings on the router",
    11: "the router cannot give out an external port or address",
    12: "the router sees this device at another address (another NAT between box and router?)",
    13: "the router cannot handle that many remote peers",
}

# RFC 6886 §3.5.
NATPMP_RESULTS = {
    0: "success",
    1: "the router does not support NAT-PMP version 0",
    2: "the router refuses port mappings (NAT-PMP is turned off)",
    3: "the router has a network failure (it has no internet address yet)",
    4: "the router is out of mappings",
    5: "the router does not support this NAT-PMP operation",
}

# UPnP IGD WANIPConnection:2 §2.4 and UDA 1.1 §3.2.2 error codes we may meet.
UPNP_ERRORS = {
    401: "invalid action",
    402: "invalid arguments",
    501: "the action failed",
    606: "the router requires authorisation for this action",
    714: "no such mapping",
    715: "the router requires a wildcard source address",
    716: "the router requires a wildcard external port",
    718: "that external port is already mapped to someone else",
    724: "the router needs the external and internal port to be the same",
    725: "the router supports only permanent leases",
    726: "the router requires a wildcard remote host",
    727: "the router requires a wildcard external port",
    728: "the router has no free port mappings",
    729: "the mapping conflicts with another mechanism",
    732: "the router requires a wildcard internal port",
}

# A double NAT: a mapping on the home router alone does not make the box reachable.
_NOT_PUBLIC = tuple(
    ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16")
)


def behind_another_nat(external_ip: str) -> bool:
    """True when the router's "external" address is itself private or CGNAT (RFC 1918, RFC 6598):
    the router sits behind another NAT, and a mapping on it alone reaches nobody outside."""
    try:
        addr = ip_address(external_ip)
    except ValueError:
        return False
    return isinstance(addr, IPv4Address) and any(addr in n for n in _NOT_PUBLIC)


# --- PCP (RFC 6887) -----------------------------------------------------------------------------

PCP_OPCODE_ANNOUNCE = 0
PCP_OPCODE_MAP = 1
PCP_RESPONSE_BIT = 0x80
PCP_HEADER = struct.Struct("!BBBBII12s")  # version, R|opcode, reserved, result, lifetime, epoch
PCP_MAP = struct.Struct("!12sB3xHH16s")  # nonce, protocol, internal port, ext port, ext address
NONCE_LEN = 12


def _ip16(ip: str) -> bytes:
    """An address in a PCP field: IPv6 as is, IPv4 as IPv4-mapped IPv6 (RFC 6887 §5)."""
    try:
        addr = ip_address(ip)
    except ValueError as exc:
        raise PortMapError(f"not an IP address: {ip!r}") from exc
    if isinstance(addr, IPv4Address):
        return b"\x00" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


def _from_ip16(raw: bytes) -> str:
    addr = IPv6Address(raw)
    mapped = addr.ipv4_mapped
    return str(mapped) if mapped is not None else str(addr)


def encode_pcp_map(
    *,
    client_ip: str,
    nonce: bytes,
    internal_port: int,
    lifetime: int,
    external_port: int = 0,
    external_ip: str = "0.0.0.0",  # noqa: S104 - "no preference", RFC 6887 §11.1
    protocol: int = IPPROTO_UDP,
) -> bytes:
    """A PCP MAP request. ``lifetime`` 0 deletes the mapping (§15); a renewal repeats the same
    nonce (§11.2.1). ``external_port``/``external_ip`` are suggestions the server may ignore."""
    if len(nonce) != NONCE_LEN:
        raise PortMapError("a PCP nonce is 96 bits")
    header = struct.pack("!BBHI", PCP_VERSION, PCP_OPCODE_MAP, 0, lifetime) + _ip16(client_ip)
    body = PCP_MAP.pack(nonce, protocol, internal_port, external_port, _ip16(external_ip))
    return header + body


@dataclass(frozen=True)
class PcpResponse:
    opcode: int
    result: int
    lifetime: int
    epoch: int
    # MAP responses only (zero/empty for ANNOUNCE):
    nonce: bytes = b""
    protocol: int = 0
    internal_port: int = 0
    external_port: int = 0
    external_ip: str = ""

    @property
    def meaning(self) -> str:
        return PCP_RESULTS.get(self.result, f"unknown PCP result code {self.result}")


def parse_pcp_response(data: bytes) -> PcpResponse:
    """A PCP response (ANNOUNCE or MAP). Options after the MAP body are skipped."""
    if len(data) < PCP_HEADER.size:
        raise PortMapError("PCP response shorter than its 24-byte header")
    if len(data) > MAX_PCP or len(data) % 4:
        raise PortMapError("a PCP message is a multiple of 4 bytes, at most 1100")
    version, op, _, result, lifetime, epoch, _ = PCP_HEADER.unpack_from(data)
    if version != PCP_VERSION:
        raise PortMapError(f"PCP version {version}, expected {PCP_VERSION}")
    if not op & PCP_RESPONSE_BIT:
        raise PortMapError("a PCP request, not a response")
    opcode = op & 0x7F
    if opcode == PCP_OPCODE_ANNOUNCE:
        return PcpResponse(opcode, result, lifetime, epoch)
    if opcode != PCP_OPCODE_MAP:
        raise PortMapError(f"unexpected PCP opcode {opcode}")
    if len(data) < PCP_HEADER.size + PCP_MAP.size:
        raise PortMapError("PCP MAP response shorter than 60 bytes")
    nonce, proto, iport, eport, eip = PCP_MAP.unpack_from(data, PCP_HEADER.size)
    return PcpResponse(opcode, result, lifetime, epoch, nonce, proto, iport, eport, _from_ip16(eip))


# --- NAT-PMP (RFC 6886) -------------------------------------------------------------------------

NATPMP_OP_ADDRESS = 0
NATPMP_OP_MAP_UDP = 1
NATPMP_RESPONSE = 128


def encode_natpmp_address_request() -> bytes:
    return bytes([NATPMP_VERSION, NATPMP_OP_ADDRESS])


def encode_natpmp_map(*, internal_port: int, external_port: int, lifetime: int) -> bytes:
    """A NAT-PMP UDP mapping request. Deleting (§3.4) is ``lifetime=0, external_port=0``."""
    return struct.pack(
        "!BBHHHI", NATPMP_VERSION, NATPMP_OP_MAP_UDP, 0, internal_port, external_port, lifetime
    )


@dataclass(frozen=True)
class NatPmpResponse:
    opcode: int  # the request's opcode (0 address, 1 UDP map); the wire carries it + 128
    result: int
    epoch: int
    external_ip: str = ""  # address responses
    internal_port: int = 0  # mapping responses
    external_port: int = 0
    lifetime: int = 0

    @property
    def meaning(self) -> str:
        return NATPMP_RESULTS.get(self.result, f"unknown NAT-PMP result code {self.result}")


def parse_natpmp_response(data: bytes) -> NatPmpResponse:
    """A NAT-PMP response. An error response may stop after the epoch (8 bytes, §3.5)."""
    if len(data) < 8:
        raise PortMapError("NAT-PMP response shorter than 8 bytes")
    version, op, result, epoch = struct.unpack_from("!BBHI", data)
    if version != NATPMP_VERSION:
        raise PortMapError(f"NAT-PMP version {version}, expected 0")
    if op < NATPMP_RESPONSE:
        raise PortMapError("a NAT-PMP request, not a response")
    opcode = op - NATPMP_RESPONSE
    if result != 0:
        return NatPmpResponse(opcode, result, epoch)
    if opcode == NATPMP_OP_ADDRESS:
        if len(data) < 12:
            raise PortMapError("NAT-PMP address response shorter than 12 bytes")
        return NatPmpResponse(opcode, result, epoch, external_ip=str(IPv4Address(data[8:12])))
    if opcode in (1, 2):
        if len(data) < 16:
            raise PortMapError("NAT-PMP mapping response shorter than 16 bytes")
        iport, eport, lifetime = struct.unpack_from("!HHI", data, 8)
        return NatPmpResponse(opcode, result, epoch, "", iport, eport, lifetime)
    raise PortMapError(f"unexpected NAT-PMP opcode {op}")


def epoch_valid(prev_epoch: int, prev_time: float, epoch: int, now: float) -> bool:
    """RFC 6887 §8.5 (NAT-PMP's §3.6 is the same idea): the server's epoch must advance with our
    clock, give or take 2 s and 1/16; otherwise it restarted and lost our mapping."""
    if epoch + 1 < prev_epoch:
        return False
    client_delta = now - prev_time
    server_delta = epoch - prev_epoch
    return not (
        client_delta + 2 < server_delta - server_delta / 16
        or server_delta + 2 < client_delta - client_delta / 16
    )


# --- HTTP/1.1, just enough for UPnP (RFC 9112) -------------------------------------------------


@dataclass(frozen=True)
class HttpResponse:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names; a repeated header keeps the last value
    body: bytes


def _header_lines(text: str, *, strict: bool = True) -> tuple[str, dict[str, str]]:
    lines = text.split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            if strict:
                raise PortMapError(f"bad header line {line[:60]!r}")
            continue  # SSDP answers come from sloppy firmware: skip what we don't need
        headers[name.lower()] = value.strip()
    return lines[0], headers


def parse_http_response(data: bytes, *, eof: bool = True) -> HttpResponse | None:
    """Parse a whole response. With ``eof=False`` return None while more bytes are needed (so the
    adapter can stop reading as soon as the body is complete); with ``eof=True`` a truncated
    response is an error. Handles ``Content-Length``, ``chunked`` and read-until-close bodies."""
    if len(data) > MAX_HTTP:
        raise PortMapError("HTTP response too large")
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if eof or len(data) > MAX_HTTP_HEADER:
            raise PortMapError("HTTP response without a complete header")
        return None
    if end > MAX_HTTP_HEADER:
        raise PortMapError("HTTP response header too large")
    status_line, headers = _header_lines(data[:end].decode("latin-1"))
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isascii():
        raise PortMapError(f"bad HTTP status line {status_line[:60]!r}")
    if not (len(parts[1]) == 3 and parts[1].isdigit()):
        raise PortMapError(f"bad HTTP status {parts[1][:10]!r}")
    status, reason = int(parts[1]), (parts[2] if len(parts) > 2 else "")
    rest = data[end + 4 :]
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(rest, eof=eof)
    elif "content-length" in headers:
        raw = headers["content-length"]
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
            raise PortMapError(f"bad Content-Length {raw[:12]!r}")
        length = int(raw)
        if len(rest) < length:
            if eof:
                raise PortMapError("HTTP body shorter than its Content-Length")
            return None
        body = rest[:length]
    elif eof or status in (204, 304) or 100 <= status < 200:
        body = rest
    else:
        return None
    if body is None:
        return None
    return HttpResponse(status, reason, headers, body)


def _dechunk(data: bytes, *, eof: bool) -> bytes | None:
    out = bytearray()
    pos = 0
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            if eof:
                raise PortMapError("truncated chunked body")
            return None
        size_text = data[pos:line_end].split(b";", 1)[0].strip()
        if (
            not size_text
            or len(size_text) > 8
            or not all(c in b"0123456789abcdefABCDEF" for c in size_text)
        ):
            raise PortMapError("bad chunk size")
        size = int(size_text, 16)
        start = line_end + 2
        if size == 0:
            return bytes(out)  # trailers, if any, are ignored
        if len(data) < start + size + 2:
            if eof:
                raise PortMapError("truncated chunk")
            return None
        if data[start + size : start + size + 2] != b"\r\n":
            raise PortMapError("chunk not followed by CRLF")
        out += data[start : start + size]
        pos = start + size + 2


@dataclass(frozen=True)
class Url:
    host: str  # an IP literal, no brackets
    port: int
    target: str  # path and query, at least "/"

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_url(url: str) -> Url:
    """An ``http://`` URL whose host is an IP literal. UPnP devices name themselves by address;
    we refuse host names so a description can never make the box resolve or reach elsewhere."""
    try:
        if not url.isascii() or any(c.isspace() or ord(c) < 32 for c in url):
            raise PortMapError("URL with spaces or non-ASCII characters")
        parts = urlsplit(url)
        if parts.scheme.lower() != "http":
            raise PortMapError(f"not an http URL: {url[:80]!r}")
        host = parts.hostname or ""
        port = 80 if parts.port is None else parts.port
        ip = ip_address(host)
        if port == 0:
            raise PortMapError("port 0")
    except ValueError as exc:  # urlsplit/port/ip_address; PortMapError is a ValueError too
        raise PortMapError(f"bad URL {url[:80]!r}: {exc}") from exc
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return Url(str(ip), port, target)


def encode_http_request(
    method: str, url: Url, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
) -> bytes:
    lines = [
        f"{method} {url.target} HTTP/1.1",
        f"Host: {url.host_header}",
        "Connection: close",
        "User-Agent: lazycat UPnP/1.1",
        *(f"{k}: {v}" for k, v in headers),
    ]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


# --- SSDP (UDA 1.1 §1.3) ------------------------------------------------------------------------


def encode_ssdp_search(search_target: str, *, mx: int = 2) -> bytes:
    return (
        "M-SEARCH * HTTP/1.1\r\n"
        f"HOST: {SSDP_MULTICAST[0]}:{SSDP_MULTICAST[1]}\r\n"
        'MAN: "ssdp:discover"\r\n'
        f"MX: {mx}\r\n"
        f"ST: {search_target}\r\n"
        "\r\n"
    ).encode("ascii")


@dataclass(frozen=True)
class SsdpResponse:
    location: str
    search_target: str
    usn: str
    server: str


def parse_ssdp_response(data: bytes) -> SsdpResponse:
    """A unicast answer to M-SEARCH: ``HTTP/1.1 200 OK`` with a ``LOCATION`` header."""
    if len(data) > MAX_SSDP:
        raise PortMapError("SSDP response too large")
    text = data.decode("latin-1")
    head = text.split("\r\n\r\n", 1)[0]
    status_line, headers = _header_lines(head, strict=False)
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or parts[1] != "200":
        raise PortMapError(f"not an SSDP search response: {status_line[:60]!r}")
    location = headers.get("location", "")
    if not location:
        raise PortMapError("SSDP response without LOCATION")
    parse_url(location)
    return SsdpResponse(
        location, headers.get("st", ""), headers.get("usn", ""), headers.get("server", "")
    )


# --- XML: device description and SOAP -----------------------------------------------------------


def _parse_xml(data: bytes) -> ElementTree.Element:
    if len(data) > MAX_XML:
        raise PortMapError("XML document too large")
    try:
        text = data.decode("utf-8-sig")  # UPnP mandates UTF-8 (UDA 1.1 §2.1)
    except UnicodeDecodeError as exc:
        raise PortMapError("XML is not UTF-8") from exc
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise PortMapError("XML with a DTD or entity declarations refused")
    try:
        # From str, expat ignores the declared encoding, so nothing can re-encode the markup
        # past the check above. Entity expansion beyond the built-ins needs a DTD.
        return ElementTree.fromstring(text)  # noqa: S314 - DTDs refused above, size capped
    except (ElementTree.ParseError, ValueError, LookupError) as exc:
        raise PortMapError(f"bad XML: {exc}") from exc


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _child_text(elem: ElementTree.Element, name: str) -> str:
    for child in elem:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return ""


@dataclass(frozen=True)
class IgdService:
    service_type: str
    control_url: str  # absolute, and on the same host as the description

    @property
    def version(self) -> int:
        return int(self.service_type.rsplit(":", 1)[-1])


def parse_device_description(data: bytes, location: str) -> list[IgdService]:
    """The WAN*Connection services of an IGD description, most preferred first.

    ``controlURL`` is resolved against ``URLBase`` if present (UDA 1.0) or else ``location``
    (UDA 1.1 §2.3), and must stay on the description's host."""
    loc = parse_url(location)
    root = _parse_xml(data)
    if _local(root.tag) != "root":
        raise PortMapError("not a UPnP device description (no <root>)")
    base = _child_text(root, "URLBase") or location
    found: list[IgdService] = []
    for elem in root.iter():
        if _local(elem.tag) != "service":
            continue
        service_type = _child_text(elem, "serviceType")
        control = _child_text(elem, "controlURL")
        if service_type not in SERVICE_TYPES or not control:
            continue
        try:
            absolute = urljoin(base, control)
        except ValueError:
            continue
        try:
            url = parse_url(absolute)
        except PortMapError:
            continue
        if url.host != loc.host:
            continue  # a control URL elsewhere than the gateway: not followed
        service = IgdService(service_type, absolute)
        if service not in found:
            found.append(service)
    if not found:
        raise PortMapError("the device offers no WANIPConnection or WANPPPConnection service")
    found.sort(key=lambda s: SERVICE_TYPES.index(s.service_type))
    return found


SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP_ENC = "http://schemas.xmlsoap.org/soap/encoding/"


def encode_soap_request(
    control_url: str, service_type: str, action: str, args: Sequence[tuple[str, str | int]] = ()
) -> tuple[Url, bytes]:
    """The whole HTTP request for a SOAP action (UDA 1.1 §3.2.1). Arguments keep their order,
    which the IGD spec fixes."""
    url = parse_url(control_url)
    params = "".join(f"<{k}>{escape(str(v))}</{k}>" for k, v in args)
    body = (
        '<?xml version="1.0"?>\r\n'
        f'<s:Envelope xmlns:s="{SOAP_ENV}" s:encodingStyle="{SOAP_ENC}">'
        f'<s:Body><u:{action} xmlns:u="{service_type}">{params}</u:{action}></s:Body>'
        "</s:Envelope>\r\n"
    ).encode()
    headers = [
        ("Content-Type", 'text/xml; charset="utf-8"'),
        ("SOAPAction", f'"{service_type}#{action}"'),
    ]
    return url, encode_http_request("POST", url, headers, body)


def add_port_mapping(
    service: IgdService,
    *,
    external_port: int,
    internal_port: int,
    internal_client: str,
    lease: int,
    description: str = "lazycat",
) -> tuple[Url, bytes]:
    args: list[tuple[str, str | int]] = [
        ("NewRemoteHost", ""),
        ("NewExternalPort", external_port),
        ("NewProtocol", "UDP"),
        ("NewInternalPort", internal_port),
        ("NewInternalClient", internal_client),
        ("NewEnabled", 1),
        ("NewPortMappingDescription", description),
        ("NewLeaseDuration", lease),
    ]
    return encode_soap_request(service.control_url, service.service_type, "AddPortMapping", args)


def delete_port_mapping(service: IgdService, *, external_port: int) -> tuple[Url, bytes]:
    args: list[tuple[str, str | int]] = [
        ("NewRemoteHost", ""),
        ("NewExternalPort", external_port),
        ("NewProtocol", "UDP"),
    ]
    return encode_soap_request(service.control_url, service.service_type, "DeletePortMapping", args)


def get_external_ip(service: IgdService) -> tuple[Url, bytes]:
    return encode_soap_request(service.control_url, service.service_type, "GetExternalIPAddress")


def parse_soap_response(response: HttpResponse, action: str) -> dict[str, str]:
    """The output arguments of ``<action>Response``; a SOAP fault raises :class:`UpnpFault`."""
    body = response.body
    if response.status != 200:
        fault = _soap_fault(body) if body.strip() else None
        raise fault or UpnpFault(None, f"HTTP {response.status} {response.reason}".strip())
    root = _parse_xml(body)
    for elem in root.iter():
        name = _local(elem.tag)
        if name == "Fault":
            raise _soap_fault(body) or UpnpFault(None, "SOAP fault")
        if name == f"{action}Response":
            return {_local(c.tag): (c.text or "").strip() for c in elem}
    raise PortMapError(f"no {action}Response in the SOAP answer")


def _soap_fault(body: bytes) -> UpnpFault | None:
    try:
        root = _parse_xml(body)
    except PortMapError:
        return None
    for elem in root.iter():
        if _local(elem.tag) == "UPnPError":
            code_text = _child_text(elem, "errorCode")
            code = (
                int(code_text)
                if code_text.isascii() and code_text.isdigit() and len(code_text) < 6
                else None
            )
            return UpnpFault(code, _child_text(elem, "errorDescription")[:200] or "UPnPError")
    for elem in root.iter():
        if _local(elem.tag) == "Fault":
            return UpnpFault(None, _child_text(elem, "faultstring")[:200] or "SOAP fault")
    return None


# --- the state machine --------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpRequest:
    """An HTTP exchange for the adapter to run: connect to ``host:port``, write ``data``, read the
    response (``parse_http_response(..., eof=False)`` says when it is complete), and hand the raw
    bytes to :meth:`PortMapper.http_response`, or call :meth:`PortMapper.http_failed`."""

    request_id: int
    host: str
    port: int
    data: bytes
    deadline: float


@dataclass(frozen=True)
class Mapping:
    method: Method
    external_ip: str
    external_port: int
    lifetime: int  # seconds granted; 0 = a permanent UPnP lease
    acquired_at: float

    @property
    def behind_another_nat(self) -> bool:
        return behind_another_nat(self.external_ip)


@dataclass(frozen=True)
class MappingAcquired:
    """A mapping exists: advertise ``external_ip:external_port`` as a PORTMAPPED candidate.
    Emitted again if a renewal comes back with another address or port."""

    protocol: Method
    external_ip: str
    external_port: int
    lifetime: int

    @property
    def behind_another_nat(self) -> bool:
        return behind_another_nat(self.external_ip)


@dataclass(frozen=True)
class MappingRenewed:
    protocol: Method
    lifetime: int


@dataclass(frozen=True)
class MappingLost:
    """The mapping is gone (expired, refused on renewal, router restarted, or deleted on close).
    Withdraw the candidate. Unless closing, the mapper starts over at once."""

    protocol: Method
    reason: str


class Outcome(enum.Enum):
    NO_ANSWER = "no answer"
    UNREACHABLE = "port unreachable"
    REFUSED = "refused"
    ERROR = "error"


@dataclass(frozen=True)
class Attempt:
    method: Method
    outcome: Outcome
    detail: str  # human words, e.g. "the router did not answer PCP"


@dataclass(frozen=True)
class MappingFailed:
    """Every method failed; the mapper retries after ``retry_in`` seconds."""

    attempts: tuple[Attempt, ...]
    internal_port: int
    local_ip: str
    retry_in: float

    @property
    def reasons(self) -> dict[str, str]:
        return {str(a.method): a.detail for a in self.attempts}

    @property
    def summary(self) -> str:
        """e.g. "no port mapping: the router answered neither PCP nor NAT-PMP, and no UPnP
        gateway replied"."""
        by = {a.method: a for a in self.attempts}
        pcp, pmp = by.get(Method.PCP), by.get(Method.NATPMP)
        parts: list[str] = []
        silent = (Outcome.NO_ANSWER, Outcome.UNREACHABLE)
        if pcp and pmp and pcp.outcome in silent and pmp.outcome in silent:
            parts.append("the router answered neither PCP nor NAT-PMP")
        else:
            parts += [a.detail for a in (pcp, pmp) if a]
        if Method.UPNP in by:
            parts.append(by[Method.UPNP].detail)
        if not parts:
            return "no port mapping"
        text = ", and ".join([", ".join(parts[:-1]), parts[-1]]) if len(parts) > 1 else parts[0]
        return f"no port mapping: {text}"

    @property
    def advice(self) -> str:
        return (
            "turn on UPnP or NAT-PMP/PCP in the router's settings, or forward UDP port "
            f"{self.internal_port} to {self.local_ip} by hand"
        )


PortMapEvent = MappingAcquired | MappingRenewed | MappingLost | MappingFailed


class Phase(enum.Enum):
    IDLE = "idle"
    PCP = "pcp"
    NATPMP_ADDRESS = "nat-pmp address"
    NATPMP_MAP = "nat-pmp map"
    SSDP = "ssdp"
    DESCRIBE = "describe"
    UPNP_EXTERNAL_IP = "upnp external ip"
    UPNP_ADD = "upnp add"
    MAPPED = "mapped"
    BACKOFF = "backoff"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass
class _Upnp:
    location: str = ""
    services: list[IgdService] = field(default_factory=list)
    service_index: int = 0
    external_ip: str = ""
    external_port: int = 0
    lease: int = 0
    conflicts: int = 0
    lease_fallback: bool = False


class PortMapper:
    """One UDP port mapping on the default gateway, kept alive until :meth:`close`.

    Feed it :meth:`receive_datagram` (from the gateway's port 5351 and SSDP answers),
    :meth:`http_response` / :meth:`http_failed`, :meth:`port_unreachable` (ICMP from port 5351)
    and :meth:`handle_timer` at :meth:`next_timer`; drain :meth:`datagrams_to_send`,
    :meth:`http_requests_to_send` and :meth:`events`. Time is ``now`` in seconds, monotonic.
    """

    def __init__(
        self,
        gateway: str,
        local_ip: str,
        internal_port: int,
        *,
        lifetime: int = DEFAULT_LIFETIME,
        pcp_port: int = PCP_PORT,
        ssdp_addrs: Sequence[Addr] | None = None,
        description_url: str | None = None,
        methods: Sequence[Method] = (Method.PCP, Method.NATPMP, Method.UPNP),
        pcp_timeouts: Sequence[float] = PCP_TIMEOUTS,
        natpmp_timeouts: Sequence[float] = NATPMP_TIMEOUTS,
        ssdp_timeout: float = SSDP_TIMEOUT,
        http_timeout: float = HTTP_TIMEOUT,
        retry_backoff: Sequence[float] = RETRY_BACKOFF,
        description: str = "lazycat",
        nonce: bytes | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``ssdp_addrs`` defaults to the gateway's port 1900 and the SSDP multicast group; the
        adapter decides whether multicast is allowed. ``description_url`` skips SSDP."""
        self.gateway = str(ip_address(gateway))
        self.local_ip = str(ip_address(local_ip))
        if not 0 < internal_port < 65536:
            raise ValueError(f"internal port {internal_port} out of range")
        self.internal_port = internal_port
        self.lifetime = lifetime
        self.pcp_addr: Addr = (self.gateway, pcp_port)
        self.ssdp_addrs: tuple[Addr, ...] = tuple(
            ssdp_addrs if ssdp_addrs is not None else ((self.gateway, 1900), SSDP_MULTICAST)
        )
        self.description_url = description_url
        self.methods = tuple(methods)
        self.pcp_timeouts = tuple(pcp_timeouts)
        self.natpmp_timeouts = tuple(natpmp_timeouts)
        self.ssdp_timeout = ssdp_timeout
        self.http_timeout = http_timeout
        self.retry_backoff = tuple(retry_backoff)
        self.description = description
        self.nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_LEN)
        self._rng = rng or random.SystemRandom()

        self.phase = Phase.IDLE
        self.mapping: Mapping | None = None
        self._method: Method | None = None
        self._renewing = False
        self._attempts: list[Attempt] = []
        self._failures = 0
        self._deadline: float | None = None
        self._try = 0  # retransmission number in the current phase
        self._resends = 0  # SSDP
        self._renew_at: float | None = None
        self._expires_at: float | None = None
        self._epoch: tuple[int, float] | None = None
        self._natpmp_ip = ""
        self._upnp = _Upnp()
        self._http_id = 0
        self._http_pending: int | None = None
        self._ssdp_notes: list[str] = []
        self._out_datagrams: list[tuple[bytes, Addr]] = []
        self._out_http: list[HttpRequest] = []
        self._events: list[PortMapEvent] = []

    # --- outputs ---------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        out, self._out_datagrams = self._out_datagrams, []
        return out

    def http_requests_to_send(self) -> list[HttpRequest]:
        out, self._out_http = self._out_http, []
        return out

    def events(self) -> list[PortMapEvent]:
        out, self._events = self._events, []
        return out

    def next_timer(self) -> float | None:
        if self.phase is Phase.MAPPED:
            return self._renew_at
        return self._deadline

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    def candidate(self) -> Addr | None:
        """The address to advertise as a PORTMAPPED candidate, or None (no mapping, or the
        router is itself behind another NAT so the mapping reaches nobody outside)."""
        m = self.mapping
        if m is None or m.behind_another_nat:
            return None
        return (m.external_ip, m.external_port)

    # --- inputs ----------------------------------------------------------------------------

    def start(self, now: float) -> None:
        if self.phase is not Phase.IDLE:
            return
        self._start_over(now)

    def refresh(self, now: float) -> None:
        """Renew now (say, after a network change), or retry at once if waiting after a failure."""
        if self.phase is Phase.MAPPED:
            self._begin_renewal(now)
        elif self.phase is Phase.BACKOFF:
            self._start_over(now)

    def close(self, now: float) -> None:
        """Delete the mapping (or the one being requested) and wind down. The mapper is
        :attr:`closed` when the router confirmed, or after :data:`CLOSE_TIMEOUT`."""
        if self.phase in (Phase.CLOSING, Phase.CLOSED):
            return
        method, pending = self._method, self.phase
        mapped = self.mapping is not None
        self._deadline = now + CLOSE_TIMEOUT
        self._http_pending = None
        self.phase = Phase.CLOSING
        if method is Method.PCP and (mapped or pending is Phase.PCP):
            m = self.mapping
            any_ip = "0.0.0.0"  # noqa: S104 - "no preference", RFC 6887 §11.1
            self._send_pcp(0, m.external_port if m else 0, m.external_ip if m else any_ip)
        elif method is Method.NATPMP and (mapped or pending is Phase.NATPMP_MAP):
            self._out_datagrams.append(
                (
                    encode_natpmp_map(
                        internal_port=self.internal_port, external_port=0, lifetime=0
                    ),
                    self.pcp_addr,
                )
            )
        elif (
            method is Method.UPNP and (mapped or pending is Phase.UPNP_ADD) and self._upnp.services
        ):
            service = self._upnp.services[self._upnp.service_index]
            self._http(now, *delete_port_mapping(service, external_port=self._upnp.external_port))
        else:
            self._finish_close("closed", confirmed=True)
            return

    def handle_timer(self, now: float) -> None:
        due = self.next_timer()
        if due is None or now < due:
            return
        phase = self.phase
        if phase is Phase.PCP:
            self._retransmit(
                now, self.pcp_timeouts, self._send_pcp_map, "the router did not answer PCP"
            )
        elif phase in (Phase.NATPMP_ADDRESS, Phase.NATPMP_MAP):
            self._retransmit(
                now, self.natpmp_timeouts, self._send_natpmp, "the router did not answer NAT-PMP"
            )
        elif phase is Phase.SSDP:
            if self._resends == 0 and self.ssdp_timeout > SSDP_RESEND:
                self._resends = 1
                self._send_ssdp()
                self._deadline = now + self.ssdp_timeout - SSDP_RESEND
            else:
                note = "; ".join(self._ssdp_notes)
                detail = f"no UPnP gateway replied ({note})" if note else "no UPnP gateway replied"
                self._fail(now, Outcome.NO_ANSWER, detail)
        elif phase in (Phase.DESCRIBE, Phase.UPNP_EXTERNAL_IP, Phase.UPNP_ADD):
            self._http_pending = None
            detail = "the UPnP gateway did not answer over HTTP in time"
            self._upnp_http_failed(now, detail, Outcome.NO_ANSWER)
        elif phase is Phase.MAPPED:
            self._begin_renewal(now)
        elif phase is Phase.BACKOFF:
            self._start_over(now)
        elif phase is Phase.CLOSING:
            self._finish_close(
                "the router did not confirm the delete; the mapping ends with its lifetime",
                confirmed=False,
            )

    def port_unreachable(self, now: float) -> None:
        """ICMP port unreachable from the gateway's port 5351: neither PCP nor NAT-PMP runs."""
        if self.phase in (Phase.PCP, Phase.NATPMP_ADDRESS, Phase.NATPMP_MAP):
            detail = "nothing answers on the router's UDP port 5351 (ICMP port unreachable)"
            if self._renewing:
                self._renewal_failed(now, detail, refused=False)
                return
            skipped = [m for m in self.methods if m in (Method.PCP, Method.NATPMP)]
            for method in skipped:
                if all(a.method is not method for a in self._attempts):
                    self._attempts.append(Attempt(method, Outcome.UNREACHABLE, detail))
            self._method = skipped[-1]  # so _next_method goes on past both
            self._next_method(now)

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        """A datagram from the gateway's port 5351, or an SSDP answer. Anything malformed or
        unexpected is dropped."""
        if addr != self.pcp_addr or not data:
            if self.phase is Phase.SSDP:
                self._on_ssdp(data, addr, now)
            return
        # From the PCP/NAT-PMP port: the first byte is the version (RFC 6887 §9).
        if data[0] == PCP_VERSION:
            try:
                pcp = parse_pcp_response(data)
            except PortMapError:
                return
            self._on_pcp(pcp, now)
        elif data[0] == NATPMP_VERSION:
            try:
                pmp = parse_natpmp_response(data)
            except PortMapError:
                return
            self._on_natpmp(pmp, now)

    def http_response(self, request_id: int, data: bytes, now: float) -> None:
        if request_id != self._http_pending:
            return  # late, or superseded
        self._http_pending = None
        try:
            response = parse_http_response(data, eof=True)
        except PortMapError as exc:
            self._upnp_http_failed(now, f"the UPnP gateway sent a bad HTTP response ({exc})")
            return
        assert response is not None  # eof=True never returns None
        self._on_http(response, now)

    def http_failed(self, request_id: int, reason: str, now: float) -> None:
        if request_id != self._http_pending:
            return
        self._http_pending = None
        # Like silence: during a renewal it is retried, not taken as a refusal.
        detail = f"could not reach the UPnP gateway over HTTP ({reason})"
        self._upnp_http_failed(now, detail, Outcome.NO_ANSWER)

    # --- flow ------------------------------------------------------------------------------

    def _start_over(self, now: float) -> None:
        self._attempts = []
        self._renewing = False
        self.mapping = None
        self._epoch = None
        self._method = None
        self._next_method(now)

    def _next_method(self, now: float) -> None:
        order = list(self.methods)
        index = order.index(self._method) + 1 if self._method in order else 0
        if index >= len(order):
            self._all_failed(now)
            return
        self._begin(order[index], now)

    def _begin(self, method: Method, now: float) -> None:
        self._method = method
        self._try = 0
        if method is Method.PCP:
            self.phase = Phase.PCP
            self._send_pcp_map()
            self._deadline = now + self.pcp_timeouts[0]
        elif method is Method.NATPMP:
            self.phase = Phase.NATPMP_ADDRESS
            self._send_natpmp()
            self._deadline = now + self.natpmp_timeouts[0]
        elif self._renewing and self._upnp.services:
            self._upnp_external_ip(now)
        elif self.description_url is not None:
            self._upnp = _Upnp(location=self.description_url)
            self._describe(now)
        else:
            self._upnp = _Upnp()
            self._ssdp_notes = []
            self._resends = 0
            self.phase = Phase.SSDP
            self._send_ssdp()
            self._deadline = now + min(SSDP_RESEND, self.ssdp_timeout)

    def _retransmit(
        self, now: float, timeouts: tuple[float, ...], send: Callable[[], None], detail: str
    ) -> None:
        self._try += 1
        if self._try < len(timeouts):
            send()
            self._deadline = now + timeouts[self._try]
        else:
            self._fail(now, Outcome.NO_ANSWER, detail)

    def _fail(self, now: float, outcome: Outcome, detail: str) -> None:
        """The current method failed."""
        assert self._method is not None
        if self._renewing:
            self._renewal_failed(now, detail, refused=outcome in (Outcome.REFUSED, Outcome.ERROR))
            return
        self._attempts.append(Attempt(self._method, outcome, detail))
        self._next_method(now)

    def _all_failed(self, now: float) -> None:
        delay = self.retry_backoff[min(self._failures, len(self.retry_backoff) - 1)]
        self._failures += 1
        self.phase = Phase.BACKOFF
        self._deadline = now + delay
        self._events.append(
            MappingFailed(tuple(self._attempts), self.internal_port, self.local_ip, delay)
        )

    def _acquired(self, now: float, external_ip: str, external_port: int, lifetime: int) -> None:
        assert self._method is not None
        old = self.mapping
        self.mapping = Mapping(self._method, external_ip, external_port, lifetime, now)
        self._failures = 0
        self.phase = Phase.MAPPED
        self._deadline = None
        # A permanent UPnP lease (0) is refreshed as if it lasted 2 * UPNP_PERMANENT_REFRESH.
        refresh = lifetime if lifetime > 0 else 2 * UPNP_PERMANENT_REFRESH
        # RFC 6887 §11.2.1: renew at half the lifetime.
        self._renew_at = now + refresh / 2
        self._expires_at = now + refresh
        same = old is not None and (old.external_ip, old.external_port) == (
            external_ip,
            external_port,
        )
        if self._renewing and same:
            self._events.append(MappingRenewed(self._method, lifetime))
        else:
            self._events.append(MappingAcquired(self._method, external_ip, external_port, lifetime))
        self._renewing = False

    def _begin_renewal(self, now: float) -> None:
        assert self.mapping is not None
        if self._expires_at is not None and now >= self._expires_at:
            self._lose(now, "the mapping expired: the router stopped answering renewals")
            return
        self._renewing = True
        self._begin(self.mapping.method, now)

    def _renewal_failed(self, now: float, detail: str, *, refused: bool) -> None:
        """No answer: retry at half the remaining time until it expires. A refusal: start over."""
        expires = self._expires_at
        if refused or expires is None or self.mapping is None:
            self._lose(now, f"renewal refused: {detail}")
            return
        retry = now + (expires - now) / 2
        if expires - now <= MIN_RENEW:
            retry = expires
        self.phase = Phase.MAPPED
        self._deadline = None
        self._renew_at = max(retry, now + 0.001)

    def _lose(self, now: float, reason: str) -> None:
        method = self.mapping.method if self.mapping else self._method
        assert method is not None
        self._events.append(MappingLost(method, reason))
        self._start_over(now)

    def _finish_close(self, reason: str, *, confirmed: bool) -> None:
        method = self.mapping.method if self.mapping else None
        self.phase = Phase.CLOSED
        self._deadline = None
        self._renew_at = None
        self._http_pending = None
        if method is not None:
            text = "deleted on shutdown" if confirmed else reason
            self._events.append(MappingLost(method, text))
        self.mapping = None

    # --- PCP -------------------------------------------------------------------------------

    def _send_pcp(self, lifetime: int, external_port: int, external_ip: str) -> None:
        request = encode_pcp_map(
            client_ip=self.local_ip,
            nonce=self.nonce,
            internal_port=self.internal_port,
            lifetime=lifetime,
            external_port=external_port,
            external_ip=external_ip,
        )
        self._out_datagrams.append((request, self.pcp_addr))

    def _send_pcp_map(self) -> None:
        m = self.mapping
        # Renewals suggest what we hold (RFC 6887 §11.2.1); a first request suggests the
        # internal port, which keeps the mapping easy to read in the router's table.
        if m is not None:
            self._send_pcp(self.lifetime, m.external_port, m.external_ip)
        else:
            self._send_pcp(self.lifetime, self.internal_port, "0.0.0.0")  # noqa: S104

    def _on_pcp(self, r: PcpResponse, now: float) -> None:
        if r.opcode == PCP_OPCODE_ANNOUNCE:
            # RFC 6887 §14.1.3: the server restarted; renew at once if its epoch says so.
            ours = self.phase is Phase.MAPPED and self.mapping and self.mapping.method is Method.PCP
            if ours and (self._epoch is None or not epoch_valid(*self._epoch, r.epoch, now)):
                self._begin_renewal(now)
            return
        if (
            r.nonce != self.nonce
            or r.internal_port != self.internal_port
            or r.protocol != IPPROTO_UDP
        ):
            return  # not ours (RFC 6887 §11.3)
        if self.phase is Phase.CLOSING:
            self._finish_close("deleted", confirmed=r.result == 0)
            return
        if self.phase is not Phase.PCP:
            return
        if r.result != 0:
            self._fail(now, Outcome.REFUSED, f"PCP: {r.meaning}")
            return
        if r.lifetime == 0 or r.external_port == 0:
            self._fail(now, Outcome.ERROR, "PCP: the router answered without a mapping")
            return
        self._note_epoch(r.epoch, now)
        self._acquired(now, r.external_ip, r.external_port, r.lifetime)

    def _note_epoch(self, epoch: int, now: float) -> None:
        # If the epoch jumped (RFC 6887 §8.5) the router lost its state, but the response we
        # just got re-created our one mapping, which is all the RFC asks of us.
        self._epoch = (epoch, now)

    # --- NAT-PMP ---------------------------------------------------------------------------

    def _send_natpmp(self) -> None:
        if self.phase is Phase.NATPMP_ADDRESS:
            self._out_datagrams.append((encode_natpmp_address_request(), self.pcp_addr))
        else:
            m = self.mapping
            suggested = m.external_port if m else self.internal_port
            request = encode_natpmp_map(
                internal_port=self.internal_port, external_port=suggested, lifetime=self.lifetime
            )
            self._out_datagrams.append((request, self.pcp_addr))

    def _on_natpmp(self, r: NatPmpResponse, now: float) -> None:
        if self.phase is Phase.PCP and r.result == 1:
            # RFC 6887 §9: a NAT-PMP-only server answers a PCP request "unsupported version".
            self._fail(now, Outcome.REFUSED, "the router speaks NAT-PMP, not PCP")
            return
        if self.phase is Phase.CLOSING and r.opcode == NATPMP_OP_MAP_UDP:
            if r.result or r.internal_port == self.internal_port:
                self._finish_close("deleted", confirmed=r.result == 0)
            return
        if self.phase is Phase.MAPPED and r.opcode == NATPMP_OP_ADDRESS and r.result == 0:
            # RFC 6886 §3.2.1: an unsolicited announcement of a new external address.
            m = self.mapping
            if m and m.method is Method.NATPMP and r.external_ip != m.external_ip:
                self._begin_renewal(now)
            return
        if self.phase is Phase.NATPMP_ADDRESS and r.opcode == NATPMP_OP_ADDRESS:
            if r.result != 0:
                self._fail(now, Outcome.REFUSED, f"NAT-PMP: {r.meaning}")
                return
            if r.external_ip == "0.0.0.0":  # noqa: S104 - RFC 6886 §3.2: not connected yet
                self._fail(now, Outcome.ERROR, "NAT-PMP: the router has no internet address yet")
                return
            self._natpmp_ip = r.external_ip
            self._note_epoch(r.epoch, now)
            self.phase = Phase.NATPMP_MAP
            self._try = 0
            self._send_natpmp()
            self._deadline = now + self.natpmp_timeouts[0]
        elif self.phase is Phase.NATPMP_MAP and r.opcode == NATPMP_OP_MAP_UDP:
            if r.result != 0:
                self._fail(now, Outcome.REFUSED, f"NAT-PMP: {r.meaning}")
                return
            if r.internal_port != self.internal_port:
                return
            if r.lifetime == 0 or r.external_port == 0:
                self._fail(now, Outcome.ERROR, "NAT-PMP: the router answered without a mapping")
                return
            self._note_epoch(r.epoch, now)
            self._acquired(now, self._natpmp_ip, r.external_port, r.lifetime)

    # --- UPnP ------------------------------------------------------------------------------

    def _send_ssdp(self) -> None:
        for target in SEARCH_TARGETS:
            for addr in self.ssdp_addrs:
                self._out_datagrams.append((encode_ssdp_search(target), addr))

    def _on_ssdp(self, data: bytes, addr: Addr, now: float) -> None:
        try:
            answer = parse_ssdp_response(data)
            location = parse_url(answer.location)
        except PortMapError:
            return
        if addr[0] != self.gateway:
            note = f"{addr[0]} answered but is not the default gateway"
            if note not in self._ssdp_notes and len(self._ssdp_notes) < 4:
                self._ssdp_notes.append(note)
            return
        if location.host != self.gateway:
            # A description elsewhere than the answering gateway: not followed.
            note = f"the gateway's UPnP answer points at {location.host}"
            if note not in self._ssdp_notes and len(self._ssdp_notes) < 4:
                self._ssdp_notes.append(note)
            return
        self._upnp = _Upnp(location=answer.location)
        self._describe(now)

    def _describe(self, now: float) -> None:
        self.phase = Phase.DESCRIBE
        try:
            url = parse_url(self._upnp.location)
        except PortMapError as exc:
            self._fail(now, Outcome.ERROR, f"bad UPnP description URL ({exc})")
            return
        self._http(now, url, encode_http_request("GET", url))

    def _http(self, now: float, url: Url, data: bytes) -> None:
        self._http_id += 1
        self._http_pending = self._http_id
        deadline = now + self.http_timeout
        self._out_http.append(HttpRequest(self._http_id, url.host, url.port, data, deadline))
        if self.phase is not Phase.CLOSING:
            self._deadline = deadline

    def _upnp_http_failed(self, now: float, detail: str, outcome: Outcome = Outcome.ERROR) -> None:
        if self.phase is Phase.CLOSING:
            self._finish_close(detail, confirmed=False)
        elif self.phase is Phase.UPNP_EXTERNAL_IP and self._next_service(now):
            return
        elif self.phase in (Phase.DESCRIBE, Phase.UPNP_EXTERNAL_IP, Phase.UPNP_ADD):
            self._fail(now, outcome, detail)

    def _next_service(self, now: float) -> bool:
        if self._renewing or self._upnp.service_index + 1 >= len(self._upnp.services):
            return False
        self._upnp.service_index += 1
        self._upnp_external_ip(now)
        return True

    def _upnp_external_ip(self, now: float) -> None:
        self.phase = Phase.UPNP_EXTERNAL_IP
        self._http(now, *get_external_ip(self._upnp.services[self._upnp.service_index]))

    def _upnp_add(self, now: float) -> None:
        self.phase = Phase.UPNP_ADD
        u = self._upnp
        request = add_port_mapping(
            u.services[u.service_index],
            external_port=u.external_port,
            internal_port=self.internal_port,
            internal_client=self.local_ip,
            lease=u.lease,
            description=self.description,
        )
        self._http(now, *request)

    def _on_http(self, response: HttpResponse, now: float) -> None:
        u = self._upnp
        if self.phase is Phase.CLOSING:
            try:
                parse_soap_response(response, "DeletePortMapping")
            except PortMapError as exc:
                self._finish_close(
                    f"the router refused to delete the mapping ({exc})", confirmed=False
                )
                return
            self._finish_close("deleted", confirmed=True)
        elif self.phase is Phase.DESCRIBE:
            if response.status != 200:
                self._fail(
                    now, Outcome.ERROR, f"the UPnP description answered HTTP {response.status}"
                )
                return
            try:
                u.services = parse_device_description(response.body, u.location)
            except PortMapError as exc:
                self._fail(
                    now,
                    Outcome.ERROR,
                    f"the UPnP device at {self.gateway} is no internet gateway ({exc})",
                )
                return
            u.service_index = 0
            self._upnp_external_ip(now)
        elif self.phase is Phase.UPNP_EXTERNAL_IP:
            try:
                out = parse_soap_response(response, "GetExternalIPAddress")
                external = str(IPv4Address(out.get("NewExternalIPAddress", "")))
            except (PortMapError, ValueError) as exc:
                if not self._next_service(now):
                    self._fail(now, Outcome.ERROR, f"UPnP: no external address ({exc})")
                return
            if external == "0.0.0.0":  # noqa: S104
                if not self._next_service(now):
                    self._fail(now, Outcome.ERROR, "UPnP: the router has no internet address yet")
                return
            u.external_ip = external
            if not self._renewing:
                u.external_port = self.internal_port
                u.lease = self.lifetime
                u.conflicts = 0
            self._upnp_add(now)
        elif self.phase is Phase.UPNP_ADD:
            try:
                parse_soap_response(response, "AddPortMapping")
            except UpnpFault as fault:
                self._on_add_fault(fault, now)
                return
            except PortMapError as exc:
                self._fail(now, Outcome.ERROR, f"UPnP: bad answer to AddPortMapping ({exc})")
                return
            self._acquired(now, u.external_ip, u.external_port, u.lease)

    def _on_add_fault(self, fault: UpnpFault, now: float) -> None:
        u = self._upnp
        if fault.code == 718 and not self._renewing and u.conflicts + 1 < MAX_CONFLICTS:
            # ConflictInMappingEntry: someone else holds that external port; pick another.
            u.conflicts += 1
            u.external_port = self._rng.randrange(1024, 65536)
            self._upnp_add(now)
        elif fault.code == 725 and not u.lease_fallback:
            # OnlyPermanentLeasesSupported (IGD:1 routers): ask for a permanent one and
            # refresh it ourselves; close() deletes it.
            u.lease_fallback = True
            u.lease = 0
            self._upnp_add(now)
        else:
            self._fail(now, Outcome.REFUSED, f"the UPnP gateway refused the mapping: {fault}")
