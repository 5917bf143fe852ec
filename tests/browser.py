"""Debian's chromium for the browser tests and benchmarks, driven by Playwright (no download)."""

from __future__ import annotations

import stat
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_in_namespace(ns: str, where: Path) -> str:
    """An executable (for Playwright's ``executable_path``) that runs chromium inside network
    namespace ``ns``: a lab box's console listens on that namespace's 127.0.0.1."""
    wrapper = where / f"chromium-in-{ns}"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {ns} {CHROMIUM} "$@"\n')
    wrapper.chmod(stat.S_IRWXU)
    return str(wrapper)
