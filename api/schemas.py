"""Response bodies of the REST API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_json
from sqlalchemy import select

from jobs import lifecycle
from jobs.models import Job
from jobs.spec import (
    AWQOptions,
    CalibrationSpec,
    Destination,
    EvaluationSpec,
    GPTQOptions,
    JobSpec,
    ModuleOverride,
    QualityGate,
)

# An error response's body in the OpenAPI document (every route returns {"detail": ...}).
ERROR_BODY = {"content": {"application/json": {"example": {"detail": "what went wrong"}}}}


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


# --- the list page without pydantic: the same JSON as JobPage, built from plain rows ---
#
# GET /v1/jobs is the hottest call (dashboards and CI poll it). Loading 50 ORM objects,
# validating 50 JobSpecs and then 50 JobOuts costs several times the query itself; the rows
# were validated when the jobs were created, so the page is built from their columns
# directly. tests/unit/test_api_jobs.py checks it against JobOut.of for every kind of job.

# The table's own columns, not the ORM attributes: SQLAlchemy matches a cached query's result
# columns to a new query's by comparing them, and ORM attributes compare at SQL-expression
# cost (a third of the query's CPU time for 35 columns).
_JOBS = Job.__table__.c
JOB_COLUMNS = (
    _JOBS.id,
    _JOBS.team,
    _JOBS.owner,
    _JOBS.queue,
    _JOBS.state,
    _JOBS.attempt,
    _JOBS.max_attempts,
    _JOBS.worker,
    _JOBS.model_id,
    _JOBS.revision,
    _JOBS.method,
    _JOBS.bits,
    _JOBS.group_size,
    _JOBS.symmetric,
    _JOBS.calibration,
    _JOBS.evaluation,
    _JOBS.method_options,
    _JOBS.ignore,
    _JOBS.overrides,
    _JOBS.quality_gate,
    _JOBS.destination,
    _JOBS.priority,
    _JOBS.labels,
    _JOBS.callback_url,
    _JOBS.phase,
    _JOBS.progress_done,
    _JOBS.progress_total,
    _JOBS.progress_message,
    _JOBS.failure_reason,
    _JOBS.failure_message,
    _JOBS.results,
    _JOBS.created_at,
    _JOBS.updated_at,
    _JOBS.started_at,
    _JOBS.finished_at,
)

LIST_QUERY = select(*JOB_COLUMNS)

# Defaults of the nested spec parts, under what a row stores (a row written before a field
# existed reads as that field's default, as JobSpec would make it).
_CALIBRATION = CalibrationSpec().model_dump(mode="json")
_EVALUATION = EvaluationSpec().model_dump(mode="json")
_DESTINATION = Destination().model_dump(mode="json")
_QUALITY_GATE = QualityGate().model_dump(mode="json")
_OVERRIDE = {k: v for k, v in ModuleOverride(pattern="x").model_dump().items() if k != "pattern"}
_OPTIONS = {
    "gptq": GPTQOptions().model_dump(mode="json"),
    "awq": AWQOptions().model_dump(mode="json"),
}


def _options(method: str, options: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    if method != name or options is None:
        return None
    return {**_OPTIONS[name], **options}


def job_json(row: Any) -> dict[str, Any]:
    """JobOut.of(job).model_dump() for a row of JOB_COLUMNS (datetimes stay datetimes)."""
    # Unpacked by position (the order of JOB_COLUMNS): a row's attribute lookup by name
    # costs more than the rest of this function.
    (
        job_id, team, owner, queue, state, attempt, max_attempts, worker,
        model_id, revision, method, bits, group_size, symmetric, calibration, evaluation,
        method_options, ignore, overrides, quality_gate, destination, priority, labels,
        callback_url, phase, done, total, message, failure_reason, failure_message, results,
        created_at, updated_at, started_at, finished_at,
    ) = row  # fmt: skip
    return {
        "id": job_id,
        "team": team,
        "owner": owner,
        "queue": queue,
        "state": state,
        "attempt": attempt,
        "max_attempts": max_attempts,
        "worker": worker,
        "spec": {
            "model_id": model_id,
            "revision": revision,
            "method": method,
            "bits": bits,
            "group_size": group_size,
            "symmetric": symmetric,
            "calibration": {**_CALIBRATION, **calibration},
            "evaluation": {**_EVALUATION, **evaluation},
            "gptq": _options(method, method_options, "gptq"),
            "awq": _options(method, method_options, "awq"),
            "ignore": ignore,
            "overrides": [{**_OVERRIDE, **o} for o in overrides],
            "quality_gate": None if quality_gate is None else {**_QUALITY_GATE, **quality_gate},
            "destination": {**_DESTINATION, **destination},
            "priority": priority,
            "labels": labels,
            "callback_url": callback_url,
        },
        "progress": {"phase": phase, "done": done, "total": total, "message": message},
        "failure": (
            {"reason": failure_reason, "message": failure_message or ""} if failure_reason else None
        ),
        "results": results,
        "created_at": created_at,
        "updated_at": updated_at,
        "started_at": started_at,
        "finished_at": finished_at,
    }


def job_page_json(rows: list[Any], next_cursor: str | None) -> bytes:
    """The JobPage of these rows as JSON bytes, written by pydantic-core's serializer as
    model_dump_json would (UTC datetimes with `Z`; NaN and infinity, which SQLite keeps in
    someone's results, as null)."""
    page = {"items": [job_json(r) for r in rows], "next_cursor": next_cursor}
    return to_json(page, inf_nan_mode="null")


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
    model_config = ConfigDict(from_attributes=True)

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
