from django.urls import include, path

urlpatterns = [
    path("", include("lazycat.core.urls")),
    path("devices/", include("lazycat.devices.urls")),
    path("services/", include("lazycat.services.urls")),
]
