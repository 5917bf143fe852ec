"""The client's DNS responder for ``heiyu.space`` names (TUN mode), on ``RESOLVER`` port 53.

What it answers (the client is authoritative for ``heiyu.space`` from its own point of view:
the box sends the records, nothing is asked upstream)::

    question                                      answer
    ------------------------------------------    ---------------------------------------------
    a name in the records table, type AAAA/ANY    NOERROR, AA, one AAAA per address (TTL 30 s)
    a name in the table, another type (A, MX…)    NOERROR, AA, no answer ("NODATA", RFC 2308
                                                  sec. 2.2): the overlay is IPv6 only
    any other name under heiyu.space              NXDOMAIN, AA (RFC 8020: nothing below it either)
    a name outside heiyu.space                    REFUSED (we are not a recursive resolver)
    not a QUERY (NOTIFY, UPDATE…)                 NOTIMP
    not exactly one question, bad question class  FORMERR
    a header we can read but a body we cannot     FORMERR with the query's id (RFC 1035 sec. 4.1.1)
    fewer than 12 bytes, or a response            nothing (no reply to garbage or to replies:
                                                  never an amplifier, never a loop)

The codec is **dnspython** (``dns.message``): maintained for two decades, fuzzed, handles name
compression, EDNS and the corner cases a hand-written parser gets wrong; ``dnslib`` is smaller but
sees far less maintenance and review. Answers are a few AAAA records, far under the 512 bytes of
plain UDP DNS (RFC 1035 sec. 4.2.1), so truncation never comes up: the table holds at most
``MAX_ADDRESSES`` per name.

:class:`Responder` is sans-IO (bytes in, bytes out, never raises); :func:`serve` is the small
asyncio UDP listener around it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable, Mapping
from ipaddress import IPv6Address
from typing import Any, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from transport.addressing import RESOLVER

__all__ = ["DNS_PORT", "MAX_ADDRESSES", "TTL", "ZONE", "Responder", "serve"]

ZONE = dns.name.from_text("heiyu.space.")
TTL = 30  # seconds: records change when the box says so; a short TTL lets that show soon
MAX_ADDRESSES = 8
DNS_PORT = 53


def _name(text: str) -> dns.name.Name:
    name = dns.name.from_text(text.rstrip(".") + ".")
    if not name.is_subdomain(ZONE):
        raise ValueError(f"{text!r} is not under {ZONE}")
    return name


class Responder:
    """Answers queries from ``records``: full names (``nas.mybox.heiyu.space``) to overlay
    addresses. :meth:`set_records` replaces the table (the box sent new records)."""

    def __init__(self, records: Mapping[str, Iterable[IPv6Address]] | None = None) -> None:
        self._records: dict[dns.name.Name, list[IPv6Address]] = {}
        self.stats = {"answered": 0, "nxdomain": 0, "refused": 0, "formerr": 0, "dropped": 0}
        self.set_records(records or {})

    def set_records(self, records: Mapping[str, Iterable[IPv6Address]]) -> None:
        table: dict[dns.name.Name, list[IPv6Address]] = {}
        for text, addresses in records.items():
            listed = [IPv6Address(a) for a in addresses][:MAX_ADDRESSES]
            table[_name(text)] = listed
        self._records = table

    def answer(self, data: bytes) -> bytes | None:
        """The reply to one query datagram, or None to send nothing. Never raises."""
        try:
            return self._answer(data)
        except Exception:  # a codec surprise must not kill the listener
            self.stats["dropped"] += 1
            return None

    def _answer(self, data: bytes) -> bytes | None:
        if len(data) < 12 or data[2] & 0x80:  # no header, or QR=1: a response
            self.stats["dropped"] += 1
            return None
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return self._formerr(data)
        if query.opcode() != dns.opcode.QUERY:
            return self._reply(query, dns.rcode.NOTIMP)
        if len(query.question) != 1:
            return self._formerr(data)
        question = query.question[0]
        if question.rdclass not in (dns.rdataclass.IN, dns.rdataclass.ANY):
            return self._reply(query, dns.rcode.REFUSED)
        name = question.name
        if not name.is_subdomain(ZONE):
            self.stats["refused"] += 1
            return self._reply(query, dns.rcode.REFUSED, authoritative=False)
        addresses = self._records.get(name)
        if addresses is None:
            self.stats["nxdomain"] += 1
            return self._reply(query, dns.rcode.NXDOMAIN)
        response = self._response(query, dns.rcode.NOERROR, authoritative=True)
        if question.rdtype in (dns.rdatatype.AAAA, dns.rdatatype.ANY) and addresses:
            rrset = dns.rrset.from_text_list(
                name, TTL, dns.rdataclass.IN, dns.rdatatype.AAAA, [str(a) for a in addresses]
            )
            response.answer.append(rrset)
        self.stats["answered"] += 1
        return cast(bytes, response.to_wire())

    def _response(
        self, query: dns.message.Message, rcode: dns.rcode.Rcode, *, authoritative: bool
    ) -> Any:
        response = dns.message.make_response(query)
        response.set_rcode(rcode)
        response.flags &= ~dns.flags.RA  # no recursion here
        if authoritative:
            response.flags |= dns.flags.AA
        return response

    def _reply(
        self, query: dns.message.Message, rcode: dns.rcode.Rcode, *, authoritative: bool = True
    ) -> bytes:
        return cast(bytes, self._response(query, rcode, authoritative=authoritative).to_wire())

    def _formerr(self, data: bytes) -> bytes:
        """FORMERR with the query's id and opcode, no sections (RFC 1035 sec. 4.1.1)."""
        self.stats["formerr"] += 1
        flags = 0x8000 | (data[2] & 0x78) << 8 | (data[2] & 0x01) << 8 | dns.rcode.FORMERR
        return data[:2] + flags.to_bytes(2, "big") + bytes(8)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = self.responder.answer(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


async def serve(
    responder: Responder, host: str = str(RESOLVER), port: int = DNS_PORT
) -> asyncio.DatagramTransport:
    """Listen for queries on ``host``:``port`` (UDP). Close the returned transport to stop."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Protocol(responder), local_addr=(host, port), family=family
    )
    return cast(asyncio.DatagramTransport, transport)
