from django.urls import path

from lazycat.services import views

app_name = "services"
urlpatterns = [
    path("", views.service_list, name="list"),
    path("add/", views.service_edit, name="add"),
    path("<int:pk>/", views.service_edit, name="edit"),
    path("<int:pk>/delete/", views.service_delete, name="delete"),
    path("<int:pk>/check/", views.service_check, name="check"),
]
