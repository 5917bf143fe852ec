"""The proxy of ``up --mode proxy``: the pure request parser (examples and hypothesis), the
name policy, and the server on loopback with real upstream servers.

The server tests give the proxy a real dialer that connects to loopback servers (the overlay
addresses of the test records map to their ports): the namespace dialer is
``tests/transport/test_netns.py``'s subject.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from ipaddress import IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.proxy_aio import (
    MAX_HEAD,
    Names,
    Proxy,
    ProxyError,
    error_response,
    parse_listen,
    parse_request,
    upstream_head,
)

WEB = IPv6Address("fc03:1136:38ab:cdef::10")
SSH = IPv6Address("fc03:1136:38ab:cdef::22")
BOX = IPv6Address("fc03:1136:38ab:cdef::1")
RECORDS = {
    "mybox.heiyu.space": [BOX],
    "web.mybox.heiyu.space": [WEB],
    "ssh.mybox.heiyu.space": [SSH],
}


def head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- parse_request ------------------------------------------------------------------------------


def test_connect_targets() -> None:
    request = parse_request(head("CONNECT Web.MyBox.heiyu.space:443 HTTP/1.1", "Host: x"))
    assert (request.method, request.host, request.port, request.path) == (
        "CONNECT",
        "web.mybox.heiyu.space",
        443,
        "",
    )
    assert request.is_connect and request.authority == "web.mybox.heiyu.space:443"
    v6 = parse_request(head("CONNECT [FC03:1136:38ab:cdef::22]:22 HTTP/1.1"))
    assert (v6.host, v6.port, v6.authority) == (str(SSH), 22, f"[{SSH}]:22")
    for bad in (
        "web.mybox.heiyu.space",
        "h:0",
        "h:65536",
        "h:-1",
        "h:22x",
        "[::1",
        "[zz]:1",
        ":80",
    ):
        with pytest.raises(ProxyError) as caught:
            parse_request(head(f"CONNECT {bad} HTTP/1.1"))
        assert caught.value.status == 400, bad


@pytest.mark.parametrize(
    ("target", "host", "port", "path"),
    [
        ("http://web.mybox.heiyu.space/a/b?c=d", "web.mybox.heiyu.space", 80, "/a/b?c=d"),
        ("http://web.mybox.heiyu.space", "web.mybox.heiyu.space", 80, "/"),
        ("HTTP://Web.mybox.heiyu.space:8080?q=1", "web.mybox.heiyu.space", 8080, "/?q=1"),
        ("http://web.mybox.heiyu.space/p#frag", "web.mybox.heiyu.space", 80, "/p"),
        (f"http://[{WEB}]:81/", str(WEB), 81, "/"),
        ("http://web.mybox.heiyu.space./x", "web.mybox.heiyu.space", 80, "/x"),
    ],
)
def test_absolute_form_becomes_origin_form(target: str, host: str, port: int, path: str) -> None:
    request = parse_request(head(f"GET {target} HTTP/1.1", "Host: ignored"))
    assert (request.host, request.port, request.path) == (host, port, path)


@pytest.mark.parametrize(
    ("line", "status", "words"),
    [
        ("GET / HTTP/1.1", 400, "not a web server"),
        ("GET https://web.mybox.heiyu.space/ HTTP/1.1", 400, "CONNECT"),
        ("GET http://u:p@web.mybox.heiyu.space/ HTTP/1.1", 400, "user:password"),
        ("GET http://web.mybox.heiyu.space/ HTTP/2.0", 505, "HTTP/1.1"),
        ("GET http://web.mybox.heiyu.space/ FTP/1.0", 400, "version"),
        ("GET  http://web.mybox.heiyu.space/ HTTP/1.1", 400, "request line"),
        ("G(T http://web.mybox.heiyu.space/ HTTP/1.1", 400, "token"),
        ("GET http://web_x.heiyu.space/ HTTP/1.1", 400, "host name"),
    ],
)
def test_bad_request_lines(line: str, status: int, words: str) -> None:
    with pytest.raises(ProxyError) as caught:
        parse_request(head(line))
    assert caught.value.status == status and words in caught.value.text


def test_bad_fields() -> None:
    start = "GET http://web.mybox.heiyu.space/ HTTP/1.1"
    for lines in (["Host : x"], ["NoColon"], ["A: b", " folded"], ["A: b\x01c"]):
        with pytest.raises(ProxyError) as caught:
            parse_request(head(start, *lines))
        assert caught.value.status == 400
    with pytest.raises(ProxyError) as caught:
        parse_request(head(start, *[f"X-{i}: y" for i in range(101)]))
    assert caught.value.status == 431
    with pytest.raises(ProxyError) as caught:
        parse_request(head(start, "X: " + "y" * MAX_HEAD))
    assert caught.value.status == 431
    for raw in (
        b"GET http://a.heiyu.space/ HTTP/1.1\n\n",
        b"GET http://a/ HTTP/1.1\r\nA: b\n\r\n\r\n",
    ):
        with pytest.raises(ProxyError):
            parse_request(raw)


def test_body_framing() -> None:
    def framing(*lines: str) -> tuple[str, int]:
        return parse_request(head("POST http://w.b.heiyu.space/ HTTP/1.1", *lines)).body_framing()

    assert framing() == ("none", 0)
    assert framing("Content-Length: 12") == ("length", 12)
    assert framing("Content-Length: 12", "content-length: 12") == ("length", 12)
    assert framing("Content-Length: 0") == ("none", 0)
    assert framing("Transfer-Encoding: Chunked") == ("chunked", 0)
    cases = [
        (("Content-Length: 1", "Content-Length: 2"), 400),
        (("Content-Length: -1",), 400),
        (("Content-Length: 1", "Transfer-Encoding: chunked"), 400),
        (("Transfer-Encoding: gzip, chunked",), 501),
    ]
    for lines, status in cases:
        with pytest.raises(ProxyError) as caught:
            framing(*lines)
        assert caught.value.status == status, lines


def test_upstream_head_drops_hop_by_hop_and_closes() -> None:
    request = parse_request(
        head(
            "POST http://web.mybox.heiyu.space:8080/up?x=1 HTTP/1.1",
            "Host: elsewhere.example",
            "Proxy-Connection: keep-alive",
            "Proxy-Authorization: Basic eDp5",
            "Connection: keep-alive, X-Secret",
            "X-Secret: no",
            "Keep-Alive: 5",
            "Accept: */*",
            "Content-Length: 3",
        )
    )
    assert upstream_head(request) == head(
        "POST /up?x=1 HTTP/1.1",
        "Host: web.mybox.heiyu.space:8080",
        "Accept: */*",
        "Content-Length: 3",
        "Connection: close",
        "Via: 1.1 lazycat-client",
    )


def test_error_response_is_complete() -> None:
    raw = error_response(403, "no ü")
    status, _, rest = raw.partition(b"\r\n")
    fields, _, body = rest.partition(b"\r\n\r\n")
    assert status == b"HTTP/1.1 403 Forbidden"
    assert f"Content-Length: {len(body)}".encode() in fields and body == "no ü\n".encode()


@given(st.binary(max_size=300))
@settings(max_examples=400, deadline=None)
def test_parse_request_raises_only_its_error(data: bytes) -> None:
    for raw in (data, data + b"\r\n\r\n", b"GET http://a.b.heiyu.space/ HTTP/1.1\r\n" + data):
        try:
            parse_request(raw)
        except ProxyError as exc:
            assert 400 <= exc.status < 600


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_PATH = st.from_regex(
    r"(/[A-Za-z0-9._~%!$&'()*+,;=:@-]{0,12}){0,4}(\?[A-Za-z0-9=&]{0,10})?", fullmatch=True
)


@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND"]),
    labels=st.lists(_LABEL, min_size=1, max_size=3),
    port=st.integers(1, 65535),
    path=_PATH,
    fields=st.lists(
        st.tuples(
            st.from_regex(r"X-[A-Za-z0-9-]{1,10}", fullmatch=True), st.text("abc 123", max_size=10)
        ),
        max_size=5,
    ),
)
@settings(max_examples=200, deadline=None)
def test_valid_requests_parse_and_rewrite(
    method: str, labels: list[str], port: int, path: str, fields: list[tuple[str, str]]
) -> None:
    host = ".".join([*labels, "heiyu", "space"])
    raw = head(f"{method} http://{host}:{port}{path} HTTP/1.1", *[f"{k}: {v}" for k, v in fields])
    request = parse_request(raw)
    assert (request.method, request.host, request.port) == (method, host, port)
    assert request.path == (path if path.startswith("/") else "/" + path)
    assert request.fields == tuple((k, v.strip()) for k, v in fields)
    lines = upstream_head(request).decode().split("\r\n")
    authority = host if port == 80 else f"{host}:{port}"
    assert lines[:2] == [f"{method} {request.path} HTTP/1.1", f"Host: {authority}"]
    assert lines[-4:] == ["Connection: close", "Via: 1.1 lazycat-client", "", ""]


# --- --proxy-listen -------------------------------------------------------------------------------


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:31085") == ("127.0.0.1", 31085)
    assert parse_listen("localhost:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:3128") == ("::1", 3128)
    assert parse_listen("127.0.0.2:0") == ("127.0.0.2", 0)
    with pytest.raises(ValueError, match="--proxy-allow-remote"):
        parse_listen("0.0.0.0:31085")
    with pytest.raises(ValueError, match="--proxy-allow-remote"):
        parse_listen("[2001:db8::5]:31085")
    assert parse_listen("192.0.2.5:31085", allow_remote=True) == ("192.0.2.5", 31085)
    for bad in ("31085", "127.0.0.1", "127.0.0.1:x", "127.0.0.1:70000", "example.com:1"):
        with pytest.raises(ValueError):
            parse_listen(bad)


# --- names ----------------------------------------------------------------------------------------


def test_names_policy() -> None:
    names = Names(RECORDS, box="mybox")
    assert names.resolve("web.mybox.heiyu.space") == [WEB]
    assert names.resolve(str(SSH)) == [SSH]  # an overlay literal goes to the tunnel
    for host in (
        "example.com",
        "notheiyu.space",
        "heiyu.space",
        "192.0.2.1",
        "2001:db8::1",
        "fc03:1136:3800::1",
    ):
        with pytest.raises(ProxyError) as caught:
            names.resolve(host)
        assert caught.value.status == 403, host
    for host in (
        "nope.mybox.heiyu.space",
        "otherbox.heiyu.space",
        "a.b.c.heiyu.space",
        "-x.heiyu.space",
    ):
        with pytest.raises(ProxyError) as caught:
            names.resolve(host)
        assert caught.value.status == 404, host
        assert "mybox" in caught.value.text
    names.set_records({"new.mybox.heiyu.space.": [SSH]})  # the box sent new records
    assert names.resolve("new.mybox.heiyu.space") == [SSH]
    with pytest.raises(ProxyError):
        names.resolve("web.mybox.heiyu.space")


# --- the server on loopback -----------------------------------------------------------------------


@dataclass
class Upstream:
    """Loopback servers standing for services: ``ports`` maps (overlay address, port) to the
    loopback port that serves it; everything else is refused (a closed loopback port)."""

    ports: dict[tuple[IPv6Address, int], int] = field(default_factory=dict)
    closed_port: int = 0
    dialed: list[tuple[IPv6Address, int]] = field(default_factory=list)

    async def dial(self, address: IPv6Address, port: int) -> socket.socket:
        self.dialed.append((address, port))
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(
                sock, ("127.0.0.1", self.ports.get((address, port), self.closed_port))
            )
        except BaseException:
            sock.close()
            raise
        return sock


def closed_port() -> int:
    """A loopback port nobody listens on (bound, never listening: connecting is refused)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


