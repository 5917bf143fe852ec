import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport import wire
from transport.tickets import (
    CLOCK_SKEW,
    PAIRING_TICKET_MAX_LIFETIME,
    TicketError,
    TicketKey,
    verify_ticket,
)
from transport.wire import ANY_CLIENT, Ticket

NOW = 1_767_225_600
BOX = bytes(range(16))
CLIENT = bytes(range(16, 32))


def test_issued_ticket_verifies_and_round_trips_through_its_encoding() -> None:
    key = TicketKey.generate()
    ticket = key.issue(BOX, CLIENT, NOW + 3600, now_wall=NOW)
    decoded = Ticket.decode(ticket.encode())
    assert decoded == ticket
    assert verify_ticket(decoded, key.public_bytes(), NOW) is None


def test_key_survives_its_private_bytes() -> None:
    key = TicketKey.generate()
    again = TicketKey.from_private_bytes(key.private_bytes())
    assert again.public_bytes() == key.public_bytes()
    ticket = again.issue(BOX, CLIENT, NOW + 60, now_wall=NOW)
    assert verify_ticket(ticket, key.public_bytes(), NOW) is None


def test_rfc8032_test_vector_1_public_key() -> None:
    # RFC 8032 sec. 7.1, TEST 1: the raw seed gives this public key.
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    public = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    assert TicketKey.from_private_bytes(seed).public_bytes().hex() == public


def test_expired_ticket_is_refused() -> None:
    key = TicketKey.generate()
    ticket = key.issue(BOX, CLIENT, NOW + 10, now_wall=NOW)
    assert verify_ticket(ticket, key.public_bytes(), NOW + 10) == "ticket expired"
    assert verify_ticket(ticket, key.public_bytes(), NOW + 9.5) is None


def test_ticket_signed_by_another_key_is_refused() -> None:
    ticket = TicketKey.generate().issue(BOX, CLIENT, NOW + 60, now_wall=NOW)
    assert verify_ticket(ticket, TicketKey.generate().public_bytes(), NOW) == "bad signature"


@pytest.mark.parametrize("field", ["box", "client", "expires"])
def test_changing_any_signed_field_breaks_the_signature(field: str) -> None:
    key = TicketKey.generate()
    ticket = key.issue(BOX, CLIENT, NOW + 60, now_wall=NOW)
    changes: dict[str, object] = {
        "box": bytes(15) + b"\x01",
        "client": ANY_CLIENT,
        "expires": NOW + 61,
    }
    forged = Ticket(**{**_fields(ticket), field: changes[field]})  # type: ignore[arg-type]
    assert verify_ticket(forged, key.public_bytes(), NOW) == "bad signature"


def _fields(ticket: Ticket) -> dict[str, object]:
    return {
        "box": ticket.box,
        "client": ticket.client,
        "expires": ticket.expires,
        "signature": ticket.signature,
    }


def test_pairing_ticket_must_be_short_lived() -> None:
    key = TicketKey.generate()
    with pytest.raises(TicketError, match="pairing ticket"):
        key.issue(BOX, ANY_CLIENT, NOW + PAIRING_TICKET_MAX_LIFETIME + 1, now_wall=NOW)
    ok = key.issue(BOX, ANY_CLIENT, NOW + PAIRING_TICKET_MAX_LIFETIME, now_wall=NOW)
    assert verify_ticket(ok, key.public_bytes(), NOW) is None


def test_verifier_refuses_a_long_pairing_ticket_even_if_signed() -> None:
    """A box with a broken clock (or a bug) must not hand out a pairing ticket for a day."""
    key = TicketKey.generate()
    far = NOW + 86400
    ticket = key.issue(BOX, ANY_CLIENT, far, now_wall=far - 60)  # the box thinks it is short
    assert verify_ticket(ticket, key.public_bytes(), NOW) == "pairing ticket lasts too long"
    skewed = key.issue(
        BOX, ANY_CLIENT, NOW + PAIRING_TICKET_MAX_LIFETIME + CLOCK_SKEW, now_wall=NOW + CLOCK_SKEW
    )
    assert verify_ticket(skewed, key.public_bytes(), NOW) is None


def test_box_without_ticket_key_accepts_nothing() -> None:
    ticket = TicketKey.generate().issue(BOX, CLIENT, NOW + 60, now_wall=NOW)
    assert verify_ticket(ticket, bytes(32), NOW) == "the box has no ticket key"


@pytest.mark.parametrize(
    ("box", "client", "expires"),
    [
        (bytes(15), CLIENT, NOW + 60),
        (BOX, bytes(17), NOW + 60),
        (ANY_CLIENT, CLIENT, NOW + 60),
        (BOX, CLIENT, NOW),
    ],
)
def test_issue_refuses_bad_arguments(box: bytes, client: bytes, expires: int) -> None:
    with pytest.raises(TicketError):
        TicketKey.generate().issue(box, client, expires, now_wall=NOW)


def test_from_private_bytes_wants_32_bytes() -> None:
    with pytest.raises(TicketError):
        TicketKey.from_private_bytes(bytes(31))


@given(
    st.binary(min_size=wire.TICKET_LEN, max_size=wire.TICKET_LEN),
    st.binary(min_size=32, max_size=32),
    st.floats(min_value=0, max_value=2.0**64),
)
def test_verify_never_raises_on_arbitrary_tickets(data: bytes, public: bytes, now: float) -> None:
    ticket = Ticket.decode(data)
    assert isinstance(verify_ticket(ticket, public, now), str | None)
