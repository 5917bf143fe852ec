from django.apps import AppConfig


class ServicesConfig(AppConfig):
    name = "lazycat.services"
    label = "services"