async def exchange_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads until EOF, then answers the SHA-256 of what it got and 1 MiB of its own."""
    received = hashlib.sha256()
    while data := await reader.read(65536):
        received.update(data)
    writer.write(received.digest() + SERVER_BLOB)
    await writer.drain()
    writer.close()


SERVER_BLOB = os.urandom(1 << 20)


async def http_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A minimal HTTP/1.1 origin: echoes the request it got (line, fields, body) as JSON, reads
    the body by Content-Length or chunked, and closes after the response when asked."""
    request_head = await reader.readuntil(b"\r\n\r\n")
    lines = request_head.decode().split("\r\n")[:-2]
    fields = [line.split(": ", 1) for line in lines[1:]]
    lower = {k.lower(): v for k, v in fields}
    body = b""
    if "content-length" in lower:
        body = await reader.readexactly(int(lower["content-length"]))
    elif lower.get("transfer-encoding") == "chunked":
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")  # the empty trailer section
    answer = json.dumps({"line": lines[0], "fields": fields, "body": body.decode()}).encode()
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + f"Content-Length: {len(answer)}\r\n\r\n".encode()
        + answer
    )
    await writer.drain()
    writer.close()


@dataclass
class Setup:
    proxy: Proxy
    upstream: Upstream
    port: int


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    servers = [
        await asyncio.start_server(exchange_server, "127.0.0.1", 0),
        await asyncio.start_server(http_server, "127.0.0.1", 0),
    ]
    exchange_port = servers[0].sockets[0].getsockname()[1]
    http_port = servers[1].sockets[0].getsockname()[1]
    upstream = Upstream(
        {(SSH, 22): exchange_port, (WEB, 80): http_port, (WEB, 8080): http_port},
        closed_port(),
    )
    proxy = Proxy(Names(RECORDS, box="mybox"), upstream.dial, head_timeout=0.5, connect_timeout=0.5)
    await proxy.start("127.0.0.1", 0)
    port = int(proxy.listen.rsplit(":", 1)[1])
    try:
        yield Setup(proxy, upstream, port)
    finally:
        await proxy.close()
        for server in servers:
            server.close()
            await server.wait_closed()


