"""Failover in the simulator: how long path death and recovery take, at several heartbeat phases.

Runs the in-memory NAT lab of tests/transport/test_nat_matrix.py (NAT3 x NAT3, real Noise
sessions and relay, fake clock), blocks the direct path at five phases of the 1 s heartbeat,
unblocks it 15 s later, and prints, for each side: the time from the block to the move to the
relay, the longest silence in the 20 packet/s stream, and the time from the unblock to direct.

    .venv/bin/python tests/bench/failover_sim.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

from tests.transport.test_nat_matrix import (
    BOX_PUBLIC,
    CLIENT_PUBLIC,
    arrivals,
    direct_lab,
    longest_gap,
)
from transport import natsim

PHASES = (0.0, 0.2, 0.4, 0.6, 0.8)


def main() -> int:
    fallback, silence, recovery = [], [], []
    for phase in PHASES:
        lab = direct_lab(natsim.NAT3, natsim.NAT3)
        block = 10.0 + phase
        lab.net.run_until(block)
        lab.net.block(CLIENT_PUBLIC, BOX_PUBLIC)
        unblock = block + 15.0
        lab.net.run_until(unblock)
        lab.net.unblock(CLIENT_PUBLIC, BOX_PUBLIC)
        lab.net.run_until(unblock + 25.0)
        for node in (lab.client, lab.box):
            changes = [(t, c) for t, c in node.paths() if t > block]
            fallback.append(next(t for t, c in changes if c.kind == "relay") - block)
            recovery.append(next(t for t, c in changes if t > unblock) - unblock)
            silence.append(longest_gap(arrivals(node, after=5)))
    print(f"NAT3 x NAT3 in natsim, block at {len(PHASES)} heartbeat phases, both sides:")
    for name, values in (
        ("block -> relay", fallback),
        ("longest silence", silence),
        ("unblock -> direct", recovery),
    ):
        print(f"  {name:18} {min(values):.2f}-{max(values):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
