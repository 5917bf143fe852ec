"""What ``lazycat-client`` keeps on disk, in one per-user directory.

``$XDG_CONFIG_HOME/lazycat-client/`` (else ``~/.config/lazycat-client/``; ``--config-dir``
overrides), mode 0700; every file 0600, written to a temporary file and renamed, so a reader
never sees half a file::

    device.key    the device's X25519 private key, base64 (made on first use, never sent)
    box.json      after an approved pairing: the box's name, key and relays, our overlay
                  address, the tickets for its relays, the DNS records
    state.json    while ``up`` runs: its pid, the path (direct/relay, endpoint, RTT), bytes,
                  NAT type; rewritten every second, removed when it stops
    up.pid        the pid of the running ``up`` (``down`` signals it)
    up.log        what a ``--background`` ``up`` prints

No Django, no clock reads beyond what the caller passes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

from transport.bundle import Relay
from transport.session import Keys

__all__ = ["APP_DIR", "ClientConfig", "ConfigError", "Paired", "default_dir"]

APP_DIR = "lazycat-client"


class ConfigError(Exception):
    """A file in the config directory that cannot be used; the message says what to do."""


def default_dir(environ: Mapping[str, str]) -> Path:
    """``$XDG_CONFIG_HOME/lazycat-client``, else ``$HOME/.config/lazycat-client`` (XDG Base
    Directory Specification: a relative XDG_CONFIG_HOME is ignored)."""
    xdg = environ.get("XDG_CONFIG_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / APP_DIR
    home = environ.get("HOME") or str(Path.home())
    return Path(home) / ".config" / APP_DIR


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, length: int | None, what: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise ConfigError(f"{what} is not valid base64") from None
    if length is not None and len(data) != length:
        raise ConfigError(f"{what} must be {length} bytes")
    return data


@dataclass
class Paired:
    """The outcome of an approved pairing (``box.json``)."""

    box: str
    box_key: bytes
    address: IPv6Address
    relays: list[Relay]
    tickets: list[bytes] = field(default_factory=list)
    records: dict[str, list[IPv6Address]] = field(default_factory=dict)
    lan: list[tuple[str, int]] = field(default_factory=list)
    paired_at: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "box": self.box,
            "box_key": _b64(self.box_key),
            "address": str(self.address),
            "relays": [{"name": r.name, "host": r.host, "port": r.port} for r in self.relays],
            "tickets": [_b64(t) for t in self.tickets],
            "records": {k: [str(a) for a in v] for k, v in self.records.items()},
            "lan": [[host, port] for host, port in self.lan],
            "paired_at": self.paired_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Paired:
        try:
            return cls(
                box=str(data["box"]),
                box_key=_unb64(data["box_key"], 32, "the box key"),
                address=IPv6Address(data["address"]),
                relays=[Relay(r["name"], r["host"], int(r["port"])) for r in data["relays"]],
                tickets=[_unb64(t, None, "a ticket") for t in data.get("tickets", [])],
                records={
                    str(k): [IPv6Address(a) for a in v] for k, v in data.get("records", {}).items()
                },
                lan=[(str(h), int(p)) for h, p in data.get("lan", [])],
                paired_at=int(data.get("paired_at", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"box.json is damaged ({exc}): pair again") from None


class ClientConfig:
    """The config directory. Every write keeps it 0700 and its files 0600."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # -- files --
    @property
    def key_file(self) -> Path:
        return self.path / "device.key"

    @property
    def box_file(self) -> Path:
        return self.path / "box.json"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def pid_file(self) -> Path:
        return self.path / "up.pid"

    @property
    def log_file(self) -> Path:
        return self.path / "up.log"

    def ensure(self) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(self.path.stat().st_mode) != 0o700:
            os.chmod(self.path, 0o700)

    def write(self, path: Path, data: bytes) -> None:
        """Atomically replace ``path`` with ``data``, mode 0600."""
        self.ensure()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def remove(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    # -- the device key --
    def load_or_create_key(self) -> Keys:
        if self.key_file.exists():
            return self.load_key()
        keys = Keys.generate()
        self.write(self.key_file, (_b64(keys.private) + "\n").encode())
        return keys

    def load_key(self) -> Keys:
        try:
            text = self.key_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {self.key_file}: {exc.strerror}") from None
        return Keys.from_private(_unb64(text, 32, f"{self.key_file}"))

    # -- the box --
    def load_box(self) -> Paired | None:
        try:
            raw = self.box_file.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read {self.box_file}: {exc.strerror}") from None
        try:
            data = json.loads(raw)
        except ValueError:
            raise ConfigError(f"{self.box_file} is not JSON: pair again") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{self.box_file} is damaged: pair again")
        return Paired.from_json(data)

    def save_box(self, paired: Paired) -> None:
        self.write(self.box_file, json.dumps(paired.to_json(), indent=2).encode() + b"\n")

    # -- the running `up` --
    def save_state(self, state: dict[str, Any]) -> None:
        self.write(self.state_file, json.dumps(state, indent=2).encode() + b"\n")

    def load_state(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def running_pid(self) -> int | None:
        """The pid in ``up.pid`` if that process is alive, else None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid  # alive, another user's (root's `up`, read by the user)
        return pid
