from __future__ import annotations

from datetime import datetime, timedelta

from django import forms
from django.db.models import Q, QuerySet
from django.utils import timezone

from lazycat.devices.models import Device, DeviceStatus, PathKind

EXPIRY_CHOICES = [
    ("", "Never"),
    ("3600", "In 1 hour"),
    ("86400", "In 1 day"),
    ("604800", "In 7 days"),
    ("2592000", "In 30 days"),
]


class ApproveForm(forms.Form):
    expires_in = forms.ChoiceField(choices=EXPIRY_CHOICES, required=False, label="Access ends")

    def expires_at(self) -> datetime | None:
        seconds = self.cleaned_data.get("expires_in")
        return timezone.now() + timedelta(seconds=int(seconds)) if seconds else None


class NoteForm(forms.Form):
    note = forms.CharField(max_length=500, required=False, label="Note (kept in the audit log)")


class RenameForm(forms.Form):
    name = forms.CharField(max_length=100)


class DeviceFilterForm(forms.Form):
    q = forms.CharField(required=False, label="Search", max_length=100)
    status = forms.ChoiceField(
        required=False,
        choices=[
            ("", "Any status"),
            *[(s.value, s.label) for s in DeviceStatus if s.value != "pending"],
        ],
    )
    path = forms.ChoiceField(
        required=False,
        choices=[
            ("", "Any path"),
            ("direct", "Direct"),
            ("relay", "Relayed"),
            ("offline", "Offline"),
        ],
    )

    def filter(self, devices: QuerySet[Device]) -> QuerySet[Device]:
        q, status, path = (self.cleaned_data.get(k) for k in ("q", "status", "path"))
        if q:
            devices = devices.filter(
                Q(name__icontains=q)
                | Q(label__icontains=q)
                | Q(overlay_address__icontains=q)
                | Q(os__icontains=q)
                | Q(model__icontains=q)
                | Q(endpoint__icontains=q)
            )
        if status:
            devices = devices.filter(status=status)
        if path == "direct":
            devices = devices.exclude(path__in=[PathKind.RELAY, PathKind.OFFLINE])
        elif path:
            devices = devices.filter(path=path)
        return devices
