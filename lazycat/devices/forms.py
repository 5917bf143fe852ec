from __future__ import annotations

from datetime import datetime, timedelta

from django import forms
from django.utils import timezone

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
