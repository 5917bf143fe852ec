"""Service pages: the list of what the box exposes, add, edit, delete and "check again"."""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from lazycat.core.http import AuthedHttpRequest
from lazycat.core.models import Box
from lazycat.services import actions
from lazycat.services.forms import ServiceForm
from lazycat.services.live import annotate_usage
from lazycat.services.models import Service


@require_GET
def service_list(request: AuthedHttpRequest) -> HttpResponse:
    services = list(Service.objects.prefetch_related("allowed_devices"))
    annotate_usage(services)
    return render(request, "services/list.html", {"services": services})


@require_http_methods(["GET", "POST"])
def service_edit(request: AuthedHttpRequest, pk: int | None = None) -> HttpResponse:
    service = get_object_or_404(Service, pk=pk) if pk is not None else None
    form = ServiceForm(request.POST or None, instance=service)
    if request.method == "POST" and form.is_valid():
        saved = actions.do_save_service(form, request.user)
        box = Box.get()
        where = f"{saved.name}.{box.fqdn}" if box else saved.name
        messages.success(
            request, f"{where} is saved. The box is checking that it can reach the target."
        )
        return redirect("services:list")
    return render(request, "services/edit.html", {"form": form, "service": service})


@require_POST
def service_check(request: AuthedHttpRequest, pk: int) -> HttpResponse:
    """ "Check again": queue a reachability check. htmx gets the row back marked "checking…";
    the verdict follows by the console push."""
    service = get_object_or_404(Service.objects.prefetch_related("allowed_devices"), pk=pk)
    actions.do_request_check(service)
    if request.headers.get("HX-Request"):
        annotate_usage([service])
        partial = "_check.html" if request.POST.get("from") == "edit" else "_row.html"
        return render(request, f"services/{partial}", {"service": service})
    messages.info(request, f"Checking {service.name}; its row updates in a few seconds.")
    if request.POST.get("from") == "edit":
        return redirect("services:edit", pk=pk)
    return redirect("services:list")


@require_POST
def service_delete(request: AuthedHttpRequest, pk: int) -> HttpResponse:
    service = get_object_or_404(Service, pk=pk)
    actions.do_delete_service(service, request.user)
    if request.headers.get("HX-Request"):
        return HttpResponse("")  # htmx swaps the row out; other consoles get the push
    messages.success(request, f"{service.name} is no longer exposed.")
    return redirect("services:list")
