"""Our RFC 5780 STUN server (``transport.stun_aio.serve``) on the lab's relay host.

``python stun_server.py A_IP:PORT B_IP:PORT`` binds the four sockets of an RFC 5780 server
(both IPs x both ports), prints ``ready`` and serves until killed. Run in the relay namespace
by ``tests/natlab/lab.py`` with the repository on ``PYTHONPATH``.
"""

from __future__ import annotations

import asyncio
import sys

from transport.stun_aio import serve


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def main(primary: str, other: str) -> None:
    # The lab's netchecks come from many sites at once: no rate limit worth hitting.
    server = await serve(_addr(primary), other=_addr(other), rate=1000.0, burst=1000.0)
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        server.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