async def ask(port: int, data: bytes, *, eof: bool = False) -> tuple[int, bytes, bytes]:
    """Send ``data`` to the proxy, read to EOF: (status, head, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if eof:
            writer.write_eof()
        async with asyncio.timeout(5):
            raw = await reader.read(-1)
    finally:
        writer.close()
    response_head, _, body = raw.partition(b"\r\n\r\n")
    return int(response_head.split(b" ")[1]), response_head, body


async def test_connect_is_byte_exact_both_ways(setup: Setup) -> None:
    mine = os.urandom(3 << 20)
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    # The first bytes travel in the same segment as the CONNECT head: they must not be lost.
    writer.write(b"CONNECT ssh.mybox.heiyu.space:22 HTTP/1.1\r\nHost: x\r\n\r\n" + mine[:1000])
    async with asyncio.timeout(10):
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 200 Connection established\r\n\r\n"
        writer.write(mine[1000:])
        writer.write_eof()  # half-close: the server answers only after our EOF
        answer = await reader.read(-1)
    writer.close()
    assert answer[:32] == hashlib.sha256(mine).digest()
    assert answer[32:] == SERVER_BLOB
    assert setup.upstream.dialed == [(SSH, 22)]
    assert setup.proxy.stats["connect"] == 1


async def test_plain_http_with_a_body(setup: Setup) -> None:
    body = b'{"hello": "box"}'
    status, response_head, answer = await ask(
        setup.port,
        head(
            "POST http://web.mybox.heiyu.space:8080/submit?x=1 HTTP/1.1",
            "Host: web.mybox.heiyu.space:8080",
            "Proxy-Connection: keep-alive",
            "Proxy-Authorization: Basic eDp5",
            f"Content-Length: {len(body)}",
        )
        + body,
    )
    assert status == 200 and b"Content-Type: application/json" in response_head
    seen = json.loads(answer)
    assert seen["line"] == "POST /submit?x=1 HTTP/1.1"
    assert seen["body"] == body.decode()
    names = [k.lower() for k, _ in seen["fields"]]
    assert "proxy-connection" not in names and "proxy-authorization" not in names
    assert ["Connection", "close"] in seen["fields"]
    assert ["Host", "web.mybox.heiyu.space:8080"] in seen["fields"]


async def test_plain_http_with_a_chunked_body(setup: Setup) -> None:
    chunks = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n"
    status, _, answer = await ask(
        setup.port,
        head("PUT http://web.mybox.heiyu.space/up HTTP/1.1", "Transfer-Encoding: chunked") + chunks,
    )
    assert status == 200 and json.loads(answer)["body"] == "hello, world"


async def test_curl_through_the_proxy(setup: Setup) -> None:
    """curl itself, both ways it uses a proxy: plain HTTP (absolute-form) and a CONNECT
    tunnel (--proxytunnel), resolving nothing itself."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (Debian: curl)")
    proxy = f"http://127.0.0.1:{setup.port}"
    for extra in ([], ["--proxytunnel"]):
        process = await asyncio.create_subprocess_exec(
            "curl",
            "-sS",
            "--max-time",
            "5",
            "--noproxy",
            "",
            "--proxy",
            proxy,
            *extra,
            "http://web.mybox.heiyu.space/hello",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": os.environ["PATH"]},
        )
        out, err = await asyncio.wait_for(process.communicate(), 10)
        assert process.returncode == 0, err
        assert json.loads(out)["line"] == "GET /hello HTTP/1.1", extra


