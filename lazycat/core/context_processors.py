from __future__ import annotations

from django.http import HttpRequest

from lazycat.core.models import Box


def box(request: HttpRequest) -> dict[str, object]:
    """The box on every page (its name is in the header)."""
    if not hasattr(request, "_lazycat_box"):
        request._lazycat_box = Box.get()  # type: ignore[attr-defined]
    return {"box": request._lazycat_box}  # type: ignore[attr-defined]
