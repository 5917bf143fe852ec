"""transport.stun: codec (RFC 5769 vectors, round trips, fuzz), client transaction, responder."""

from __future__ import annotations

import binascii
import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport import stun
from transport.stun import (
    BindingTransaction,
    ChangedAddress,
    ChangeRequest,
    Class,
    ErrorCode,
    MappedAddress,
    Message,
    Opaque,
    OtherAddress,
    Padding,
    ResponseOrigin,
    ResponsePort,
    Retransmitter,
    Software,
    SourceAddress,
    StunError,
    StunResponder,
    UnknownAttributes,
    XorMappedAddress,
    decode,
    encode,
)
from transport.wire import Kind, classify

# --- RFC 5769 test vectors ----------------------------------------------------------------------
# Published in RFC 5769, "Test Vectors for Session Traversal Utilities for NAT (STUN)",
# R. Denis-Courmont, IETF, April 2010, sections 2.1-2.3 (copied as data). They carry
# MESSAGE-INTEGRITY (password "VOkJxbRl1RmTxUk/WvJxBt"), which we parse past without checking.

RFC5769_TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "802200105354554e207465737420636c69656e74"  # SOFTWARE "STUN test client"
    "002400046e0001ff"  # PRIORITY
    "80290008932ff9b151263b36"  # ICE-CONTROLLED
    "000600096576746a3a68367659202020"  # USERNAME "evtj:h6vY", padded with spaces
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"  # MESSAGE-INTEGRITY
    "80280004e57a3bcf"  # FINGERPRINT
)
RFC5769_IPV4_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"  # SOFTWARE "test vector", padded with a space
    "002000080001a147e112a643"  # XOR-MAPPED-ADDRESS 192.0.2.1:32853
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"  # MESSAGE-INTEGRITY
    "80280004c07d4c96"  # FINGERPRINT
)
RFC5769_IPV6_RESPONSE = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9"  # XOR-MAPPED-ADDRESS, IPv6
    "00080014a382954e4be67bf11784c97c8292c275bfe3ed41"
    "80280004c8fb0b4c"
)


def test_rfc5769_sample_request() -> None:
    msg = decode(RFC5769_REQUEST)
    assert (msg.cls, msg.method, msg.transaction_id) == (Class.REQUEST, stun.BINDING, RFC5769_TXID)
    assert msg.fingerprint
    assert msg.find(Software) == Software("STUN test client")
    assert Opaque(stun.PRIORITY, bytes.fromhex("6e0001ff")) in msg.attributes
    assert Opaque(stun.USERNAME, b"evtj:h6vY") in msg.attributes
    integrity = [a for a in msg.attributes if isinstance(a, Opaque) and a.type == 0x0008]
    assert len(integrity) == 1 and len(integrity[0].value) == 20
    # ICE-CONTROLLED is comprehension-optional and unknown to us: skipped, not an error.
    assert all(not (isinstance(a, Opaque) and a.type == 0x8029) for a in msg.attributes)
    assert msg.unknown_required == ()


def test_rfc5769_ipv4_response() -> None:
    msg = decode(RFC5769_IPV4_RESPONSE)
    assert msg.cls is Class.SUCCESS and msg.transaction_id == RFC5769_TXID
    assert msg.find(Software) == Software("test vector")  # padding bytes (a space) ignored
    assert msg.mapped_address == ("192.0.2.1", 32853)
    assert msg.fingerprint


def test_rfc5769_ipv6_response() -> None:
    msg = decode(RFC5769_IPV6_RESPONSE)
    assert msg.mapped_address == ("2001:db8:1234:5678:11:2233:4455:6677", 32853)
    assert msg.find(Software) == Software("test vector")


def test_rfc5769_xor_mapped_address_encodes_to_the_published_bytes() -> None:
    ours = encode(
        Message(
            Class.SUCCESS,
            RFC5769_TXID,
            (XorMappedAddress(("192.0.2.1", 32853)),),
            fingerprint=False,
        )
    )
    assert ours[20:] == bytes.fromhex("002000080001a147e112a643")
    ours6 = encode(
        Message(
            Class.SUCCESS,
            RFC5769_TXID,
            (XorMappedAddress(("2001:db8:1234:5678:11:2233:4455:6677", 32853)),),
            fingerprint=False,
        )
    )
    assert ours6[20:] == bytes.fromhex("002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9")


