"""The box's keys: its static X25519 key pair (its identity, pinned by every device) and its
Ed25519 ticket key (signs the tickets relays admit devices by, transport.tickets).

Each private key is generated once and kept in a 0600 file in the data directory; it is never
shown, logged or stored in the database. Only public halves (and fingerprints) go anywhere.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from transport.tickets import TicketKey


class KeyFileError(RuntimeError):
    pass


def _public(private: bytes) -> bytes:
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


def load_private_key(path: Path) -> bytes:
    """Read the private key, refusing a file that others can read."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read the key {path}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"the key {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )
    if len(data) != 32:
        raise KeyFileError(f"the key {path} is damaged ({len(data)} bytes, expected 32)")
    return data


def _load_or_create_private(path: Path, fresh: bytes) -> bytes:
    """The 32 private bytes in `path`, writing `fresh` there first (atomically, 0600) if the
    file does not exist yet."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_private_key(path)
    with os.fdopen(fd, "wb") as fh:
        fh.write(fresh)
    return fresh


def load_or_create(path: Path) -> tuple[bytes, bytes]:
    """(private, public) X25519 from `path`, creating the key pair if there is none."""
    private = _load_or_create_private(path, X25519PrivateKey.generate().private_bytes_raw())
    return private, _public(private)


def load_or_create_ticket_key(path: Path) -> TicketKey:
    """The box's Ed25519 ticket key from `path`, creating it if there is none."""
    return TicketKey.from_private_bytes(
        _load_or_create_private(path, TicketKey.generate().private_bytes())
    )
