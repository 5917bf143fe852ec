from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "lazycat.core"
    label = "core"
    verbose_name = "Box"
