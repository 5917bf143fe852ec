"""Console-wide request handling: the first-run redirect and the Content-Security-Policy."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.urls import reverse

from lazycat.core.models import Box

access_log = logging.getLogger("lazycat.access")
# Polled by supervisors and monitors every few seconds: logged only when they fail.
QUIET_PATHS = frozenset({"/healthz", "/readyz"})

# Everything the console needs comes from this origin: no inline script, no eval (htmx runs
# with allowEval off), styles from our own stylesheet; the browser socket is same-origin.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)


class RequestLogMiddleware:
    """One structured log line per request (the web server's own access log is off), and
    ``Server-Timing: app;dur=<ms>``: how long the view and its template took, shown in the
    browser's devtools and read by the benchmarks. Paths never carry secrets: pairing secrets
    travel only in response bodies."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        started = time.perf_counter()
        response = self.get_response(request)
        ms = (time.perf_counter() - started) * 1000
        response.headers["Server-Timing"] = f"app;dur={ms:.1f}"
        if request.path not in QUIET_PATHS or response.status_code >= 400:
            access_log.info(
                "request",
                extra={
                    "method": request.method,
                    "path": request.path,
                    "status": response.status_code,
                    "ms": round(ms, 1),
                    "client": request.META.get("REMOTE_ADDR", ""),
                },
            )
        return response


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        return response


class SetupRequiredMiddleware:
    """Until the box has a name and an owner, every page leads to the setup page.

    Once set up, the setup page is gone for good (it would otherwise let anyone who reaches the
    console create a second owner). Checked against the database only until it is set up.
    """

    EXEMPT_PREFIXES = ("/setup/", "/static/", "/healthz", "/readyz", "/metrics")

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.set_up = False

    def __call__(self, request: HttpRequest) -> HttpResponse:
        # Exempt paths first: /healthz must answer without touching the database.
        if request.path.startswith(self.EXEMPT_PREFIXES):
            return self.get_response(request)
        if not self.set_up:
            self.set_up = Box.objects.exists()
        if not self.set_up:
            return redirect(reverse("core:setup"))
        return self.get_response(request)
