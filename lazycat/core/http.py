from django.contrib.auth.models import User
from django.http import HttpRequest


class AuthedHttpRequest(HttpRequest):
    """The request every console view gets: LoginRequiredMiddleware has let only users in."""

    user: User
