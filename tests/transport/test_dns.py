"""The heiyu.space responder: answers, NODATA, NXDOMAIN, REFUSED, malformed input; then the
asyncio listener on loopback."""

from __future__ import annotations

import asyncio
import socket
from ipaddress import IPv6Address

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport.dns import TTL, Responder, serve

NAS = IPv6Address("fc03:1136:38ab:cdef:2::7")
BOX = IPv6Address("fc03:1136:38ab:cdef::1")
RECORDS = {"nas.mybox.heiyu.space": [NAS], "mybox.heiyu.space.": [BOX]}


def ask(responder: Responder, name: str, rdtype: str = "AAAA") -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    reply = responder.answer(query.to_wire())
    assert reply is not None
    response = dns.message.from_wire(reply)
    assert response.id == query.id
    return response


def test_a_known_name_gets_its_aaaa_record() -> None:
    response = ask(Responder(RECORDS), "nas.mybox.heiyu.space")
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA and response.flags & dns.flags.QR
    assert not response.flags & dns.flags.RA
    [rrset] = response.answer
    assert rrset.rdtype == dns.rdatatype.AAAA and rrset.ttl == TTL
    assert [IPv6Address(r.address) for r in rrset] == [NAS]


def test_names_are_case_insensitive() -> None:
    response = ask(Responder(RECORDS), "NAS.MyBox.Heiyu.Space.")
    assert [IPv6Address(r.address) for r in response.answer[0]] == [NAS]


def test_a_known_name_asked_for_a_is_nodata() -> None:
    response = ask(Responder(RECORDS), "mybox.heiyu.space", "A")
    assert response.rcode() == dns.rcode.NOERROR and response.answer == []


def test_an_unknown_name_under_the_box_is_nxdomain() -> None:
    responder = Responder(RECORDS)
    assert ask(responder, "nope.mybox.heiyu.space").rcode() == dns.rcode.NXDOMAIN
    assert ask(responder, "otherbox.heiyu.space").rcode() == dns.rcode.NXDOMAIN
    assert responder.stats["nxdomain"] == 2


def test_names_outside_heiyu_space_are_refused() -> None:
    responder = Responder(RECORDS)
    for name in ("example.com", "heiyu.space.evil.example", "space"):
        assert ask(responder, name).rcode() == dns.rcode.REFUSED


def test_set_records_replaces_the_table() -> None:
    responder = Responder(RECORDS)
    responder.set_records({"new.mybox.heiyu.space": [NAS]})
    assert ask(responder, "nas.mybox.heiyu.space").rcode() == dns.rcode.NXDOMAIN
    assert ask(responder, "new.mybox.heiyu.space").rcode() == dns.rcode.NOERROR
    with pytest.raises(ValueError, match="not under"):
        responder.set_records({"example.com": [NAS]})


def test_malformed_queries() -> None:
    responder = Responder(RECORDS)
    assert responder.answer(b"") is None
    assert responder.answer(b"\x12\x34" + bytes(5)) is None  # shorter than a header
    query = dns.message.make_query("nas.mybox.heiyu.space", "AAAA").to_wire()
    # a response is never answered (no loops between two responders)
    assert responder.answer(query[:2] + bytes([query[2] | 0x80]) + query[3:]) is None
    # a header then garbage: FORMERR with the same id
    reply = responder.answer(query[:12] + b"\xff\xff\xff")
    assert reply is not None and reply[:2] == query[:2]
    assert reply[2] & 0x80 and reply[3] & 0x0F == dns.rcode.FORMERR
    # two questions
    two = bytearray(query)
    two[4:6] = (2).to_bytes(2, "big")
    reply = responder.answer(bytes(two))
    assert reply is not None and reply[3] & 0x0F == dns.rcode.FORMERR


def test_not_a_query_is_notimp() -> None:
    message = dns.message.make_query("mybox.heiyu.space", "SOA")
    message.set_opcode(dns.opcode.NOTIFY)
    reply = Responder(RECORDS).answer(message.to_wire())
    assert reply is not None
    assert dns.message.from_wire(reply).rcode() == dns.rcode.NOTIMP


@given(st.binary(max_size=600))
def test_any_input_gets_an_answer_or_nothing_never_an_exception(data: bytes) -> None:
    reply = Responder(RECORDS).answer(data)
    assert reply is None or (len(reply) >= 12 and reply[:2] == data[:2])


async def test_the_listener_answers_over_udp_on_loopback() -> None:
    transport = await serve(Responder(RECORDS), "127.0.0.1", 0)
    try:
        port = transport.get_extra_info("sockname")[1]
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.setblocking(False)
            query = dns.message.make_query("nas.mybox.heiyu.space", "AAAA")
            await loop.sock_sendto(client, query.to_wire(), ("127.0.0.1", port))
            reply = await asyncio.wait_for(loop.sock_recv(client, 2048), 5)
        response = dns.message.from_wire(reply)
        assert [IPv6Address(r.address) for r in response.answer[0]] == [NAS]
    finally:
        transport.close()
