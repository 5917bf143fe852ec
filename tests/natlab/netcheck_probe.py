"""Run our netcheck (``transport.netcheck_aio.run_netcheck``) in a lab namespace, print JSON.

``python netcheck_probe.py SERVER_IP:PORT [...]`` prints ``{"nat_type": ..., "ipv4": {...},
"report": <NetcheckReport.to_json()>}``. Bounded by netcheck's own timers (under 6 s) and a
20 s guard.
"""

from __future__ import annotations

import asyncio
import json
import sys

from transport.netcheck_aio import run_netcheck


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def main(servers: list[str]) -> None:
    report = await asyncio.wait_for(run_netcheck([_addr(s) for s in servers]), 20)
    print(json.dumps({"nat_type": report.nat_type, "report": report.to_json()}, default=str))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
