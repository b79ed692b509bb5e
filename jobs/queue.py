"""The contract between job creation and the workers: the task name and its one argument.

Celery only carries the job id; the database is the source of truth.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from jobs.settings import Settings

RUN_JOB_TASK = "quantfoundry.run_job"


def configure(app: Celery, settings: Settings) -> None:
    """Settings shared by the sending side and the worker side."""
    app.conf.update(
        broker_url=settings.broker_url,
        task_default_queue=settings.queue,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
    )


@lru_cache(maxsize=4)
def _client(broker_url: str, queue: str) -> Celery:
    app = Celery("quantfoundry-client")
    configure(app, Settings(broker_url=broker_url, queue=queue))
    return app


def enqueue(settings: Settings, job_id: str, queue: str | None = None) -> None:
    queue = queue or settings.queue
    _client(settings.broker_url, queue).send_task(RUN_JOB_TASK, args=[job_id], queue=queue)
