"""Settings: every variable is documented, and bad values stop the box with a clear message."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_every_variable_settings_reads_is_documented():
    source = (ROOT / "lazycat/settings.py").read_text()
    read = set(re.findall(r'_env(?:_bool|_int|_secret)?\("([A-Z_]+)"', source))
    assert {"LAZYCAT_DATA_DIR", "DATABASE_URL", "REDIS_URL", "LAZYCAT_RELAYS"} <= read
    documented = (ROOT / "deploy/lazycat.env.example").read_text()
    missing = sorted(
        name for name in read if not re.search(rf"^#?\s*{name}[=\s]", documented, re.M)
    )
    assert not missing, f"deploy/lazycat.env.example does not document {missing}"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("LAZYCAT_LISTEN", "8470", "LAZYCAT_LISTEN='8470': expected host:port"),
        ("LAZYCAT_DEBUG", "maybe", "LAZYCAT_DEBUG='maybe': expected true or false"),
        ("LAZYCAT_PAIRING_TTL", "5", "LAZYCAT_PAIRING_TTL=5: expected 60..604800"),
        ("REDIS_URL", "http://x", "REDIS_URL='http://x': expected redis://"),
        ("LAZYCAT_RELAYS", "eu=relay.example", "LAZYCAT_RELAYS: relay eu"),
        ("LAZYCAT_SECRET_KEY_FILE", "/nonexistent/key", "LAZYCAT_SECRET_KEY_FILE=/nonexistent/key"),
        ("LAZYCAT_CONTROL_PORT", "8470", "LAZYCAT_CONTROL_PORT=8470 is the console's port"),
    ],
)
def test_bad_value_names_the_variable(tmp_path, name, value, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAZYCAT_", "REDIS_URL"))}
    env |= {"LAZYCAT_DATA_DIR": str(tmp_path), name: value}
    result = subprocess.run(
        [sys.executable, "-m", "lazycat.cli", "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
