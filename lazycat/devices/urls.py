from django.urls import path

from lazycat.devices import views

app_name = "devices"
urlpatterns = [
    path("", views.device_list, name="list"),
    path("pair/", views.pair, name="pair"),
    path("<int:pk>/", views.device_detail, name="detail"),
    path("<int:pk>/approve/", views.approve, name="approve"),
    path("<int:pk>/reject/", views.reject, name="reject"),
    path("<int:pk>/revoke/", views.revoke, name="revoke"),
    path("<int:pk>/rename/", views.rename, name="rename"),
]
