"""The Celery queue as the tests see it: the real Redis broker the test session runs."""

from __future__ import annotations

from lazycat.celery import app as celery_app


def queued_task_names() -> list[str]:
    """Take every message off the Celery queue (the real Redis broker) and name its task."""
    names = []
    with celery_app.connection_for_read() as conn:
        queue = conn.SimpleQueue("celery")
        try:
            while True:
                try:
                    message = queue.get(block=True, timeout=0.5)
                except queue.Empty:
                    return names
                names.append(message.headers["task"])
                message.ack()
        finally:
            queue.close()
