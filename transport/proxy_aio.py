"""The HTTP proxy of ``lazycat-client up --mode proxy``: ``127.0.0.1:31085`` for ``*.heiyu.space``.

Two kinds of request (RFC 9110 sec. 9.3.6, RFC 9112 sec. 3.2)::

    CONNECT web.mybox.heiyu.space:443 HTTP/1.1     authority-form: a TCP tunnel. We answer
    Host: web.mybox.heiyu.space:443                "200 Connection established" and then copy
                                                   bytes both ways, untouched, until both close.

    GET http://web.mybox.heiyu.space/a?b HTTP/1.1  absolute-form: plain HTTP. We send upstream
    Host: …                                        "GET /a?b HTTP/1.1" (origin-form), Host from
    Proxy-Connection: keep-alive                   the URL (sec. 3.2.2: a proxy replaces it),
                                                   without hop-by-hop fields, with
                                                   "Connection: close" and "Via", then the body
                                                   (Content-Length or chunked framing), then copy
                                                   the response back and close.

What each target gets (``Names.resolve``; the text of each refusal says what to do)::

    a name in the box's records (the DNS responder's table, kept current)   connect, relay
    an overlay IPv6 literal ([fc03:1136:38..::]) outside the client range   connect, relay
    any other name under heiyu.space (the box did not give us it)           404 Not Found
    a host outside heiyu.space, an IPv4 literal, another IPv6 literal       403 Forbidden
    connection refused / unreachable (no service, or no access: RST)        502 Bad Gateway
    no answer within ``connect_timeout`` (tunnel down, packets dropped)     504 Gateway Timeout

Requests we cannot read: malformed → 400; head over ``MAX_HEAD`` bytes → 431 (RFC 6585 sec. 5);
no complete head within ``head_timeout`` → 408; HTTP/2+ on the wire → 505; a transfer coding
other than chunked → 501; both Content-Length and Transfer-Encoding → 400 (RFC 9112 sec. 6.3:
a proxy must not forward such a message as it is: request smuggling). A request in origin-form
(someone opened the proxy as a web page) gets a 400 saying how to use it.

Only the first request on a client connection is served; the proxy closes it after the
response (the service closes too: we asked it to). Each request may go to another service,
and one upstream per client connection keeps the relay a plain byte copy; clients open a new
connection, as they do for any server that closes after a response (RFC 9112 sec. 9.6).

:func:`parse_request` and :func:`upstream_head` are pure (bytes in, values out; they raise only
:class:`ProxyError`); :class:`Proxy` is the asyncio server around them. The upstream TCP is the
kernel's: the ``dialer`` gives a connected socket — in the client, one made inside the private
network namespace whose TUN carries the overlay (``transport/netns.py``); never a TCP of ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import Any

from transport.addressing import CLIENT_LOCAL, OVERLAY
from transport.names import DOMAIN, InvalidName, split_fqdn

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_LISTEN",
    "DEFAULT_PORT",
    "HEAD_TIMEOUT",
    "MAX_HEAD",
    "Dialer",
    "Names",
    "Proxy",
    "ProxyError",
    "Request",
    "error_response",
    "parse_listen",
    "parse_request",
    "upstream_head",
]

log = logging.getLogger("lazycat.proxy")

DEFAULT_PORT = 31085
DEFAULT_LISTEN = ("127.0.0.1", DEFAULT_PORT)
MAX_HEAD = 16 * 1024  # request line + fields; browsers send 1-8 KiB
MAX_FIELDS = 100
MAX_CHUNK_LINE = 1024  # a chunk-size line with extensions (RFC 9112 sec. 7.1.1)
HEAD_TIMEOUT = 10.0  # seconds for the whole head (slowloris)
CONNECT_TIMEOUT = 10.0  # seconds for the upstream TCP handshake through the tunnel
MAX_CLIENTS = 512  # connections at once; more get 503
COPY_SIZE = 64 * 1024
LINGER = 1.0  # seconds to read what a refused client still sends before closing

Dialer = Callable[[IPv6Address, int], Awaitable[socket.socket]]

REASONS = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

ABOUT = (
    "This is lazycat-client's proxy. It reaches only the services of the lazycat box this "
    "device is paired with, by their names under heiyu.space ({example}). Send every other "
    "host directly, not through this proxy: for example a PAC file that returns "
    '"PROXY {listen}" for *.heiyu.space and "DIRECT" for everything else (see the proxy '
    "mode section of docs/client.md)."
)


class ProxyError(Exception):
    """A request we answer with ``status`` and a short text saying what is wrong and what to do."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"{status} {text}")
        self.status = status
        self.text = text


