"""The one task: run a job, given only its id."""

from __future__ import annotations

import os
import socket

from jobs.queue import RUN_JOB_TASK
from jobs.settings import get_settings
from workers.celery_app import app
from workers.runner import run_job


@app.task(name=RUN_JOB_TASK)
def run_job_task(job_id: str) -> str:
    return run_job(get_settings(), job_id, worker=f"{socket.gethostname()}:{os.getpid()}")