@pytest.mark.parametrize("vector", [RFC5769_REQUEST, RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE])
def test_rfc5769_vectors_with_a_flipped_bit_fail_the_fingerprint(vector: bytes) -> None:
    for position in (8, 25, len(vector) - 9):
        damaged = bytearray(vector)
        damaged[position] ^= 0x01
        with pytest.raises(StunError):
            decode(bytes(damaged))


def test_fingerprint_is_crc32_xor_stun() -> None:
    data = encode(Message(Class.REQUEST, bytes(12)))
    assert len(data) == 28
    body_without = data[:-8]
    assert int.from_bytes(data[-4:], "big") == binascii.crc32(body_without) ^ 0x5354554E
    assert data[-8:-4] == bytes.fromhex("80280004")


# --- codec details ------------------------------------------------------------------------------


def test_message_type_bits_interleave_method_and_class() -> None:
    txid = bytes(12)
    assert encode(Message(Class.REQUEST, txid, fingerprint=False))[:2] == b"\x00\x01"
    assert encode(Message(Class.SUCCESS, txid, fingerprint=False))[:2] == b"\x01\x01"
    assert encode(Message(Class.ERROR, txid, fingerprint=False))[:2] == b"\x01\x11"
    assert encode(Message(Class.INDICATION, txid, fingerprint=False))[:2] == b"\x00\x11"
    allocate = encode(Message(Class.REQUEST, txid, method=0x003, fingerprint=False))
    assert allocate[:2] == b"\x00\x03"
    high = encode(Message(Class.ERROR, txid, method=0xFFF, fingerprint=False))
    assert high[:2] == b"\x3f\xff"
    assert decode(high).method == 0xFFF and decode(high).cls is Class.ERROR


def test_stun_is_classified_as_stun_by_the_wire_module() -> None:
    data = encode(Message(Class.REQUEST, stun.new_transaction_id()))
    assert classify(data) is Kind.STUN
    assert stun.is_stun(data)
    assert not stun.is_stun(data[:-4])
    assert not stun.is_stun(b"\x45" + data[1:])  # top bits set: not STUN


def test_attributes_are_padded_to_four_bytes() -> None:
    data = encode(Message(Class.SUCCESS, bytes(12), (Software("abcde"),), fingerprint=False))
    assert len(data) == 20 + 4 + 8
    assert data[22:24] == b"\x00\x05"  # the length field counts the value, not the padding
    assert data[24:32] == b"abcde\x00\x00\x00"


def test_padding_bytes_may_be_anything() -> None:
    data = bytearray(
        encode(Message(Class.SUCCESS, bytes(12), (Software("ab"),), fingerprint=False))
    )
    data[26:28] = b"\xff\xfe"
    assert decode(bytes(data)).find(Software) == Software("ab")


def test_unknown_optional_attributes_are_skipped_required_ones_reported() -> None:
    txid = bytes(range(12))
    body = (
        struct.pack("!HH", 0x8FFF, 3) + b"abc\x00" + struct.pack("!HH", 0x7FFF, 2) + b"xy\x00\x00"
    )
    data = struct.pack("!HHI", 0x0001, len(body), stun.MAGIC_COOKIE) + txid + body
    msg = decode(data)
    assert msg.attributes == (Opaque(0x7FFF, b"xy"),)
    assert msg.unknown_required == (0x7FFF,)


def test_attributes_after_message_integrity_are_ignored() -> None:
    txid = bytes(12)
    msg = Message(
        Class.SUCCESS,
        txid,
        (Opaque(stun.MESSAGE_INTEGRITY, bytes(20)), Software("after")),
        fingerprint=True,
    )
    decoded = decode(encode(msg))
    assert decoded.attributes == (Opaque(stun.MESSAGE_INTEGRITY, bytes(20)),)
    assert decoded.fingerprint  # FINGERPRINT after it still counts (RFC 8489 §14.7)