async def test_outside_heiyu_space_is_403_with_an_explanation(setup: Setup) -> None:
    for request in (
        head("GET http://example.com/ HTTP/1.1", "Host: example.com"),
        head("CONNECT example.com:443 HTTP/1.1"),
        head("CONNECT 192.0.2.1:443 HTTP/1.1"),
    ):
        status, response_head, body = await ask(setup.port, request)
        text = body.decode()
        assert status == 403
        assert b"Content-Type: text/plain; charset=utf-8" in response_head
        assert "is not a lazycat name" in text or "not a lazycat overlay address" in text
        assert "heiyu.space" in text and "DIRECT" in text and f"127.0.0.1:{setup.port}" in text
    assert setup.upstream.dialed == []


async def test_an_unknown_name_is_404_and_says_why(setup: Setup) -> None:
    status, _, body = await ask(setup.port, head("CONNECT nope.mybox.heiyu.space:22 HTTP/1.1"))
    assert status == 404
    assert "nope.mybox.heiyu.space is not a name mybox gave this device" in body.decode()
    assert setup.upstream.dialed == []


async def test_malformed_and_oversized_requests(setup: Setup) -> None:
    status, _, body = await ask(setup.port, b"HELLO\r\n\r\n")
    assert status == 400 and b"METHOD target" in body
    status, _, body = await ask(setup.port, head("GET / HTTP/1.1", "Host: 127.0.0.1"))
    assert status == 400 and b"not a web server" in body
    # a head that never ends: refused at the limit, not buffered forever
    status, _, _ = await ask(
        setup.port, b"GET http://web.mybox.heiyu.space/ HTTP/1.1\r\nX: " + b"y" * (MAX_HEAD + 100)
    )
    assert status == 431