# --- the request head: a pure parser ---------------------------------------------------------

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 sec. 5.6.2
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")  # no CTLs (RFC 9110 sec. 5.5)
_TARGET = re.compile(rb"[\x21-\x7e]+")  # visible ASCII, no spaces
_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9.\-]*[a-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")

# RFC 9110 sec. 7.6.1: Connection and the fields it names are for one hop only; the Proxy-*
# fields are for us; Keep-Alive and Upgrade make no sense on a connection we close.
_HOP_BY_HOP = {
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "upgrade",
}


@dataclass(frozen=True)
class Request:
    """One request head. ``host`` is lower-case (an IPv6 literal without brackets); ``path``
    is the origin-form target for plain HTTP and "" for CONNECT."""

    method: str
    host: str
    port: int
    path: str
    version: str
    fields: tuple[tuple[str, str], ...]

    @property
    def is_connect(self) -> bool:
        return self.method == "CONNECT"

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 80 and not self.is_connect else f"{host}:{self.port}"

    def field(self, name: str) -> list[str]:
        """Every value of field ``name`` (case-insensitive), in order."""
        name = name.lower()
        return [value for key, value in self.fields if key.lower() == name]

    def body_framing(self) -> tuple[str, int]:
        """How the request body is delimited (RFC 9112 sec. 6.3): ("length", n), ("chunked",
        0) or ("none", 0). Raises ProxyError for framings we will not forward."""
        codings = [c.strip().lower() for v in self.field("transfer-encoding") for c in v.split(",")]
        lengths = {v.strip() for value in self.field("content-length") for v in value.split(",")}
        if codings and lengths:
            raise ProxyError(400, "a request with both Transfer-Encoding and Content-Length")
        if codings:
            if codings != ["chunked"]:
                raise ProxyError(
                    501, f"transfer coding {', '.join(codings)!r}: only chunked is forwarded"
                )
            return "chunked", 0
        if not lengths:
            return "none", 0
        if len(lengths) > 1:
            raise ProxyError(400, "conflicting Content-Length values")
        [text] = lengths
        if not text.isascii() or not text.isdigit() or len(text) > 18:
            raise ProxyError(400, f"Content-Length {text[:40]!r} is not a number")
        length = int(text)
        return ("length", length) if length else ("none", 0)


def _host_port(text: str, default_port: int | None) -> tuple[str, int]:
    """``name``, ``name:port``, ``[v6]``, ``[v6]:port`` → (lower-case host, port)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ProxyError(400, "an unclosed [ in the host")
        literal, rest = text[1:end], text[end + 1 :]
        try:
            host = str(IPv6Address(literal))
        except ValueError:
            raise ProxyError(400, f"[{literal[:60]}] is not an IPv6 address") from None
    else:
        host, sep, port_text = text.partition(":")
        rest = sep + port_text
        host = host.lower()
        host = host[:-1] if host.endswith(".") else host  # the DNS root: web.box.heiyu.space.
        if not host or len(host) > 253 or not _HOST_NAME.fullmatch(host):
            raise ProxyError(400, f"{host[:80]!r} is not a host name")
    if not rest:
        if default_port is None:
            raise ProxyError(400, "CONNECT needs host:port")
        return host, default_port
    if not rest.startswith(":") or not _PORT.fullmatch(rest[1:]):
        raise ProxyError(400, f"{rest[:20]!r} is not a port")
    port = int(rest[1:])
    if not 1 <= port <= 65535:
        raise ProxyError(400, f"port {port} is not in 1-65535")
    return host, port


def parse_request(head: bytes) -> Request:
    """Parse one request head (through the empty line). Raises only ProxyError."""
    if len(head) > MAX_HEAD:
        raise ProxyError(431, f"the request head is over {MAX_HEAD} bytes")
    if not head.endswith(b"\r\n\r\n"):
        raise ProxyError(400, "the request head does not end with an empty line")
    lines = head[:-4].split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        raise ProxyError(400, "a bare CR or LF in the request head (lines end with CRLF)")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise ProxyError(400, "the request line is not 'METHOD target HTTP/1.1'")
    raw_method, raw_target, raw_version = parts
    if not _TOKEN.fullmatch(raw_method):
        raise ProxyError(400, "the method is not a token")
    if not _TARGET.fullmatch(raw_target):
        raise ProxyError(400, "the request target is empty or has characters it may not have")
    version = _VERSION.fullmatch(raw_version)
    if version is None:
        raise ProxyError(400, "the request line does not end with an HTTP version")
    if version.group(1) != b"1":
        raise ProxyError(505, "this proxy speaks HTTP/1.0 and HTTP/1.1")
    fields: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise ProxyError(400, "obsolete line folding in a field (RFC 9112 sec. 5.2)")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise ProxyError(400, "a field line is not 'Name: value'")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.fullmatch(value):
            raise ProxyError(400, f"field {name.decode()[:40]} has a control character")
        fields.append((name.decode("ascii"), value.decode("latin-1")))
        if len(fields) > MAX_FIELDS:
            raise ProxyError(431, f"over {MAX_FIELDS} header fields")
    method, target = raw_method.decode("ascii"), raw_target.decode("ascii")
    if method == "CONNECT":
        host, port = _host_port(target, None)
        path = ""
    else:
        scheme, sep, rest = target.partition("://")
        if not sep:
            raise ProxyError(
                400,
                "this is a proxy, not a web server: ask it for a full URL "
                "(curl --proxy http://127.0.0.1:31085 http://<service>.<box>.heiyu.space/)",
            )
        if scheme.lower() != "http":
            raise ProxyError(400, f"{scheme[:20]}:// URLs go through CONNECT, not {method}")
        # the authority ends at the first "/", "?" or "#" (RFC 3986 sec. 3.2); the fragment
        # is never sent (sec. 3.5); an empty path is "/" (RFC 9112 sec. 3.2.1)
        end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
        authority, path = rest[:end], rest[end:].partition("#")[0]
        if "@" in authority:
            raise ProxyError(400, "user:password@ in the URL is not forwarded")
        host, port = _host_port(authority, 80)
        path = path if path.startswith("/") else "/" + path
    return Request(method, host, port, path, f"HTTP/1.{version.group(2).decode()}", tuple(fields))


def upstream_head(request: Request) -> bytes:
    """The head we send the service for a plain HTTP request (RFC 9110 sec. 7.6, 7.2)."""
    named = {
        token.strip().lower() for value in request.field("connection") for token in value.split(",")
    }
    drop = _HOP_BY_HOP | named | {"host"}
    lines = [f"{request.method} {request.path} {request.version}", f"Host: {request.authority}"]
    lines += [f"{name}: {value}" for name, value in request.fields if name.lower() not in drop]
    lines += ["Connection: close", f"Via: {request.version[5:]} lazycat-client"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def error_response(status: int, text: str) -> bytes:
    """A complete response: status line, a short plain-text body, and we close after it."""
    body = (text.rstrip() + "\n").encode()
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "Proxy-Agent: lazycat-client\r\n\r\n"
    )
    return head.encode() + body


def parse_listen(text: str, *, allow_remote: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` / ``[v6]:PORT`` for ``--proxy-listen``; HOST is an IP address or
    ``localhost``. A non-loopback address is refused unless ``allow_remote``: the proxy has no
    authentication, so anyone who reaches it would use this device's access to the box."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (for example 127.0.0.1:{DEFAULT_PORT})")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (or localhost)") from None
    if not address.is_loopback and not allow_remote:
        raise ValueError(
            f"{host} is not a loopback address: the proxy has no password, so anyone who "
            "reaches it would reach your box's services as this device. Add "
            "--proxy-allow-remote if that is what you want"
        )
    return str(address), int(port_text)


# --- names ------------------------------------------------------------------------------------


class Names:
    """The box's records for the proxy (the same table the DNS responder answers from):
    full names to overlay addresses. :meth:`set_records` replaces it when the box sends new
    ones; :meth:`resolve` applies the table at the top of this module."""

    def __init__(
        self, records: Mapping[str, Iterable[IPv6Address]] | None = None, *, box: str = ""
    ) -> None:
        self.box = box
        self._records: dict[str, list[IPv6Address]] = {}
        self.set_records(records or {})

    def set_records(self, records: Mapping[str, Iterable[IPv6Address]]) -> None:
        self._records = {
            name.lower().rstrip("."): [IPv6Address(a) for a in addresses]
            for name, addresses in records.items()
        }

    def example(self) -> str:
        box = self.box or "<box>"
        return f"{box}.{DOMAIN} and <service>.{box}.{DOMAIN}"

    def resolve(self, host: str) -> list[IPv6Address]:
        """The addresses to try for ``host`` (as :func:`parse_request` leaves it), or
        ProxyError 403 / 404 saying why not."""
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            overlay = literal in OVERLAY and literal not in CLIENT_LOCAL
            if isinstance(literal, IPv6Address) and overlay:
                return [literal]
            raise ProxyError(403, f"{host} is not a lazycat overlay address.")
        try:
            inside = split_fqdn(host) is not None
        except InvalidName:
            inside = True
        if not inside:
            raise ProxyError(403, f"{host} is not a lazycat name.")
        addresses = self._records.get(host)
        if not addresses:
            box = self.box or "the box"
            raise ProxyError(
                404,
                f"{host} is not a name {box} gave this device. Check the spelling, and in the "
                "box's console that the service exists and this device may use it (changes "
                "reach this device within a second).",
            )
        return list(addresses)


# --- the server -------------------------------------------------------------------------------


class Proxy:
    """The proxy server. ``names`` answers which addresses a host has; ``dialer(address,
    port)`` returns a connected non-blocking TCP socket (or raises OSError). ``stats`` counts
    requests by outcome, for ``status`` and the tests."""

    def __init__(
        self,
        names: Names,
        dialer: Dialer,
        *,
        head_timeout: float = HEAD_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.names = names
        self.dialer = dialer
        self.head_timeout = head_timeout
        self.connect_timeout = connect_timeout
        self.max_clients = max_clients
        self.listen = ""
        self.stats = {"connect": 0, "http": 0, "refused": 0, "failed": 0, "active": 0}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, host: str = DEFAULT_LISTEN[0], port: int = DEFAULT_LISTEN[1]) -> str:
        """Listen on ``host:port``; returns the address actually bound (``host:port``)."""
        self._server = await asyncio.start_server(
            self._accept, host, port, limit=MAX_HEAD, reuse_address=True
        )
        bound = self._server.sockets[0].getsockname()
        self.listen = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        return self.listen

    async def close(self) -> None:
        """Stop listening and end every open connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats["active"] += 1
        upstream: asyncio.StreamWriter | None = None
        try:
            if self.stats["active"] > self.max_clients:
                raise ProxyError(503, f"over {self.max_clients} connections at once; try again")
            request = await self._read_request(reader)
            if request is None:
                return
            framing = ("none", 0) if request.is_connect else request.body_framing()
            addresses = self.names.resolve(request.host)
            loop = asyncio.get_running_loop()
            started = loop.time()
            sock = await self._dial(request, addresses)
            up_reader, upstream = await asyncio.open_connection(sock=sock, limit=COPY_SIZE)
            log.info(
                "proxy",
                extra={
                    "method": request.method,
                    "target": request.authority,
                    "connect_ms": round((loop.time() - started) * 1000, 1),
                },
            )
            if request.is_connect:
                self.stats["connect"] += 1
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await _splice(reader, writer, up_reader, upstream)
            else:
                self.stats["http"] += 1
                upstream.write(upstream_head(request))
                await _forward_http(reader, up_reader, upstream, writer, framing)
        except ProxyError as exc:
            self.stats["refused" if exc.status < 500 else "failed"] += 1
            about = ABOUT.format(example=self.names.example(), listen=self.listen)
            text = exc.text + ("\n\n" + about if exc.status in (400, 403, 404) else "")
            with contextlib.suppress(OSError, RuntimeError, asyncio.IncompleteReadError):
                writer.write(error_response(exc.status, f"lazycat-client proxy: {text}"))
                await writer.drain()
                await _linger(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass  # a side went away mid-copy: nothing to tell anyone
        finally:
            self.stats["active"] -= 1
            for side in (upstream, writer):
                if side is not None:
                    side.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> Request | None:
        try:
            async with asyncio.timeout(self.head_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            raise ProxyError(408, f"no complete request within {self.head_timeout:g} s") from None
        except asyncio.LimitOverrunError:
            raise ProxyError(431, f"the request head is over {MAX_HEAD} bytes") from None
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None  # connected and closed: nothing to answer
            raise ProxyError(400, "the connection closed in the middle of the request") from None
        return parse_request(head)

    async def _dial(self, request: Request, addresses: list[IPv6Address]) -> socket.socket:
        """Try each address in turn within ``connect_timeout`` in all."""
        where = f"{request.host} port {request.port}"
        last: OSError | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                for address in addresses:
                    try:
                        return await self.dialer(address, request.port)
                    except OSError as exc:
                        last = exc
        except TimeoutError:
            raise ProxyError(
                504,
                f"no answer from {where} within {self.connect_timeout:g} s. The tunnel to the "
                "box may be down (lazycat-client status), or the box drops this device's "
                "packets to that service.",
            ) from None
        # asyncio's "Connect call failed (…)" hides the errno's words: say them
        reason = os.strerror(last.errno) if last is not None and last.errno else str(last)
        raise ProxyError(
            502,
            f"could not connect to {where} ({', '.join(map(str, addresses))}): {reason}. "
            "Nothing accepts connections on that port, or this device may not use the "
            "service: check its ports and access in the box's console.",
        )


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After an error response: half-close, then read what the client still sends for a moment.
    Closing with unread data makes the kernel send a reset, and the client could lose the
    response it has not read yet (RFC 9112 sec. 9.6)."""
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER):
            for _ in range(64):
                if not await reader.read(COPY_SIZE):
                    break


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close ``writer`` (the other direction may go on)."""
    while data := await reader.read(COPY_SIZE):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()


async def _both(first: Awaitable[None], second: Awaitable[None]) -> None:
    """Run both copies; when one fails (a reset), stop the other."""
    tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _splice(
    client_reader: asyncio.StreamReader,
    client: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    upstream: asyncio.StreamWriter,
) -> None:
    await _both(_copy(client_reader, upstream), _copy(up_reader, client))


async def _forward_http(
    client_reader: asyncio.StreamReader,
    up_reader: asyncio.StreamReader,
    upstream: asyncio.StreamWriter,
    client: asyncio.StreamWriter,
    framing: tuple[str, int],
) -> None:
    """Send the request body by its framing while copying the response back; done when the
    service closes (we asked it to: ``Connection: close``)."""

    async def body() -> None:
        kind, length = framing
        if kind == "length":
            await _copy_exactly(client_reader, upstream, length)
        elif kind == "chunked":
            await _copy_chunked(client_reader, upstream)
        await upstream.drain()

    async def response() -> None:
        while data := await up_reader.read(COPY_SIZE):
            client.write(data)
            await client.drain()

    sender = asyncio.ensure_future(body())
    try:
        await response()
        await client.drain()
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender


async def _copy_exactly(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    while n > 0:
        data = await reader.read(min(n, COPY_SIZE))
        if not data:
            raise asyncio.IncompleteReadError(b"", n)
        writer.write(data)
        await writer.drain()
        n -= len(data)


async def _copy_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Forward a chunked body as it is, following its framing (RFC 9112 sec. 7.1) to know where
    it ends: size lines, data + CRLF, the last chunk, trailer fields, the empty line."""
    while True:
        line = await _line(reader)
        writer.write(line)
        size_text = line.split(b";", 1)[0].strip()
        if not size_text or len(size_text) > 16 or not re.fullmatch(rb"[0-9A-Fa-f]+", size_text):
            raise asyncio.IncompleteReadError(line, None)  # unreadable framing: abort both
        size = int(size_text, 16)
        if size == 0:
            break
        await _copy_exactly(reader, writer, size + 2)
    while (line := await _line(reader)) != b"\r\n":  # trailer section
        writer.write(line)
    writer.write(line)


async def _line(reader: asyncio.StreamReader) -> bytes:
    line = await reader.readuntil(b"\n")
    if len(line) > MAX_CHUNK_LINE:
        raise asyncio.IncompleteReadError(line[:64], None)
    return line
