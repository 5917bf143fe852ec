"""A second process acting as the tunnel daemon for the services browser test, against the
box's data: it approves a device the way the console would and reports service usage the way
transportd does (``lazycat.services.live.report_usage``).

    services_process.py device <name>                  -> prints the device's overlay address
    services_process.py usage <service> [<device> ...] -> reports those devices using it
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lazycat.settings")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import django

django.setup()

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402

from lazycat.core.models import Box  # noqa: E402
from lazycat.devices import actions  # noqa: E402
from lazycat.devices.models import Device  # noqa: E402
from lazycat.services.live import report_usage  # noqa: E402
from lazycat.services.models import Service  # noqa: E402


def main(argv: list[str]) -> int:
    if argv[:1] == ["device"] and len(argv) == 2:
        box = Box.get()
        assert box is not None
        owner = get_user_model().objects.get(username="owner")
        _, bundle = actions.do_create_pairing_code(box, owner)
        public = (
            X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        )
        outcome = actions.do_request_pairing(
            bundle.secret, public, actions.DeviceFacts(name=argv[1]), "198.51.100.20"
        )
        assert outcome.device is not None, outcome.refusal
        print(actions.do_approve_device(outcome.device, owner).overlay_address)
        return 0
    if argv[:1] == ["usage"] and len(argv) >= 2:
        service = Service.objects.get(name=argv[1])
        devices = Device.objects.filter(name__in=argv[2:])
        report_usage({service.overlay_address: [str(d.overlay_address) for d in devices]})
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
