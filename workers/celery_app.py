"""The worker-side Celery app, configured from settings (see jobs.queue.celery_config: late
ack, reject on worker lost, prefetch 1, one job per child process, time limits below the
broker's visibility timeout)."""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init

from jobs.db import forget_inherited_connections
from jobs.queue import configure
from jobs.settings import get_settings

app = Celery("quantfoundry", include=["workers.tasks"])
configure(app, get_settings())


@worker_process_init.connect
def _own_connections(**_kwargs) -> None:
    forget_inherited_connections()
