"""The one task: run a job, given only its id."""

from __future__ import annotations

import os
import socket

from jobs.queue import RUN_JOB_TASK
from jobs.settings import get_settings
from workers.celery_app import app
from workers.runner import run_job


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job_task(self, job_id: str) -> str:
    # host:pid of the process that runs it, and the task id: what a cancel past its grace
    # period needs to stop this very process.
    worker = f"{socket.gethostname()}:{os.getpid()}"
    return run_job(get_settings(), job_id, worker=worker, task_id=self.request.id)
