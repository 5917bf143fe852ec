"""A second process acting as the device side and as the tunnel daemon, against the box's data.

Until the tunnel exists, this calls the same service functions the tunnel daemon will call:
``do_request_pairing`` when a device asks to pair, ``do_report_path`` when its path changes.

    device_process.py pair '<code text>' <name>   -> prints the public key (hex), commit time
    device_process.py path <public key hex> relay|direct|offline
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lazycat.settings")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import django

django.setup()

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402
from django.utils import timezone  # noqa: E402

from lazycat.devices.actions import (  # noqa: E402
    DeviceFacts,
    PathReport,
    do_report_path,
    do_request_pairing,
)
from lazycat.devices.models import PathKind  # noqa: E402
from transport.bundle import PairingBundle  # noqa: E402

PATHS = {
    "relay": PathReport(PathKind.RELAY, relay="home", rtt_ms=42.0, cause="session started"),
    "direct": PathReport(
        PathKind.DIRECT_V4, endpoint="198.51.100.20:41641", rtt_ms=6.5, cause="punched"
    ),
    "offline": PathReport(PathKind.OFFLINE, cause="session closed"),
}


def main(argv: list[str]) -> int:
    if argv[:1] == ["pair"] and len(argv) == 3:
        bundle = PairingBundle.parse(argv[1])
        public = (
            X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        )
        facts = DeviceFacts(name=argv[2], os="Linux", model="Test rig", client_version="0.1.0")
        outcome = do_request_pairing(bundle.secret, public, facts, "198.51.100.20")
        if not outcome.accepted:
            print(f"refused: {outcome.refusal}", file=sys.stderr)
            return 1
        # The commit time, so the test can time the push against the browser's clock.
        print(public.hex(), f"{time.time():.6f}")
        return 0
    if argv[:1] == ["path"] and len(argv) == 3 and argv[2] in PATHS:
        report = PATHS[argv[2]]
        if report.path != PathKind.OFFLINE:
            report = PathReport(**{**report.__dict__, "last_handshake": timezone.now()})
        device = do_report_path(bytes.fromhex(argv[1]), report)
        return 0 if device is not None else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
