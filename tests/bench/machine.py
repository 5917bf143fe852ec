"""What every benchmark prints first: the machine its figures were measured on."""

from __future__ import annotations

import contextlib
import os
import platform
from importlib.metadata import version
from pathlib import Path


def describe(*packages: str) -> str:
    """Host, CPU model, cores, Python and kernel, then the versions of `packages`."""
    cpu = "unknown cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    parts = [
        platform.node(),
        cpu,
        f"{os.cpu_count()} cores",
        f"Python {platform.python_version()}",
        f"{platform.system()} {platform.release()}",
        *(f"{name} {version(name)}" for name in packages),
    ]
    return " · ".join(parts)
