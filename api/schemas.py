"""Response bodies of the REST API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from jobs import lifecycle
from jobs.models import Job
from jobs.spec import JobSpec


class ProgressOut(BaseModel):
    phase: str | None
    done: int
    total: int
    message: str | None


class FailureOut(BaseModel):
    reason: str
    message: str


class JobOut(BaseModel):
    id: str
    state: str
    attempt: int
    max_attempts: int
    worker: str | None
    spec: JobSpec
    progress: ProgressOut
    failure: FailureOut | None
    results: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        failure = None
        if job.failure_reason:
            failure = FailureOut(reason=job.failure_reason, message=job.failure_message or "")
        return cls(
            id=job.id,
            state=job.state,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            worker=job.worker,
            spec=lifecycle.job_spec(job),
            progress=ProgressOut(
                phase=job.phase,
                done=job.progress_done,
                total=job.progress_total,
                message=job.progress_message,
            ),
            failure=failure,
            results=job.results,
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None
