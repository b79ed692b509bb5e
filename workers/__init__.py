"""Celery app and the task that runs one job."""
