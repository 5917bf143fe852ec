"""Service pages: the list of what the box exposes, add, edit and delete."""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from lazycat.core.http import AuthedHttpRequest
from lazycat.core.models import Box
from lazycat.services import actions
from lazycat.services.forms import ServiceForm
from lazycat.services.models import Service


@require_GET
def service_list(request: AuthedHttpRequest) -> HttpResponse:
    services = Service.objects.prefetch_related("allowed_devices")
    return render(request, "services/list.html", {"services": services})


@require_http_methods(["GET", "POST"])
def service_edit(request: AuthedHttpRequest, pk: int | None = None) -> HttpResponse:
    service = get_object_or_404(Service, pk=pk) if pk is not None else None
    form = ServiceForm(request.POST or None, instance=service)
    if request.method == "POST" and form.is_valid():
        saved = actions.do_save_service(form, request.user)
        box = Box.get()
        where = f"{saved.name}.{box.fqdn}" if box else saved.name
        messages.success(request, f"{where} is saved.")
        return redirect("services:list")
    return render(request, "services/edit.html", {"form": form, "service": service})


@require_POST
def service_delete(request: AuthedHttpRequest, pk: int) -> HttpResponse:
    service = get_object_or_404(Service, pk=pk)
    actions.do_delete_service(service, request.user)
    messages.success(request, f"{service.name} is no longer exposed.")
    return redirect("services:list")
