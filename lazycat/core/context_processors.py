from __future__ import annotations

from django.http import HttpRequest

from lazycat.core.models import Box


def box(request: HttpRequest) -> dict[str, object]:
    """The box on every page (its name is in the header)."""
    return {"box": Box.get()}
