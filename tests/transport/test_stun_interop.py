"""STUN interoperability with software nobody here wrote, on loopback.

(a) third-party clients against our responder: ``aioice.stun`` (its encoder and parser, byte for
    byte) and coturn's ``turnutils_natdiscovery`` (a full RFC 5780 mapping + filtering run, with
    its ``-P`` padding so our no-amplification rule lets us answer);
(b) our client and netcheck against third-party servers: coturn's ``turnserver`` (RFC 5780) and
    ``stund`` from Debian's stun-server (RFC 3489: CHANGED-ADDRESS, no PADDING support).

Needs the Debian packages ``coturn`` and ``stun-server`` and the ``aioice`` Python package. When
one is missing the test fails under CI (the ``CI`` variable is set) and is skipped elsewhere.
Debian's ``stun-client`` (vovida ``stun``) is not used: its RFC 3489 requests are 28 bytes and
carry no magic cookie, so a responder that never answers with more bytes than it was sent cannot
answer them (a bare answer is 32 bytes) -- by design.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.transport.test_stun import RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE, RFC5769_REQUEST
from transport import netcheck_aio, stun, stun_aio
from transport.netcheck import Filtering, MappingBehavior, NatType, NetcheckConfig
from transport.stun import BindingTransaction, decode


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must install it)", pytrace=False)
    pytest.skip(what)


def _tool(binary: str, package: str) -> str:
    path = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")  # stund: sbin
    if path is None:
        _missing(f"{binary} is not installed: apt-get install -y {package}")
    assert path is not None
    return path


def _aioice() -> ModuleType:
    try:
        from aioice import stun as aioice_stun
    except ImportError:
        _missing("aioice is not installed: pip install aioice")
        raise
    return aioice_stun


# --- running third-party daemons ----------------------------------------------------------------


def _free_port_pair() -> int:
    """A port P such that P and P+1 are free for UDP on 127.0.0.1 and 127.0.0.2."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port >= 65535:
            continue
        held: list[socket.socket] = []
        try:
            for ip in ("127.0.0.1", "127.0.0.2"):
                for p in (port, port + 1):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    held.append(s)
                    s.bind((ip, p))
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
        return port
    raise RuntimeError("no free pair of UDP ports on loopback")


def _answers(address: tuple[str, int], pad_to: int, deadline: float) -> bool:
    """Blocking: does a STUN server answer at ``address`` before ``deadline``?"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.2)
        while time.monotonic() < deadline:
            tx = BindingTransaction(address, time.monotonic(), pad_to=pad_to)
            sock.sendto(tx.request, address)
            with contextlib.suppress(TimeoutError):
                data, source = sock.recvfrom(4096)
                if tx.receive(data, source, time.monotonic()) and tx.result is not None:
                    return True
    return False


@contextlib.contextmanager
def _daemon(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield proc
    finally:
        proc.terminate()  # by PID, never by name
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[tuple[tuple[str, int], tuple[str, int]]]:
    """coturn as a STUN-only RFC 5780 server: ((127.0.0.1, P), its other address)."""
    turnserver = _tool("turnserver", "coturn")
    port = _free_port_pair()
    args = [
        turnserver,
        "-n",  # no configuration file
        "--stun-only",
        "--no-tls",
        "--no-dtls",
        "--no-tcp",
        "--no-cli",
        "--listening-ip=127.0.0.1",
        "--listening-ip=127.0.0.2",
        f"--listening-port={port}",
        f"--alt-listening-port={port + 1}",
        f"--log-file={tmp_path / 'turn.log'}",
        "--simple-log",
        f"--pidfile={tmp_path / 'turn.pid'}",
        f"--userdb={tmp_path / 'turndb'}",
    ]
    with _daemon(args, tmp_path / "turn.out") as proc:
        if not _answers(("127.0.0.1", port), stun.DEFAULT_REQUEST_SIZE, time.monotonic() + 10):
            output = (tmp_path / "turn.out").read_text(errors="replace")[-2000:]
            pytest.fail(f"turnserver (exit {proc.poll()}) did not answer:\n{output}")
        yield ("127.0.0.1", port), ("127.0.0.2", port + 1)


@pytest.fixture
def stund(tmp_path: Path) -> Iterator[tuple[tuple[str, int], tuple[str, int]]]:
    """Debian's stund (vovida 0.97, RFC 3489) on 127.0.0.1/127.0.0.2, ports P and P+1."""
    binary = _tool("stund", "stun-server")
    port = _free_port_pair()
    args = [binary, "-h", "127.0.0.1", "-a", "127.0.0.2", "-p", str(port), "-o", str(port + 1)]
    with _daemon(args, tmp_path / "stund.out") as proc:
        if not _answers(("127.0.0.1", port), 0, time.monotonic() + 10):
            output = (tmp_path / "stund.out").read_text(errors="replace")[-2000:]
            pytest.fail(f"stund (exit {proc.poll()}) did not answer:\n{output}")
        yield ("127.0.0.1", port), ("127.0.0.2", port + 1)


