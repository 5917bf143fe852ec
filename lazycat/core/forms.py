from __future__ import annotations

from typing import Any

from django import forms
from django.contrib.auth import password_validation
from django.contrib.auth.models import User

from transport import names


class SetupForm(forms.Form):
    box_name = forms.CharField(
        max_length=63,
        help_text="Letters, digits and hyphens; the box becomes NAME.heiyu.space.",
        widget=forms.TextInput(attrs={"autofocus": True, "autocomplete": "off"}),
    )
    username = forms.CharField(max_length=150, label="Owner user name")
    password = forms.CharField(widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}))
    password_again = forms.CharField(
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"})
    )

    def clean_box_name(self) -> str:
        try:
            return names.validate_label(self.cleaned_data["box_name"])
        except names.InvalidName as exc:
            raise forms.ValidationError(str(exc)) from None

    def clean_username(self) -> str:
        username: str = self.cleaned_data["username"].strip()
        User.username_validator(username)
        return username

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        password, again = data.get("password"), data.get("password_again")
        if password and again and password != again:
            self.add_error("password_again", "The two passwords differ.")
        elif password:
            try:
                password_validation.validate_password(
                    password, User(username=data.get("username", ""))
                )
            except forms.ValidationError as exc:
                self.add_error("password", exc)
        return data


class BoxSettingsForm(forms.Form):
    accept_without_code = forms.BooleanField(
        required=False,
        label="Accept pairing requests without a code",
        help_text="They still wait for your approval. Off is safer: only people you gave a "
        "code to can ask.",
    )
