from django.apps import AppConfig


class DevicesConfig(AppConfig):
    name = "lazycat.devices"
    label = "devices"