def test_fingerprint_must_be_last() -> None:
    data = encode(Message(Class.REQUEST, bytes(12)))
    extra = struct.pack("!HH", stun.SOFTWARE, 4) + b"abcd"
    moved = bytearray(data + extra)
    moved[2:4] = struct.pack("!H", len(moved) - 20)
    with pytest.raises(StunError, match="last"):
        decode(bytes(moved))


@pytest.mark.parametrize(
    "data, why",
    [
        (b"", "shorter"),
        (b"\x00\x01\x00\x00" + b"\x00" * 16, "cookie"),
        (b"\xc0\x01\x00\x00\x21\x12\xa4\x42" + bytes(12), "top two bits"),
        (b"\x00\x01\x00\x02\x21\x12\xa4\x42" + bytes(14), "multiple of 4"),
        (b"\x00\x01\x00\x08\x21\x12\xa4\x42" + bytes(12), "length field"),
        (b"\x00\x01\x00\x04\x21\x12\xa4\x42" + bytes(12) + b"\x00\x01\x00\x08", "past the end"),
        (
            b"\x00\x01\x00\x0c\x21\x12\xa4\x42" + bytes(12) + b"\x00\x01\x00\x08" + bytes(8),
            "family",
        ),
        (b"\x00\x01\x00\x08\x21\x12\xa4\x42" + bytes(12) + b"\x00\x03\x00\x03abc\x00", "4 bytes"),
        (
            b"\x01\x11\x00\x08\x21\x12\xa4\x42" + bytes(12) + b"\x00\x09\x00\x04\x00\x00\x07\x00",
            "class",
        ),
        (b"\x01\x11\x00\x08\x21\x12\xa4\x42" + bytes(12) + b"\x00\x0a\x00\x03abc\x00", "odd"),
    ],
)
def test_malformed_messages_raise_stun_error(data: bytes, why: str) -> None:
    with pytest.raises(StunError, match=why):
        decode(data)


def test_encode_rejects_what_cannot_be_sent() -> None:
    txid = bytes(12)
    for attrs in (
        (Software("x" * 128),),
        (ErrorCode(299),),
        (ErrorCode(700),),
        (MappedAddress(("not an ip", 1)),),
        (MappedAddress(("192.0.2.1", 70000)),),
        (Opaque(stun.MAPPED_ADDRESS, b""),),  # has a typed form: would not round-trip
        (Padding(70000),),
    ):
        with pytest.raises(StunError):
            encode(Message(Class.SUCCESS, txid, attrs))
    with pytest.raises(StunError):
        encode(Message(Class.REQUEST, bytes(11)))
    with pytest.raises(StunError):
        encode(Message(Class.REQUEST, txid, (Padding(0xFFF8),)))  # over 64 KiB with header


def test_change_request_flags_and_response_port_layout() -> None:
    data = encode(
        Message(
            Class.REQUEST,
            bytes(12),
            (ChangeRequest(True, True), ResponsePort(4242)),
            fingerprint=False,
        )
    )
    assert data[20:28] == bytes.fromhex("0003000400000006")
    assert data[28:36] == bytes.fromhex("0027000210920000")
    only_port = ChangeRequest(change_port=True)
    assert encode(Message(Class.REQUEST, bytes(12), (only_port,), fingerprint=False))[27] == 0x02
    # A RESPONSE-PORT whose length counts its 2 bytes of padding is accepted too.
    header = struct.pack("!HHI", 0x0001, 8, stun.MAGIC_COOKIE) + bytes(12)
    four = header + bytes.fromhex("0027000410920000")
    assert decode(four).find(ResponsePort) == ResponsePort(4242)


def test_unmap_address_normalises_dual_stack_sources() -> None:
    assert stun.unmap_address(("::ffff:192.0.2.1", 5)) == ("192.0.2.1", 5)
    assert stun.unmap_address(("fe80::1%eth0", 5)) == ("fe80::1", 5)
    assert stun.unmap_address(("2001:DB8::0:1", 5)) == ("2001:db8::1", 5)
    with pytest.raises(StunError):
        stun.unmap_address(("example.org", 5))


