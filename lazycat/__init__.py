"""lazycat: the box's network console (Django + Channels + Celery)."""

from lazycat.celery import app as celery_app

__all__ = ("celery_app",)
