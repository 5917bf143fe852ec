"""The Celery application: negotiation and periodic jobs. Tasks are thin; logic lives in actions."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lazycat.settings")

app = Celery("lazycat")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
