"""Response bodies of the REST API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

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
    team: str
    owner: str | None
    queue: str
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
            team=job.team,
            owner=job.owner,
            queue=job.queue,
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


class ArtifactFile(BaseModel):
    path: str
    size: int
    sha256: str


class ArtifactsOut(BaseModel):
    """A finished job's files (from the manifest its worker wrote) and where they went."""

    job_id: str
    format: str | None
    total_bytes: int | None
    files: list[ArtifactFile]
    commit: str | None = Field(description="Hub commit id, or the local manifest's sha256.")
    url: str | None = Field(description="The Hub commit's URL, or the local directory.")
    location: str | None = Field(description="The local artifact directory, if local.")


class TokenIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"team": "ml-infra", "scopes": ["submit", "read"]}]},
    )

    team: str | None = Field(default=None, description="Default: the caller's team.")
    scopes: list[str] = Field(min_length=1, description="submit, read and/or admin.")
    name: str | None = Field(default=None, max_length=100, description="Default: generated.")


class TokenOut(BaseModel):
    id: str
    name: str
    team: str
    scopes: list[str]
    prefix: str = Field(description="The token's first characters, to recognise it.")
    created_at: datetime
    created_by: str | None
    revoked_at: datetime | None


class TokenCreated(TokenOut):
    token: str = Field(description="The token itself: shown this once, never stored.")


class UploadOut(BaseModel):
    upload_id: str
    filename: str
    format: str
    size: int
    sha256: str
    lines: int
    created_at: datetime


class WatchIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                    "branch": "main",
                    "specs": [
                        {"method": "rtn", "bits": 4, "group_size": 64},
                        {"method": "gptq", "bits": 4, "group_size": 128},
                    ],
                }
            ]
        },
    )

    model_id: str = Field(min_length=1, max_length=200)
    branch: str = Field(default="main", min_length=1, max_length=200)
    team: str | None = Field(default=None, description="Default: the caller's team.")
    specs: list[dict[str, Any]] = Field(
        min_length=1,
        max_length=64,
        description="JobSpecs without model_id and revision (the push sets them).",
    )


class WatchOut(BaseModel):
    id: str
    model_id: str
    branch: str
    team: str
    specs: list[dict[str, Any]]
    created_at: datetime


class HookResult(BaseModel):
    created: list[str] = Field(description="Jobs created by this delivery.")
    existing: list[str] = Field(description="Jobs an earlier delivery of this push created.")
    ignored: str | None = Field(default=None, description="Why nothing was done.")