async def test_a_refused_upstream_is_502(setup: Setup) -> None:
    status, _, body = await ask(setup.port, head("CONNECT web.mybox.heiyu.space:9 HTTP/1.1"))
    assert status == 502
    assert "could not connect to web.mybox.heiyu.space port 9" in body.decode()
    assert "refused" in body.decode().lower()


async def test_timeouts_are_bounded(setup: Setup) -> None:
    loop = asyncio.get_running_loop()
    # a head that stops half-way: 408 after head_timeout (0.5 s)
    started = loop.time()
    status, _, _ = await ask(setup.port, b"GET http://web.mybox.heiyu.space/ HTTP/1.1\r\n")
    assert status == 408 and 0.4 < loop.time() - started < 2.5

    # a connection attempt nobody answers (SYNs into a black hole): 504 after connect_timeout
    async def black_hole(address: IPv6Address, port: int) -> socket.socket:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    setup.proxy.dialer = black_hole
    started = loop.time()
    status, _, body = await ask(setup.port, head("CONNECT web.mybox.heiyu.space:80 HTTP/1.1"))
    assert status == 504 and b"no answer from web.mybox.heiyu.space port 80" in body
    assert 0.4 < loop.time() - started < 2.5


async def test_too_many_clients_get_503_and_close_ends_tunnels(setup: Setup) -> None:
    setup.proxy.max_clients = 1
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    writer.write(head("CONNECT ssh.mybox.heiyu.space:22 HTTP/1.1"))
    async with asyncio.timeout(5):
        await reader.readuntil(b"\r\n\r\n")
        status, _, _ = await ask(setup.port, head("CONNECT ssh.mybox.heiyu.space:22 HTTP/1.1"))
        assert status == 503
        await setup.proxy.close()  # `down`: open tunnels end too
        assert await reader.read(-1) == b""
    writer.close()
    assert setup.proxy.stats["active"] == 0


async def test_records_change_live(setup: Setup) -> None:
    setup.proxy.names.set_records({"new.mybox.heiyu.space": [SSH]})
    status, _, _ = await ask(setup.port, head("CONNECT ssh.mybox.heiyu.space:22 HTTP/1.1"))
    assert status == 404
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    writer.write(head("CONNECT new.mybox.heiyu.space:22 HTTP/1.1"))
    async with asyncio.timeout(5):
        assert b" 200 " in await reader.readuntil(b"\r\n\r\n")
    writer.close()
