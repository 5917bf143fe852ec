"""The console's box-wide pages: setup, dashboard, audit log, settings, and health endpoints."""

from __future__ import annotations

import hmac

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_not_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lazycat.core import actions, health, push, tasks
from lazycat.core.forms import BoxSettingsForm, SetupForm
from lazycat.core.http import AuthedHttpRequest
from lazycat.core.metrics import registry
from lazycat.core.models import AuditEvent, Box
from lazycat.core.paging import paginate
from lazycat.devices.models import Device, DeviceStatus, PathKind
from lazycat.services.models import Service


def client_address(request: HttpRequest) -> str:
    return str(request.META.get("REMOTE_ADDR", ""))[:64]


@login_not_required
@never_cache
@require_http_methods(["GET", "POST"])
def setup(request: HttpRequest) -> HttpResponse:
    if Box.objects.exists():
        # Set up once, for good: a second owner can only be made by the first.
        raise Http404("This box is already set up.")
    form = SetupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            actions.do_setup_box(
                form.cleaned_data["box_name"],
                form.cleaned_data["username"],
                form.cleaned_data["password"],
                source=client_address(request),
            )
        except actions.SetupError as exc:
            form.add_error(None, str(exc))
        else:
            from django.contrib.auth import authenticate

            user = authenticate(
                request,
                username=form.cleaned_data["username"],
                password=form.cleaned_data["password"],
            )
            if user is not None:
                login(request, user)
            messages.success(request, "Your box is ready. Add your first device.")
            return redirect("core:dashboard")
    return render(request, "core/setup.html", {"form": form})


def dashboard(request: AuthedHttpRequest) -> HttpResponse:
    approved = Device.objects.filter(status=DeviceStatus.APPROVED)
    context = {
        "pending": list(Device.objects.pending()),
        "counts": {
            "approved": approved.count(),
            "direct": approved.exclude(path__in=[PathKind.OFFLINE, PathKind.RELAY]).count(),
            "relay": approved.filter(path=PathKind.RELAY).count(),
            "offline": approved.filter(path=PathKind.OFFLINE).count(),
        },
        "services": Service.objects.count(),
        "recent": AuditEvent.objects.select_related(None)[:8],
        **push.netcheck_context(),
    }
    return render(request, "core/dashboard.html", context)


@require_POST
def check_network(request: AuthedHttpRequest) -> HttpResponse:
    """ "Check now": queue the box's netcheck. The result reaches the card by the console push
    (a run takes a few seconds); htmx gets the card back marked as checking."""
    if not settings.LAZYCAT_RELAYS:
        messages.error(request, "No relay is configured: set LAZYCAT_RELAYS to check the network.")
        return redirect("core:dashboard")
    tasks.check_box_network.delay()
    if request.headers.get("HX-Request"):
        return render(request, "core/_netcheck.html", {**push.netcheck_context(), "checking": True})
    messages.info(request, "Checking the box's network; the card updates in a few seconds.")
    return redirect("core:dashboard")


@require_GET
def audit_log(request: AuthedHttpRequest) -> HttpResponse:
    events = AuditEvent.objects.all()
    action = request.GET.get("action", "").strip()
    if action:
        events = events.filter(action__startswith=action)
    actions_seen = AuditEvent.objects.values_list("action", flat=True).distinct().order_by()
    return render(
        request,
        "core/audit.html",
        {"action": action, "actions": sorted(set(actions_seen)), **paginate(request, events, 50)},
    )


@require_http_methods(["GET", "POST"])
def box_settings(request: AuthedHttpRequest) -> HttpResponse:
    box = Box.get()
    assert box is not None  # SetupRequiredMiddleware
    form = BoxSettingsForm(
        request.POST or None, initial={"accept_without_code": box.accept_without_code}
    )
    if request.method == "POST" and form.is_valid():
        actions.do_set_accept_without_code(
            box,
            form.cleaned_data["accept_without_code"],
            request.user,
        )
        messages.success(request, "Settings saved.")
        return redirect("core:settings")
    return render(
        request,
        "core/settings.html",
        {"form": form, "relays": settings.LAZYCAT_RELAYS, "data_dir": settings.DATA_DIR},
    )


@login_not_required
@never_cache
@require_GET
def healthz(request: HttpRequest) -> HttpResponse:
    """Liveness: the process answers. No dependencies, so a Redis outage doesn't restart us."""
    return JsonResponse({"ok": True})


@login_not_required
@never_cache
@require_GET
def readyz(request: HttpRequest) -> HttpResponse:
    checks = health.run_all()
    ok = all(c["ok"] for c in checks.values())
    return JsonResponse({"ok": ok, "checks": checks}, status=200 if ok else 503)


@login_not_required
@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus metrics, only with ``Authorization: Bearer <LAZYCAT_METRICS_KEY>``."""
    key = settings.LAZYCAT_METRICS_KEY
    if not key:
        return HttpResponse(
            "metrics are off: set LAZYCAT_METRICS_KEY\n", status=404, content_type="text/plain"
        )
    auth = request.headers.get("Authorization", "")
    given = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
    if not hmac.compare_digest(given.encode(), key.encode()):
        response = HttpResponse(
            "send the metrics key as: Authorization: Bearer <key>\n",
            status=401,
            content_type="text/plain",
        )
        response["WWW-Authenticate"] = 'Bearer realm="lazycat metrics"'
        return response
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