# --- (a) third-party clients, our responder -----------------------------------------------------


async def _exchange(
    sock: socket.socket, data: bytes, to: tuple[str, int], wait: float = 2.0
) -> Any:
    loop = asyncio.get_running_loop()
    await loop.sock_sendto(sock, data, to)
    return await asyncio.wait_for(loop.sock_recvfrom(sock, 4096), wait)


async def test_aioice_client_parses_our_answers(udp4: socket.socket) -> None:
    aioice_stun = _aioice()
    async with await stun_aio.serve(("127.0.0.1", 0), other=("127.0.0.2", 0)) as server:
        request = aioice_stun.Message(
            aioice_stun.Method.BINDING,
            aioice_stun.Class.REQUEST,
            attributes={"SOFTWARE": "aioice interop " + "x" * 80},  # room for the answer
        )
        request.add_fingerprint()
        data, source = await _exchange(udp4, bytes(request), server.primary)
        answer = aioice_stun.parse_message(data)  # checks FINGERPRINT, raises on anything odd
        assert len(data) <= len(bytes(request))
        assert source == server.primary
        assert answer.message_class == aioice_stun.Class.RESPONSE
        assert answer.transaction_id == request.transaction_id
        assert answer.attributes["XOR-MAPPED-ADDRESS"] == udp4.getsockname()
        assert answer.attributes["MAPPED-ADDRESS"] == udp4.getsockname()
        assert answer.attributes["OTHER-ADDRESS"] == server.other
        assert answer.attributes["RESPONSE-ORIGIN"] == server.primary
        assert answer.attributes["SOFTWARE"] == "lazycat"
        assert "FINGERPRINT" in answer.attributes


async def test_aioice_change_request_is_answered_from_the_other_address(
    udp4: socket.socket,
) -> None:
    aioice_stun = _aioice()
    async with await stun_aio.serve(("127.0.0.1", 0), other=("127.0.0.2", 0)) as server:
        assert server.other is not None
        for flags, expected in (
            (0x6, server.other),
            (0x2, ("127.0.0.1", server.other[1])),
            (0x4, ("127.0.0.2", server.primary[1])),
        ):
            request = aioice_stun.Message(
                aioice_stun.Method.BINDING,
                aioice_stun.Class.REQUEST,
                attributes={"CHANGE-REQUEST": flags, "SOFTWARE": "y" * 100},
            )
            data, source = await _exchange(udp4, bytes(request), server.primary)
            answer = aioice_stun.parse_message(data)
            assert source == expected
            assert answer.attributes["RESPONSE-ORIGIN"] == expected
            assert answer.attributes["XOR-MAPPED-ADDRESS"] == udp4.getsockname()


async def test_aioice_bare_request_gets_no_answer(udp4: socket.socket) -> None:
    aioice_stun = _aioice()
    async with await stun_aio.serve(("127.0.0.1", 0)) as server:
        bare = aioice_stun.Message(aioice_stun.Method.BINDING, aioice_stun.Class.REQUEST)
        assert len(bytes(bare)) == 20
        with pytest.raises(TimeoutError):
            await _exchange(udp4, bytes(bare), server.addresses[0], wait=0.3)
        assert server.requests == 1 and server.replies == 0


