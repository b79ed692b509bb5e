"""The worker-side Celery app, configured from settings."""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init

from jobs.db import forget_inherited_connections
from jobs.queue import configure
from jobs.settings import get_settings

app = Celery("quantfoundry", include=["workers.tasks"])
configure(app, get_settings())
# One long GPU job per process: no prefetching, a fresh process after each job.
app.conf.update(worker_max_tasks_per_child=1, worker_concurrency=1)


@worker_process_init.connect
def _own_connections(**_kwargs) -> None:
    forget_inherited_connections()