# --- property tests -----------------------------------------------------------------------------

ports = st.integers(0, 0xFFFF)
addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), ports),
    st.tuples(st.ip_addresses(v=6).map(str), ports),
)
texts = st.text(max_size=127)
_TYPED_OR_INTEGRITY = {
    stun.MAPPED_ADDRESS,
    stun.XOR_MAPPED_ADDRESS,
    stun.RESPONSE_ORIGIN,
    stun.OTHER_ADDRESS,
    stun.SOURCE_ADDRESS,
    stun.CHANGED_ADDRESS,
    stun.SOFTWARE,
    stun.ERROR_CODE,
    stun.UNKNOWN_ATTRIBUTES,
    stun.PADDING,
    stun.CHANGE_REQUEST,
    stun.RESPONSE_PORT,
    stun.FINGERPRINT,
    stun.MESSAGE_INTEGRITY,
    stun.MESSAGE_INTEGRITY_SHA256,
}
opaque_types = st.integers(0, 0x7FFF).filter(lambda t: t not in _TYPED_OR_INTEGRITY)
attributes = st.one_of(
    addresses.map(MappedAddress),
    addresses.map(XorMappedAddress),
    addresses.map(ResponseOrigin),
    addresses.map(OtherAddress),
    addresses.map(SourceAddress),
    addresses.map(ChangedAddress),
    texts.map(Software),
    st.builds(ErrorCode, st.integers(300, 699), texts),
    st.lists(st.integers(0, 0xFFFF), max_size=8).map(lambda t: UnknownAttributes(tuple(t))),
    st.integers(0, 300).map(Padding),
    st.builds(ChangeRequest, st.booleans(), st.booleans()),
    ports.map(ResponsePort),
    st.builds(Opaque, opaque_types, st.binary(max_size=40)),
)
messages = st.builds(
    Message,
    st.sampled_from(Class),
    st.binary(min_size=12, max_size=12),
    st.lists(attributes, max_size=8).map(tuple),
    st.integers(0, 0xFFF),
    st.booleans(),
)


@given(messages)
def test_every_attribute_round_trips(msg: Message) -> None:
    assert decode(encode(msg)) == msg


def _only_stun_errors(data: bytes) -> None:
    with contextlib.suppress(StunError):  # anything else fails the test
        decode(data)


@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_stun_error(data: bytes) -> None:
    _only_stun_errors(data)


@given(
    st.binary(max_size=200).map(lambda b: b[: len(b) - len(b) % 4]),
    st.binary(min_size=14, max_size=14),
)
def test_arbitrary_attribute_bytes_raise_only_stun_error(body: bytes, head: bytes) -> None:
    # A valid header (cookie, length) in front of random attribute bytes reaches every parser.
    data = struct.pack(
        "!HHI", int.from_bytes(head[:2], "big") & 0x3FFF, len(body), stun.MAGIC_COOKIE
    )
    _only_stun_errors(data + head[2:14] + body)


