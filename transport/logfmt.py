"""Structured log lines on stdout: logfmt (``ts=… level=… logger=… msg="…" key=value``).

One formatter for every lazycat process — the console's (Django's LOGGING names it), the relay,
the tunnel daemon and the client — so their logs read and parse alike. Fields passed with
``extra=`` become keys. A key that could carry a secret is never printed: its value is replaced.
"""

from __future__ import annotations

import logging
import time

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_SECRET_WORDS = ("secret", "password", "key", "token", "session", "cookie")


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def quote(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\n\t'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={quote(record.getMessage())}",
        ]
        for key, value in vars(record).items():
            if key in _STANDARD or key.startswith("_"):
                continue
            parts.append(f"{key}={'[redacted]' if _is_secret(key) else quote(value)}")
        if record.exc_info:
            parts.append(f"exc={quote(self.formatException(record.exc_info))}")
        return " ".join(parts)
