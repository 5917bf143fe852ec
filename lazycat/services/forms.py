"""The service form: every rule a service must satisfy, with messages that say what to fix."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

from django import forms

from lazycat.core.models import Box
from lazycat.devices.models import Device, DeviceStatus
from lazycat.services.models import Service, ServiceKind
from transport import names
from transport.addressing import OVERLAY
from transport.ports import PortPolicy, PortPolicyError


class ServiceForm(forms.ModelForm):
    ports = forms.CharField(
        initial="all",
        required=False,  # a VM left empty means all ports (clean); other kinds must say
        help_text=(
            "e.g. 'tcp 22, 80, 8000-8100; udp 53', or 'all' for every TCP and UDP port. "
            "A developer VM left empty gets all ports."
        ),
    )
    exclude_ports = forms.CharField(
        required=False, help_text="Ports to leave out of the above, same syntax: 'tcp 8050'."
    )
    allowed_devices = forms.ModelMultipleChoiceField(
        queryset=Device.objects.filter(status=DeviceStatus.APPROVED),
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="Used when access is limited to chosen devices.",
    )

    class Meta:
        model = Service
        fields = [
            "kind",
            "name",
            "target",
            "ports",
            "exclude_ports",
            "access_all",
            "allowed_devices",
        ]
        labels = {
            "access_all": "All approved devices may reach it",
            "target": "Target address",
        }
        help_texts = {
            "kind": (
                "Store app or developer app: a program on the box or its LAN, usually a few "
                "ports. Developer VM: a whole machine, exposed on all ports unless you say "
                "otherwise."
            ),
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields[
            "target"
        ].help_text = (
            "Where the service listens on the box's LAN, IPv4 or IPv6 (e.g. 192.168.1.20)."
        )
        box = Box.get()
        self.fields["name"].help_text = (
            f"Devices reach it as NAME.{box.fqdn}." if box else "Letters, digits and hyphens."
        )

    def clean_name(self) -> str:
        try:
            label = names.validate_label(self.cleaned_data["name"])
        except names.InvalidName as exc:
            raise forms.ValidationError(str(exc)) from None
        others = Service.objects.filter(name=label)
        if self.instance.pk:
            others = others.exclude(pk=self.instance.pk)
        if others.exists():
            raise forms.ValidationError(f"A service is already called {label}.")
        if Device.objects.filter(label=label).exists():
            box = Box.get()
            where = names.host_fqdn(label, box.name) if box else label
            raise forms.ValidationError(
                f"A device is already called {label} ({where}): choose another name or rename "
                "the device."
            )
        return label

    def clean_target(self) -> str:
        raw = str(self.cleaned_data["target"])
        address = ip_address(raw)
        if address.is_unspecified or address.is_multicast:
            raise forms.ValidationError(f"{raw} cannot be a service address.")
        if address.version == 6 and address.is_link_local:
            raise forms.ValidationError(
                f"{raw} is link-local: it means nothing without an interface. Give the "
                "target's global or unique-local IPv6 address, or its IPv4 address."
            )
        if address.version == 6 and address in OVERLAY:
            raise forms.ValidationError(
                f"{raw} is an overlay address; give the service's address on the box's LAN."
            )
        return str(address)

    def _check_loopback_ports(self, data: dict[str, Any], policy: PortPolicy) -> None:
        """A target on the box itself with every port would also expose every service that
        listens only on the box's loopback (databases, admin sockets): name the app's ports."""
        target = data.get("target")
        if target and ip_address(target).is_loopback and policy.allow_text == "all":
            self.add_error(
                "ports",
                f"{target} is the box itself: 'all' would also expose everything that listens "
                "only on the box's loopback. List this app's ports, e.g. 'tcp 8080'.",
            )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        ports, exclude = data.get("ports"), data.get("exclude_ports") or ""
        if ports is not None and not ports.strip():
            if data.get("kind") == ServiceKind.VM:
                ports = "all"  # a developer VM is exposed whole unless the owner narrows it
            else:
                self.add_error(
                    "ports", "List the ports to expose, e.g. 'tcp 80, 443', or write 'all'."
                )
                ports = None
        if ports is not None:
            # Parsed twice so each message lands under the field that has the problem.
            try:
                PortPolicy.parse(ports)
                try:
                    policy = PortPolicy.parse(ports, exclude)
                except PortPolicyError as exc:
                    self.add_error("exclude_ports", str(exc))
                else:
                    data["ports"], data["exclude_ports"] = policy.allow_text, policy.exclude_text
                    self._check_loopback_ports(data, policy)
            except PortPolicyError as exc:
                self.add_error("ports", str(exc))
        if data.get("access_all") is False and not data.get("allowed_devices"):
            self.add_error(
                "allowed_devices",
                "Choose at least one device, or let all approved devices reach it.",
            )
        return data
