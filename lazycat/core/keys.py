"""The box's static X25519 key pair.

The private key is generated once and kept in a 0600 file in the data directory; it is never
shown, logged or stored in the database. Only the public key (and its fingerprint) go anywhere.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


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
        raise KeyFileError(f"cannot read the box key {path}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"the box key {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )
    if len(data) != 32:
        raise KeyFileError(f"the box key {path} is damaged ({len(data)} bytes, expected 32)")
    return data


def load_or_create(path: Path) -> tuple[bytes, bytes]:
    """(private, public) from `path`, creating the key pair atomically if there is none."""
    private = X25519PrivateKey.generate().private_bytes_raw()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        private = load_private_key(path)
    else:
        with os.fdopen(fd, "wb") as fh:
            fh.write(private)
    return private, _public(private)