@given(
    messages,
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    st.integers(0, 64),
)
def test_damaged_messages_raise_only_stun_error(
    msg: Message, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(encode(msg))
    for position, value in flips:
        data[position % len(data)] = value
    _only_stun_errors(bytes(data[: max(0, len(data) - cut)]))


# --- retransmission and the client transaction --------------------------------------------------


def _send_times(tx: BindingTransaction, start: float, limit: int = 50) -> tuple[list[float], float]:
    """Run a transaction nobody answers on a fake clock; (send times, time it failed)."""
    now, sent = start, []
    for _ in range(limit):
        if tx.datagrams_to_send(now):
            sent.append(now)
        if tx.done:
            return sent, now
        timer = tx.next_timer()
        assert timer is not None and timer >= now
        now = timer
    raise AssertionError("the transaction never ended")


def test_rfc8489_default_schedule() -> None:
    tx = BindingTransaction(("192.0.2.1", 3478), 100.0)
    sent, failed = _send_times(tx, 100.0)
    assert [round(t - 100, 3) for t in sent] == [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert failed == pytest.approx(139.5)
    assert tx.error is not None and tx.error.startswith("timeout") and tx.result is None


def test_short_schedule_for_netcheck() -> None:
    tx = BindingTransaction(("192.0.2.1", 3478), 0.0, rto=0.25, attempts=3, final_wait=1.0)
    sent, failed = _send_times(tx, 0.0)
    assert sent == [0, 0.25, 0.75]
    assert failed == pytest.approx(1.75)
    assert Retransmitter(0.0, rto=0.25, attempts=3, final_wait=1.0).total == pytest.approx(1.75)


def _answer(request: bytes, attrs: tuple[stun.Attribute, ...], cls: Class = Class.SUCCESS) -> bytes:
    return encode(Message(cls, decode(request).transaction_id, attrs))


def test_transaction_takes_the_xor_mapped_address_and_measures_rtt() -> None:
    tx = BindingTransaction(("192.0.2.1", 3478), 0.0)
    [(request, dest)] = tx.datagrams_to_send(0.0)
    assert dest == ("192.0.2.1", 3478)
    reply = _answer(
        request,
        (
            MappedAddress(("198.51.100.9", 1)),
            XorMappedAddress(("203.0.113.5", 40000)),
            OtherAddress(("192.0.2.2", 3479)),
            ResponseOrigin(("192.0.2.1", 3478)),
            Software("x"),
        ),
    )
    assert tx.receive(reply, ("192.0.2.1", 3478), 0.03)
    assert tx.done and tx.result is not None
    assert tx.result.mapped == ("203.0.113.5", 40000)
    assert tx.result.rtt == pytest.approx(0.03) and tx.result.transmissions == 1
    assert tx.result.other_address == ("192.0.2.2", 3479)
    assert tx.result.response_origin == ("192.0.2.1", 3478)
    assert tx.result.software == "x"
    assert tx.datagrams_to_send(5.0) == [] and tx.next_timer() is None
    assert tx.receive(reply, ("192.0.2.1", 3478), 0.04)  # a duplicate is still ours
    assert tx.result.rtt == pytest.approx(0.03)


def test_transaction_rtt_counts_from_the_latest_transmission() -> None:
    tx = BindingTransaction(("192.0.2.1", 3478), 0.0)
    [(request, _)] = tx.datagrams_to_send(0.0)
    assert tx.datagrams_to_send(0.5)
    tx.receive(_answer(request, (MappedAddress(("203.0.113.5", 1)),)), ("192.0.2.1", 3478), 0.6)
    assert tx.result is not None and tx.result.mapped == ("203.0.113.5", 1)
    assert tx.result.transmissions == 2 and tx.result.rtt == pytest.approx(0.1)


def test_transaction_ignores_other_transactions_and_requests() -> None:
    tx = BindingTransaction(("192.0.2.1", 3478), 0.0)
    [(request, _)] = tx.datagrams_to_send(0.0)
    other = encode(Message(Class.SUCCESS, bytes(12), (MappedAddress(("203.0.113.5", 1)),)))
    assert not tx.receive(other, ("192.0.2.1", 3478), 0.1)
    assert not tx.receive(request, ("203.0.113.5", 1), 0.1)  # our own request (hairpin)
    assert not tx.receive(b"garbage", ("192.0.2.1", 3478), 0.1)
    assert not tx.done


@pytest.mark.parametrize(
    "attrs, error",
    [
        ((), "without a mapped address"),
        ((XorMappedAddress(("203.0.113.5", 1)), Opaque(0x7ABC, b"")), "0x7abc"),
    ],
)
def test_unusable_success_responses_fail(attrs: tuple[stun.Attribute, ...], error: str) -> None:
    tx = BindingTransaction(("192.0.2.1", 3478), 0.0)
    [(request, _)] = tx.datagrams_to_send(0.0)
    assert tx.receive(_answer(request, attrs), ("192.0.2.1", 3478), 0.1)
    assert tx.result is None and tx.error is not None and error in tx.error


def test_error_response_fails_with_its_code() -> None:
    tx = BindingTransaction(("192.0.2.1", 3478), 0.0, pad_to=0)
    [(request, _)] = tx.datagrams_to_send(0.0)
    reply = _answer(
        request, (ErrorCode(420, "Unknown Attribute"), UnknownAttributes((3,))), Class.ERROR
    )
    assert tx.receive(reply, ("192.0.2.1", 3478), 0.1)
    assert tx.error_code == 420 and tx.error == "error 420 Unknown Attribute"


def test_requests_are_padded_and_retried_without_padding_when_refused() -> None:
    tx = BindingTransaction(("192.0.2.1", 3478), 0.0, pad_to=200)
    [(request, _)] = tx.datagrams_to_send(0.0)
    assert len(request) >= 200 and decode(request).find(Padding) is not None
    refusal = _answer(
        request, (ErrorCode(420, ""), UnknownAttributes((stun.PADDING,))), Class.ERROR
    )
    assert tx.receive(refusal, ("192.0.2.1", 3478), 0.1)
    assert not tx.done
    [(again, _)] = tx.datagrams_to_send(0.1)
    assert decode(again).find(Padding) is None and len(again) == 28
    assert decode(again).transaction_id != decode(request).transaction_id
    assert tx.receive(refusal, ("192.0.2.1", 3478), 0.2)  # the stale refusal, again: consumed
    assert not tx.done
    tx.receive(_answer(again, (XorMappedAddress(("203.0.113.5", 7)),)), ("192.0.2.1", 3478), 0.2)
    assert tx.result is not None and tx.result.mapped == ("203.0.113.5", 7)


def test_request_size_and_attributes() -> None:
    bare = BindingTransaction(("192.0.2.1", 3478), 0.0, pad_to=0).request
    assert len(bare) == 28 and decode(bare).fingerprint and decode(bare).attributes == ()
    tx = BindingTransaction(
        ("192.0.2.1", 3478), 0.0, change_ip=True, change_port=True, response_port=9, software="t"
    )
    msg = decode(tx.request)
    assert len(tx.request) == stun.DEFAULT_REQUEST_SIZE
    assert msg.find(ChangeRequest) == ChangeRequest(True, True)
    assert msg.find(ResponsePort) == ResponsePort(9)
    assert msg.find(Software) == Software("t")


# --- responder ----------------------------------------------------------------------------------

SRV, ALT = ("198.51.100.1", 3478), ("198.51.100.2", 3479)
CLIENT = ("203.0.113.5", 40000)


def _request(*attrs: stun.Attribute, pad_to: int = 0, fingerprint: bool = True) -> bytes:
    msg = Message(Class.REQUEST, stun.new_transaction_id(), attrs, fingerprint=fingerprint)
    size = len(encode(msg))
    if pad_to > size:
        msg = Message(
            Class.REQUEST,
            msg.transaction_id,
            (*attrs, Padding(max(0, pad_to - size - 4))),
            fingerprint=fingerprint,
        )
    return encode(msg)


def test_full_answer_in_rfc5780_mode() -> None:
    responder = StunResponder(primary=SRV, other=ALT)
    request = _request(pad_to=200)
    [(reply, dest, sender)] = responder.handle(request, CLIENT, SRV, 0.0)
    assert dest == CLIENT and sender == SRV
    msg = decode(reply)
    assert msg.cls is Class.SUCCESS and msg.transaction_id == decode(request).transaction_id
    assert msg.find(XorMappedAddress) == XorMappedAddress(CLIENT)
    assert msg.find(MappedAddress) == MappedAddress(CLIENT)
    assert msg.find(OtherAddress) == OtherAddress(ALT)
    assert msg.find(ResponseOrigin) == ResponseOrigin(SRV)
    assert msg.find(Software) == Software("lazycat")
    assert msg.fingerprint


def test_a_bare_request_gets_no_answer() -> None:
    responder = StunResponder()
    assert responder.handle(_request(fingerprint=False), CLIENT, SRV, 0.0) == []  # 20 bytes
    assert responder.handle(_request(), CLIENT, SRV, 0.0) == []  # 28 bytes < 32


@pytest.mark.parametrize(
    "size, present",
    [
        (32, {XorMappedAddress}),
        (44, {XorMappedAddress, OtherAddress}),
        (56, {XorMappedAddress, OtherAddress, ResponseOrigin}),
        (64, {XorMappedAddress, OtherAddress, ResponseOrigin, "fingerprint"}),
        (76, {XorMappedAddress, OtherAddress, ResponseOrigin, "fingerprint", MappedAddress}),
        (
            88,
            {
                XorMappedAddress,
                OtherAddress,
                ResponseOrigin,
                "fingerprint",
                MappedAddress,
                Software,
            },
        ),
    ],
)
def test_optional_attributes_are_dropped_to_fit(size: int, present: set[object]) -> None:
    responder = StunResponder(primary=SRV, other=ALT)
    request = _request(pad_to=size, fingerprint=False)
    assert len(request) == size
    [(reply, _, _)] = responder.handle(request, CLIENT, SRV, 0.0)
    assert len(reply) == size
    msg = decode(reply)
    found: set[object] = {type(a) for a in msg.attributes}
    if msg.fingerprint:
        found.add("fingerprint")
    assert found == present


def test_ipv6_answer_needs_a_bigger_request() -> None:
    responder = StunResponder()
    client6 = ("2001:db8::5", 40000)
    assert (
        responder.handle(_request(pad_to=40, fingerprint=False), client6, ("2001:db8::1", 3478), 0)
        == []
    )
    [(reply, _, _)] = responder.handle(
        _request(pad_to=44, fingerprint=False), client6, ("2001:db8::1", 3478), 0
    )
    assert decode(reply).mapped_address == client6


def test_dual_stack_sources_are_answered_as_ipv4() -> None:
    [(reply, dest, _)] = StunResponder().handle(
        _request(pad_to=100), ("::ffff:203.0.113.5", 40000), ("::", 3478), 0.0
    )
    assert decode(reply).mapped_address == CLIENT and dest == CLIENT


@pytest.mark.parametrize(
    "local, change, sender, other",
    [
        (SRV, ChangeRequest(True, True), ALT, ALT),
        (SRV, ChangeRequest(True, False), (ALT[0], SRV[1]), ALT),
        (SRV, ChangeRequest(False, True), (SRV[0], ALT[1]), ALT),
        (SRV, ChangeRequest(False, False), SRV, ALT),
        (ALT, ChangeRequest(True, True), SRV, SRV),
        ((SRV[0], ALT[1]), ChangeRequest(True, False), ALT, (ALT[0], SRV[1])),
        ((ALT[0], SRV[1]), ChangeRequest(False, True), ALT, (SRV[0], ALT[1])),
    ],
)
def test_change_request_moves_the_answer(
    local: stun.Address, change: ChangeRequest, sender: stun.Address, other: stun.Address
) -> None:
    responder = StunResponder(primary=SRV, other=ALT)
    assert local in responder.local_addresses()
    [(reply, dest, frm)] = responder.handle(_request(change, pad_to=120), CLIENT, local, 0.0)
    assert frm == sender and dest == CLIENT
    msg = decode(reply)
    assert msg.find(ResponseOrigin) == ResponseOrigin(sender)
    assert msg.find(OtherAddress) == OtherAddress(other)


def test_change_request_without_a_second_address_is_unknown() -> None:
    [(reply, dest, frm)] = StunResponder().handle(
        _request(ChangeRequest(True, True), pad_to=100), CLIENT, SRV, 0.0
    )
    msg = decode(reply)
    assert (dest, frm) == (CLIENT, SRV)
    assert msg.cls is Class.ERROR and msg.find(ErrorCode) == ErrorCode(420, "Unknown Attribute")
    assert msg.find(UnknownAttributes) == UnknownAttributes((stun.CHANGE_REQUEST,))
    # ... and too small a request for that error gets nothing at all.
    assert StunResponder().handle(_request(ChangeRequest(True, True)), CLIENT, SRV, 0.0) == []


def test_unknown_required_attributes_get_420_optional_ones_are_ignored() -> None:
    responder = StunResponder()
    [(reply, _, _)] = responder.handle(_request(Opaque(0x7777, b"x"), pad_to=100), CLIENT, SRV, 0)
    assert decode(reply).find(UnknownAttributes) == UnknownAttributes((0x7777,))
    optional = encode(Message(Class.REQUEST, bytes(12), (Padding(80),)))
    with_optional = bytearray(optional[:-8])
    with_optional += struct.pack("!HH", 0x8FFF, 4) + b"abcd"
    with_optional[2:4] = struct.pack("!H", len(with_optional) - 20)
    [(reply, _, _)] = responder.handle(bytes(with_optional), CLIENT, SRV, 0)
    assert decode(reply).cls is Class.SUCCESS


def test_response_port_redirects_the_answer() -> None:
    [(_, dest, _)] = StunResponder().handle(
        _request(ResponsePort(5555), pad_to=100), CLIENT, SRV, 0
    )
    assert dest == (CLIENT[0], 5555)
    assert StunResponder().handle(_request(ResponsePort(0), pad_to=100), CLIENT, SRV, 0) == []


@pytest.mark.parametrize(
    "data",
    [
        encode(Message(Class.INDICATION, bytes(12), (Padding(100),))),
        encode(Message(Class.SUCCESS, bytes(12), (Padding(100),))),
        encode(Message(Class.REQUEST, bytes(12), (Padding(100),), method=0x003)),
        b"\x00\x01" + bytes(120),
        b"",
    ],
)
def test_only_binding_requests_are_answered(data: bytes) -> None:
    assert StunResponder().handle(data, CLIENT, SRV, 0.0) == []


def test_rate_limit_per_source_ip() -> None:
    responder = StunResponder(rate=2.0, burst=3.0)
    request = _request(pad_to=100)
    answered = [bool(responder.handle(request, CLIENT, SRV, 0.0)) for _ in range(5)]
    assert answered == [True, True, True, False, False]
    assert responder.handle(request, ("203.0.113.6", 1), SRV, 0.0)  # another source: its own bucket
    assert responder.handle(request, (CLIENT[0], 1), SRV, 0.0) == []  # same IP, other port
    assert responder.handle(request, CLIENT, SRV, 0.5)  # one token back after 0.5 s at 2/s
    assert responder.handle(request, CLIENT, SRV, 0.5) == []


def test_rfc5780_configuration_is_checked() -> None:
    with pytest.raises(ValueError):
        StunResponder(primary=SRV)
    with pytest.raises(ValueError):
        StunResponder(primary=SRV, other=(SRV[0], 3479))
    with pytest.raises(ValueError):
        StunResponder(primary=SRV, other=("2001:db8::1", 3479))


def test_a_request_to_an_unknown_local_address_gets_no_rfc5780_attributes() -> None:
    [(reply, _, frm)] = StunResponder(primary=SRV, other=ALT).handle(
        _request(pad_to=120), CLIENT, ("198.51.100.3", 3478), 0.0
    )
    msg = decode(reply)
    assert frm == ("198.51.100.3", 3478) and msg.find(OtherAddress) is None


requests = st.builds(
    lambda attrs, pad, fp: _request(*attrs, pad_to=pad, fingerprint=fp),
    st.lists(attributes, max_size=4),
    st.integers(0, 160),
    st.booleans(),
)
client_addresses = st.one_of(st.just(CLIENT), st.just(("2001:db8::5", 1)), addresses)


@settings(max_examples=300)
@given(
    st.one_of(st.binary(max_size=200), requests),
    client_addresses,
    st.sampled_from([SRV, ALT, (SRV[0], ALT[1]), (ALT[0], SRV[1])]),
)
def test_replies_are_never_larger_than_the_request(
    data: bytes, source: stun.Address, local: stun.Address
) -> None:
    responder = StunResponder(primary=SRV, other=ALT, rate=1e9, burst=1e9)
    for reply, _, _ in responder.handle(data, source, local, 0.0):
        assert len(reply) <= len(data)
        decode(reply)  # and always well-formed
