"""Relay tickets: a box's signed permission for a client to reach it through a relay.

A relay forwards a client's datagrams to a box only if the client has shown it a ticket the box
signed (ARCHITECTURE.md, "The wire": the relay "admits a client only with a ticket the box
issued"). The ticket's layout is :class:`transport.wire.Ticket`::

    +--------------+----------------+-------------------+-------------------------------------+
    | box id (16)  | client id (16) | expires (8, unix) | Ed25519 signature (64) over         |
    |              | zeros = any    | seconds, BE       | "lazycat tkt" | the first 40 bytes  |
    +--------------+----------------+-------------------+-------------------------------------+

The signing key is the box's **ticket key**, an Ed25519 key (RFC 8032) kept apart from its X25519
static key: the relay learns the ticket key's public half when the box registers, and a ticket
key can be rotated without touching the identity devices pinned. The prefix keeps a ticket
signature from ever being valid as a signature over anything else the key might sign.

A ticket naming :data:`transport.wire.ANY_CLIENT` is a **pairing ticket**: it lets a device that
has no approved key yet reach the box to pair. Anyone who reads it off a pairing code can use
it, so it must be short-lived: :meth:`TicketKey.issue` refuses one that lasts longer than
:data:`PAIRING_TICKET_MAX_LIFETIME`, and :func:`verify_ticket` rejects one whose expiry lies
further ahead than that (plus clock skew), whatever its signature.

Times here are **wall-clock** unix seconds (tickets cross machines); the caller passes them in.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from transport.wire import ANY_CLIENT, KEY_LEN, PEER_ID_LEN, Ticket

SIGNATURE_LEN = 64
# A pairing ticket (ANY_CLIENT) is printed in a pairing code that anyone nearby may read.
PAIRING_TICKET_MAX_LIFETIME = 3600
# How far a box's clock may run ahead of a relay's before its pairing tickets look too long.
CLOCK_SKEW = 300
# A device ticket is renewed by the box while the device is connected; a year bounds a mistake.
TICKET_MAX_LIFETIME = 366 * 86400


class TicketError(ValueError):
    """A ticket that cannot be issued (bad arguments); the message says which."""


class TicketKey:
    """The box's private Ed25519 ticket key. Only the box holds it; relays get the public half."""

    __slots__ = ("_private", "_public")

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self._public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> TicketKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> TicketKey:
        """From the 32-byte raw seed (RFC 8032 sec. 5.1.5) that :meth:`private_bytes` gives."""
        if len(data) != KEY_LEN:
            raise TicketError("an Ed25519 private key is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(data))

    def private_bytes(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def public_bytes(self) -> bytes:
        """The 32 bytes a box puts in its REGISTER frame's ticket-key field."""
        return self._public

    def issue(self, box_id: bytes, client_id: bytes, expires: int, *, now_wall: int) -> Ticket:
        """A signed ticket letting ``client_id`` (or anyone, with ANY_CLIENT) reach ``box_id``
        until ``expires`` (unix seconds)."""
        if len(box_id) != PEER_ID_LEN or len(client_id) != PEER_ID_LEN:
            raise TicketError("box and client ids are 16 bytes (wire.peer_id)")
        if box_id == ANY_CLIENT:
            raise TicketError("a ticket names its box")
        if not now_wall < expires < 2**63:
            raise TicketError("a ticket expires in the future")
        limit = PAIRING_TICKET_MAX_LIFETIME if client_id == ANY_CLIENT else TICKET_MAX_LIFETIME
        if expires - now_wall > limit:
            kind = "a pairing ticket (any client)" if client_id == ANY_CLIENT else "a ticket"
            raise TicketError(f"{kind} may last at most {limit} s")
        unsigned = Ticket(box_id, client_id, expires)
        return Ticket(box_id, client_id, expires, self._private.sign(unsigned.signed_message()))


def verify_ticket(ticket: Ticket, box_ticket_public: bytes, now_wall: float) -> str | None:
    """``None`` if ``ticket`` is valid at ``now_wall`` under the box's ticket key, else why not.

    Checks the cheap things first (expiry, the pairing-ticket lifetime) so a relay spends an
    Ed25519 verification only on a ticket that could be good.
    """
    if len(box_ticket_public) != KEY_LEN or not any(box_ticket_public):
        return "the box has no ticket key"
    if len(ticket.signature) != SIGNATURE_LEN:
        return "malformed signature"
    if ticket.expires <= now_wall:
        return "ticket expired"
    if ticket.client == ANY_CLIENT and (
        ticket.expires > now_wall + PAIRING_TICKET_MAX_LIFETIME + CLOCK_SKEW
    ):
        return "pairing ticket lasts too long"
    try:
        public = Ed25519PublicKey.from_public_bytes(box_ticket_public)
        public.verify(ticket.signature, ticket.signed_message())
    except (InvalidSignature, ValueError):
        return "bad signature"
    return None
