"""Device pages: the list with its approval inbox, one device, pairing, and decisions."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import segno
from django.conf import settings
from django.contrib import messages
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from lazycat.core.http import AuthedHttpRequest
from lazycat.core.models import AuditEvent, Box, BoxNetcheck
from lazycat.core.paging import paginate
from lazycat.devices import actions, push
from lazycat.devices.forms import ApproveForm, DeviceFilterForm, NoteForm, RenameForm
from lazycat.devices.models import Device, direct_share


def _box() -> Box:
    box = Box.get()
    assert box is not None  # SetupRequiredMiddleware guarantees it
    return box


PAGE_SIZE = 100


@require_GET
def device_list(request: AuthedHttpRequest) -> HttpResponse:
    """Approved and decided devices, 100 a page, searchable; the approval inbox on top."""
    form = DeviceFilterForm(request.GET or None)
    devices = form.filter(Device.objects.listed()) if form.is_valid() else Device.objects.listed()
    paging = paginate(request, devices, PAGE_SIZE)
    return render(
        request,
        "devices/list.html",
        {
            "pending": list(Device.objects.pending()),
            "devices": paging["page"].object_list,
            "filter_form": form,
            **paging,
        },
    )


@require_GET
def device_detail(request: AuthedHttpRequest, pk: int) -> HttpResponse:
    device = get_object_or_404(Device, pk=pk)
    share = direct_share(device, timezone.now(), timedelta(hours=24))
    return render(
        request,
        "devices/detail.html",
        {
            "device": device,
            "events": device.path_events.all()[: push.TIMELINE_LENGTH],
            "direct_share": share,
            "relay_reasons": device.relay_reasons(BoxNetcheck.objects.latest_run()),
            "approve_form": ApproveForm(),
            "rename_form": RenameForm(initial={"name": device.name}),
            "note_form": NoteForm(),
            "audit": device_audit(device),
        },
    )


def device_audit(device: Device) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(target_type="device", target_id=str(device.pk))[:20])


@never_cache
@require_http_methods(["GET", "POST"])
def pair(request: AuthedHttpRequest) -> HttpResponse:
    """GET explains; POST makes a new one-time code and shows it once (it is stored hashed, so
    it cannot be shown again: a reload asks for a new one)."""
    if request.method == "GET":
        return render(request, "devices/pair.html", {})
    if not settings.LAZYCAT_RELAYS and not actions.box_lan_addresses():
        # Without a relay and without a LAN address a device has no way to reach the box.
        messages.error(
            request,
            "No relay is configured, so a device would have no way to reach the box. "
            "Set LAZYCAT_RELAYS (see deploy/lazycat.env.example) and restart lazycat.",
        )
        return redirect("devices:pair")
    code, bundle = actions.do_create_pairing_code(_box(), request.user)
    text = bundle.to_text()
    qr = segno.make(text, error="m").svg_inline(scale=4, border=2, dark="#14213d")
    return render(
        request,
        "devices/pair.html",
        {"code": code, "bundle": bundle, "text": text, "qr": qr},
    )


def _after_decision(request: AuthedHttpRequest, device: Device) -> HttpResponse:
    """htmx asked: answer with the fresh inbox (the push brings it too, to every console).
    A plain form goes back where it came from (the list or the device page)."""
    if request.headers.get("HX-Request"):
        return render(request, "devices/_inbox.html", {"pending": list(Device.objects.pending())})
    target = request.POST.get("next", "")
    if url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        return redirect(target)
    return redirect("devices:detail", pk=device.pk)


def _decision(
    request: AuthedHttpRequest, pk: int, decide: Callable[[Device], Device], success: str
) -> HttpResponse:
    device = get_object_or_404(Device, pk=pk)
    try:
        device = decide(device)
    except actions.DecisionError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, success.format(name=device.name))
    return _after_decision(request, device)


@require_POST
def approve(request: AuthedHttpRequest, pk: int) -> HttpResponse:
    form = ApproveForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose when access ends, or Never.")
        return redirect("devices:detail", pk=pk)
    return _decision(
        request,
        pk,
        lambda d: actions.do_approve_device(d, request.user, form.expires_at()),
        "{name} is approved.",
    )


@require_POST
def reject(request: AuthedHttpRequest, pk: int) -> HttpResponse:
    form = NoteForm(request.POST)
    note = form.cleaned_data["note"] if form.is_valid() else ""
    return _decision(
        request,
        pk,
        lambda d: actions.do_reject_device(d, request.user, note),
        "{name} is rejected.",
    )


@require_POST
def revoke(request: AuthedHttpRequest, pk: int) -> HttpResponse:
    form = NoteForm(request.POST)
    note = form.cleaned_data["note"] if form.is_valid() else ""
    return _decision(
        request,
        pk,
        lambda d: actions.do_revoke_device(d, request.user, note),
        "{name} is revoked; its tunnel is closed.",
    )


@require_POST
def rename(request: AuthedHttpRequest, pk: int) -> HttpResponse:
    form = RenameForm(request.POST)
    if not form.is_valid():
        messages.error(request, "A name is 1 to 100 characters.")
        return redirect("devices:detail", pk=pk)
    return _decision(
        request,
        pk,
        lambda d: actions.do_rename_device(d, request.user, form.cleaned_data["name"]),
        "Renamed to {name}.",
    )