async def test_coturn_natdiscovery_classifies_our_server_as_no_nat() -> None:
    natdiscovery = _tool("turnutils_natdiscovery", "coturn")
    async with await stun_aio.serve(("127.0.0.1", 0), other=("127.0.0.2", 0)) as server:
        proc = await asyncio.create_subprocess_exec(
            natdiscovery,
            "-m",  # mapping behaviour
            "-f",  # filtering behaviour
            "-P",  # 1500 bytes of PADDING: lets a no-amplification server answer
            "-p",
            str(server.primary[1]),
            "127.0.0.1",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()  # by PID
                await proc.wait()
    text = output.decode(errors="replace")
    assert "NAT with Endpoint Independent Mapping!" in text, text[-2000:]
    assert "NAT with Endpoint Independent Filtering!" in text, text[-2000:]
    assert server.other is not None
    assert f"Other addr: : {server.other[0]}:{server.other[1]}" in text
    assert server.replies >= 4


# --- (b) our client and netcheck, third-party servers -------------------------------------------


async def test_our_client_against_coturn(
    coturn: tuple[tuple[str, int], tuple[str, int]], udp4: socket.socket
) -> None:
    primary, other = coturn
    plain = await stun_aio.binding_result(udp4, primary, timeout=3)
    assert plain.mapped == udp4.getsockname()
    assert plain.other_address == other and plain.response_origin == primary
    both = await stun_aio.binding_result(udp4, primary, 3, change_ip=True, change_port=True)
    assert both.source == other and both.mapped == udp4.getsockname()
    port = await stun_aio.binding_result(udp4, primary, 3, change_port=True)
    assert port.source == (primary[0], other[1])
    bare = await stun_aio.binding_result(udp4, primary, 3, pad_to=0)  # coturn has no such rule
    assert bare.mapped == udp4.getsockname()


async def test_netcheck_against_coturn_sees_no_nat(
    coturn: tuple[tuple[str, int], tuple[str, int]],
) -> None:
    primary, _ = coturn
    report = await netcheck_aio.run_netcheck([primary], bind=("127.0.0.1", 0))
    assert report.ipv4.nat_type is NatType.OPEN
    assert report.ipv4.mapping is MappingBehavior.ENDPOINT_INDEPENDENT
    assert report.ipv4.filtering is Filtering.ENDPOINT_INDEPENDENT
    assert report.notes == ()


async def test_our_client_against_stund(
    stund: tuple[tuple[str, int], tuple[str, int]], udp4: socket.socket
) -> None:
    primary, other = stund
    # stund (RFC 3489) silently drops requests with PADDING: ask it bare.
    result = await stun_aio.binding_result(udp4, primary, timeout=3, pad_to=0)
    assert result.mapped == udp4.getsockname()
    assert result.other_address == other  # from CHANGED-ADDRESS
    assert result.response_origin == primary  # from SOURCE-ADDRESS
    both = await stun_aio.binding_result(
        udp4, primary, 3, pad_to=0, change_ip=True, change_port=True
    )
    assert both.source == other


async def test_netcheck_against_stund_sees_no_nat(
    stund: tuple[tuple[str, int], tuple[str, int]],
) -> None:
    primary, _ = stund
    report = await netcheck_aio.run_netcheck(
        [primary], bind=("127.0.0.1", 0), config=NetcheckConfig(pad_to=0)
    )
    assert report.ipv4.nat_type is NatType.OPEN
    assert report.ipv4.filtering is Filtering.ENDPOINT_INDEPENDENT
    assert report.notes == ()


# --- the codec against aioice's, byte for byte --------------------------------------------------


def test_rfc5769_vectors_read_the_same_with_aioice() -> None:
    aioice_stun = _aioice()
    for vector in (RFC5769_REQUEST, RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE):
        theirs = aioice_stun.parse_message(vector)  # verifies the published FINGERPRINTs
        ours = decode(vector)
        assert theirs.transaction_id == ours.transaction_id
        assert theirs.attributes["SOFTWARE"] == ours.find(stun.Software).text  # type: ignore[union-attr]
        assert theirs.attributes.get("XOR-MAPPED-ADDRESS") == ours.mapped_address


_ADDR = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 0xFFFF)),
    st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 0xFFFF)),
)
_AIOICE_ATTRS = {
    "MAPPED-ADDRESS": (_ADDR, stun.MappedAddress),
    "XOR-MAPPED-ADDRESS": (_ADDR, stun.XorMappedAddress),
    "RESPONSE-ORIGIN": (_ADDR, stun.ResponseOrigin),
    "OTHER-ADDRESS": (_ADDR, stun.OtherAddress),
    "CHANGED-ADDRESS": (_ADDR, stun.ChangedAddress),
    "SOFTWARE": (st.text(max_size=40), stun.Software),
    "ERROR-CODE": (
        st.tuples(st.integers(300, 699), st.text(max_size=30)),
        lambda v: stun.ErrorCode(*v),
    ),
    "CHANGE-REQUEST": (
        st.sampled_from([0, 2, 4, 6]),
        lambda v: stun.ChangeRequest(bool(v & 4), bool(v & 2)),
    ),
}


@st.composite
def _attribute_sets(draw: st.DrawFn) -> list[tuple[str, Any]]:
    names = draw(st.lists(st.sampled_from(sorted(_AIOICE_ATTRS)), unique=True, max_size=6))
    return [(name, draw(_AIOICE_ATTRS[name][0])) for name in names]


@given(
    _attribute_sets(),
    st.sampled_from(["REQUEST", "INDICATION", "RESPONSE", "ERROR"]),
    st.binary(min_size=12, max_size=12),
    st.booleans(),
)
def test_our_encoding_is_aioices_byte_for_byte(
    attrs: list[tuple[str, Any]], klass: str, txid: bytes, fingerprint: bool
) -> None:
    aioice_stun = _aioice()
    theirs = aioice_stun.Message(
        aioice_stun.Method.BINDING, aioice_stun.Class[klass], txid, dict(attrs)
    )
    if fingerprint:
        theirs.add_fingerprint()
    ours = stun.Message(
        {"REQUEST": stun.Class.REQUEST, "INDICATION": stun.Class.INDICATION}.get(
            klass, stun.Class.SUCCESS if klass == "RESPONSE" else stun.Class.ERROR
        ),
        txid,
        tuple(_AIOICE_ATTRS[name][1](value) for name, value in attrs),  # type: ignore[operator]
        fingerprint=fingerprint,
    )
    assert stun.encode(ours) == bytes(theirs)
    assert decode(bytes(theirs)) == ours
    parsed = aioice_stun.parse_message(stun.encode(ours))
    assert parsed.attributes == dict(attrs) | (
        {"FINGERPRINT": parsed.attributes["FINGERPRINT"]} if fingerprint else {}
    )
