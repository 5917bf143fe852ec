"""``python -m lazycat.tunnel``: transportd in the foreground (what ``lazycat up`` starts)."""

from __future__ import annotations

import asyncio
import os
import sys


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lazycat.settings")
    import django
    from django.core.exceptions import ImproperlyConfigured

    try:
        django.setup()
    except ImproperlyConfigured as exc:
        print(f"transportd: {exc}", file=sys.stderr)
        return 2
    from lazycat.tunnel.daemon import run

    try:
        import uvloop
    except ImportError:
        asyncio.run(run())
    else:
        uvloop.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
