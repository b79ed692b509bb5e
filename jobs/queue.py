"""The contract between job creation and the workers: the task name, its one argument, and
the Celery settings both sides share.

Celery only carries the job id; the database is the source of truth.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from jobs.settings import Settings

RUN_JOB_TASK = "quantfoundry.run_job"


def celery_config(settings: Settings) -> dict:
    """Settings for long GPU jobs, shared by the sending side and the worker side."""
    hard_limit = settings.job_time_limit_s + 60
    assert settings.broker_visibility_timeout_s is not None
    return {
        "broker_url": settings.broker_url,
        "task_default_queue": settings.queue_for("default"),
        "task_ignore_result": True,
        # Acknowledge after the run: a worker that dies mid-job leaves the message to be
        # delivered again (the fenced claim makes a second delivery a no-op).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One job at a time per process, and a fresh process (fresh GPU memory) per job.
        "worker_prefetch_multiplier": 1,
        "worker_max_tasks_per_child": 1,
        "worker_concurrency": 1,
        # The soft limit raises in the job (it fails with reason timeout); the hard limit
        # kills a process that ignores it. Both stay below the visibility timeout, or Redis
        # would hand a running job's message to a second worker.
        "task_soft_time_limit": settings.job_time_limit_s,
        "task_time_limit": hard_limit,
        "broker_transport_options": _transport_options(settings),
        # On a lost broker connection an unacknowledged job will be delivered again: stop
        # it instead of letting two copies run.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
    }


def _transport_options(settings: Settings) -> dict:
    if settings.broker_url.startswith("sqla+"):
        return {}  # kombu hands these to create_engine; the embedded broker needs none
    return {
        "visibility_timeout": settings.broker_visibility_timeout_s,
        # Consume the worker's queues in the order given (gpu-high first), not in turn.
        "queue_order_strategy": "priority",
    }


def configure(app: Celery, settings: Settings) -> None:
    app.conf.update(celery_config(settings))


@lru_cache(maxsize=4)
def _client(broker_url: str, queue_prefix: str, limit_s: float, visibility_s: float) -> Celery:
    app = Celery("quantfoundry-client")
    s = Settings(
        broker_url=broker_url,
        queue_prefix=queue_prefix,
        job_time_limit_s=limit_s,
        broker_visibility_timeout_s=visibility_s,
    )
    configure(app, s)
    return app


def client(settings: Settings) -> Celery:
    """A sending-side Celery app for these settings (one per process and configuration)."""
    assert settings.broker_visibility_timeout_s is not None
    return _client(
        settings.broker_url,
        settings.queue_prefix,
        settings.job_time_limit_s,
        settings.broker_visibility_timeout_s,
    )


def enqueue(settings: Settings, job_id: str, queue: str) -> None:
    client(settings).send_task(RUN_JOB_TASK, args=[job_id], queue=queue)


def supports_broadcast(broker_url: str) -> bool:
    """Remote control (revoke) needs fanout, which kombu's SQLAlchemy transport lacks."""
    return not broker_url.startswith("sqla+")
