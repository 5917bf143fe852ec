"""The overlay addressing scheme: where boxes, devices and services live in ``fc03:1136:3800::/40``.

This is a contract for the whole product (box, clients, console); ``docs/addressing.md`` explains
it with a worked example that a unit test pins. An overlay address, bit by bit::

     0                 40                   64            80                              127
    +------------------+--------------------+-------------+-------------------------------+
    |  fc03:1136:38    |  box index (24)    |  role (16)  |  subject hash (48)            |
    +------------------+--------------------+-------------+-------------------------------+
    |<-- OVERLAY /40 ->|<- from box key --->|<---------- interface identifier (64) ------->|
    |<--------------- box prefix /64 ------>|

* **Box index** (bits 40-63): ``H = BLAKE2b(box_key, digest_size=8, person=b"lazycat/box/v1")``,
  ``index = H mod (2**24 - 1) + 1`` with ``H`` read big-endian. Index 0 never comes out: its /64,
  ``fc03:1136:3800::/64``, is client-local infrastructure (``RESOLVER`` = ``fc03:1136:3800::1``
  answers ``heiyu.space`` names in TUN mode).
* **Role** (bits 64-79): 0x0000 box infrastructure (``<prefix>::1`` is the box itself), 0x0001 a
  device, 0x0002 a service. Derived addresses never carry role 0, so they can never be ``::``,
  ``::1`` or any other infrastructure address of the box.
* **Subject hash** (bits 80-127): the first 48 bits (big-endian) of ``BLAKE2b(role as 2 bytes
  big-endian || attempt as 1 byte || box_key || subject, digest_size=6, person=b"lazycat/iid/v1")``
  where the subject is a device's 32-byte public key, or a service's stable id (a UUID string chosen
  when the service is created) encoded as UTF-8. Every field before the subject has a fixed width,
  so the input encoding is unambiguous.
* **Collisions**: attempt 0 first; while the address is in ``taken`` try attempt 1, 2…; after
  ``MAX_ATTEMPTS`` raise :class:`AddressExhausted`.

Why: an address depends only on keys and ids that do not change when a device or service is renamed
or a device pairs again, so it is stable; anyone holding the box key can recompute and check it; and
the box key in the hash makes a device's addresses under two different boxes unrelated.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Container
from ipaddress import IPv4Address, IPv6Address, IPv6Network

OVERLAY = IPv6Network("fc03:1136:3800::/40")
# Index 0 of the box-index space: addresses a client answers for itself, never routed to a box.
CLIENT_LOCAL = IPv6Network("fc03:1136:3800::/64")
RESOLVER = IPv6Address("fc03:1136:3800::1")

KEY_LENGTH = 32  # an X25519 public key (RFC 7748 section 5)
MAX_ATTEMPTS = 64

_INDEX_BITS = 24
_SUBJECT_BITS = 48
_BOX_PERSON = b"lazycat/box/v1"  # BLAKE2 personalisation = domain separation (RFC 7693 sec. 2.8)
_IID_PERSON = b"lazycat/iid/v1"


class Role(enum.IntEnum):
    """The tag in the top 16 bits of an overlay interface identifier."""

    INFRA = 0x0000
    DEVICE = 0x0001
    SERVICE = 0x0002


class AddressExhausted(RuntimeError):
    """Every attempt gave an address that is already taken; ``taken`` is likely wrong."""


def _check_key(key: bytes, what: str) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_LENGTH:
        got = f"{len(key)} bytes" if isinstance(key, bytes) else type(key).__name__
        raise ValueError(f"{what} must be exactly {KEY_LENGTH} bytes (got {got})")


def box_index(box_key: bytes) -> int:
    """The box's 24-bit index (1 … 2**24 - 1) derived from its 32-byte static public key."""
    _check_key(box_key, "the box public key")
    digest = hashlib.blake2b(box_key, digest_size=8, person=_BOX_PERSON).digest()
    return _index_from_hash(int.from_bytes(digest, "big"))


def _index_from_hash(value: int) -> int:
    # Reduce modulo 2**24 - 1 and add one, so index 0 (client-local) is skipped deterministically;
    # with a 64-bit hash the bias this introduces is below 2**-40.
    return value % ((1 << _INDEX_BITS) - 1) + 1


def box_prefix(box_key: bytes) -> IPv6Network:
    """The /64 the box owns, e.g. ``fc03:1136:38ab:cdef::/64``."""
    base = int(OVERLAY.network_address) | (box_index(box_key) << 64)
    return IPv6Network((base, 64))


def _check_box_prefix(prefix: IPv6Network) -> None:
    if prefix.prefixlen != 64 or not prefix.subnet_of(OVERLAY) or prefix == CLIENT_LOCAL:
        raise ValueError(
            f"{prefix} is not a box prefix: expected a /64 inside {OVERLAY}, not index 0"
        )


def box_address(prefix: IPv6Network) -> IPv6Address:
    """The box's own overlay address, ``<prefix>::1``."""
    _check_box_prefix(prefix)
    return prefix.network_address + 1


def _derive(
    role: Role, box_key: bytes, subject: bytes, taken: Container[IPv6Address]
) -> IPv6Address:
    """The first address for (role, box, subject) that is not in ``taken``; see the module doc."""
    prefix = int(box_prefix(box_key).network_address)
    for attempt in range(MAX_ATTEMPTS):
        data = role.to_bytes(2, "big") + attempt.to_bytes(1, "big") + box_key + subject
        digest = hashlib.blake2b(data, digest_size=_SUBJECT_BITS // 8, person=_IID_PERSON).digest()
        address = IPv6Address(prefix | (role << _SUBJECT_BITS) | int.from_bytes(digest, "big"))
        if address not in taken:
            return address
    raise AddressExhausted(
        f"no free {role.name.lower()} address after {MAX_ATTEMPTS} attempts; "
        "check what is passed as taken"
    )


def device_address(
    box_key: bytes, device_key: bytes, *, taken: Container[IPv6Address]
) -> IPv6Address:
    """A device's overlay address in the box's /64.

    ``box_key`` and ``device_key`` are 32-byte X25519 public keys. ``taken`` holds the addresses
    already given to other devices and services of this box (not this device's own address, or a
    re-derivation would move it). Store the result: after a collision it also depends on history.
    """
    _check_key(box_key, "the box public key")
    _check_key(device_key, "the device public key")
    return _derive(Role.DEVICE, box_key, device_key, taken)


def service_address(
    box_key: bytes, service_id: str, *, taken: Container[IPv6Address]
) -> IPv6Address:
    """A service's overlay address in the box's /64.

    ``service_id`` is the service's stable id chosen at creation (lazycat uses ``str(uuid4())``);
    it must never change, so renaming the service keeps its address. ``taken`` is as for
    :func:`device_address`.
    """
    _check_key(box_key, "the box public key")
    if not isinstance(service_id, str) or not service_id:
        raise ValueError("the service id must be a non-empty string")
    return _derive(Role.SERVICE, box_key, service_id.encode("utf-8"), taken)


def is_overlay(address: IPv4Address | IPv6Address) -> bool:
    """True when ``address`` is inside ``fc03:1136:3800::/40``."""
    return isinstance(address, IPv6Address) and address in OVERLAY


def in_box_prefix(address: IPv4Address | IPv6Address, prefix: IPv6Network) -> bool:
    """True when ``address`` is inside the box prefix ``prefix``."""
    _check_box_prefix(prefix)
    return isinstance(address, IPv6Address) and address in prefix


def role_of(address: IPv4Address | IPv6Address) -> Role | None:
    """The role tag of an overlay address; None outside the overlay or for an unknown tag."""
    if not is_overlay(address):
        return None
    tag = (int(address) >> 48) & 0xFFFF
    try:
        return Role(tag)
    except ValueError:
        return None
