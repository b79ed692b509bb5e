"""/v1/jobs: create (exactly once), get, list with filters, cancel, retry, events, artifacts.
Every route sees only the caller's team."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.auth import Reader, Submitter
from api.deps import SessionDep, SettingsDep
from api.schemas import (
    ERROR_BODY,
    LIST_QUERY,
    ArtifactFile,
    ArtifactsOut,
    JobOut,
    JobPage,
    job_page_json,
)
from jobs import lifecycle, submission
from jobs.auth import Principal
from jobs.dispatch import send_now
from jobs.models import Job, OutboxEntry
from jobs.spec import JobSpec, Method
from jobs.states import TERMINAL, State

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_JOB_ID = {"job_id": "$response.body#/id"}
# OpenAPI links: what a client (and schemathesis' stateful tests) can do with a job it got.
JOB_LINKS = {
    "GetJob": {"operationId": "get_job", "parameters": _JOB_ID},
    "CancelJob": {"operationId": "cancel_job", "parameters": _JOB_ID},
    "RetryJob": {"operationId": "retry_job", "parameters": _JOB_ID},
    "JobEvents": {"operationId": "job_events", "parameters": _JOB_ID},
    "JobArtifacts": {"operationId": "job_artifacts", "parameters": _JOB_ID},
}
NOT_FOUND = {404: {"description": "No such job in the caller's team.", **ERROR_BODY}}
AUTH = {
    401: {"description": "No API token, or an unknown or revoked one.", **ERROR_BODY},
    403: {"description": "The token lacks the scope this needs.", **ERROR_BODY},
}


def team_job(session: Session, principal: Principal, job_id: str) -> Job:
    """The caller's team's job; another team's is reported missing, never forbidden."""
    job = session.get(Job, job_id)
    if job is None or job.team != principal.team:
        session.rollback()
        raise HTTPException(404, f"no job with id {job_id}")
    return job


def released(session: Session, out):
    """End the read before returning: the connection goes back to the pool now, not after
    the response is sent (a connection held across the thread hops of a request starves the
    pool under load)."""
    session.rollback()
    return out


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    operation_id="create_job",
    responses={
        200: {
            "description": "An earlier job: same Idempotency-Key and spec, or the same recipe "
            "with dedupe=natural.",
            "model": JobOut,
            "links": JOB_LINKS,
        },
        201: {"description": "Created and queued.", "links": JOB_LINKS},
        409: {
            "description": "The same Idempotency-Key is being used at this moment.",
            **ERROR_BODY,
        },
        422: {"description": "Invalid spec, or a reused key with a different spec.", **ERROR_BODY},
        **AUTH,
    },
)
def create_job(
    spec: JobSpec,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    principal: Submitter,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=200,
            pattern=r"^[\x21-\x7e]+$",
            description="Create at most once per key (in the team): the same key and spec "
            "return the first job (200); the same key with another spec is 422.",
        ),
    ] = None,
    dedupe: Annotated[
        Literal["none", "natural"],
        Query(
            description="natural: if the team has a job with the same recipe (model, "
            "revision, method, bits, group size, symmetric, calibration, method options, "
            "ignore, overrides) that is not failed or cancelled, return it (200)."
        ),
    ] = "none",
) -> JobOut:
    try:
        job, created = submission.submit(
            session,
            spec,
            settings,
            team=principal.team,
            owner=principal.name,
            idempotency_key=idempotency_key,
            dedupe=dedupe,
        )
    except (submission.SpecRejected, submission.IdempotencyConflict) as e:
        raise HTTPException(422, str(e)) from e
    except submission.DuplicateInFlight as e:
        raise HTTPException(409, str(e)) from e
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.status_code = 200
        return JobOut.of(job)
    entry = session.scalars(select(OutboxEntry.id).where(OutboxEntry.job_id == job.id)).one()
    session.commit()  # the job is safe in the outbox from here on
    # Fast path: hand it to the broker now (unless the dispatcher got there first). If that
    # fails the dispatcher sends it.
    try:
        send_now(session, settings, entry)
        session.commit()
    except Exception:
        session.rollback()
        log.warning("broker unreachable; job %s waits in the outbox", job.id, exc_info=True)
    return JobOut.of(job)


@router.get("/{job_id}", response_model=JobOut, operation_id="get_job", responses=NOT_FOUND | AUTH)
def get_job(job_id: str, session: SessionDep, principal: Reader) -> JobOut:
    return released(session, JobOut.of(team_job(session, principal, job_id)))


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobOut,
    operation_id="cancel_job",
    responses={409: {"description": "Already finished.", **ERROR_BODY}} | NOT_FOUND | AUTH,
)
def cancel_job(job_id: str, session: SessionDep, principal: Submitter) -> JobOut:
    """A queued job is cancelled at once; a running one becomes `cancelling` and its worker
    stops before the next layer (or evaluation window). One that has not stopped after the
    cancel grace period (QF_CANCEL_GRACE_S) has its worker process stopped."""
    team_job(session, principal, job_id)
    try:
        job = lifecycle.request_cancel(session, job_id)
    except lifecycle.CancelRefused as e:
        raise HTTPException(409, str(e)) from e
    session.commit()
    return JobOut.of(job)


@router.post(
    "/{job_id}/retry",
    status_code=202,
    response_model=JobOut,
    operation_id="retry_job",
    responses={409: {"description": "Not failed or cancelled.", **ERROR_BODY}} | NOT_FOUND | AUTH,
)
def retry_job(
    job_id: str, session: SessionDep, settings: SettingsDep, principal: Submitter
) -> JobOut:
    """A new attempt of a failed or cancelled job (it keeps its id, events and spec)."""
    team_job(session, principal, job_id)
    try:
        job = lifecycle.request_retry(session, job_id, settings.max_attempts)
    except lifecycle.CancelRefused as e:
        raise HTTPException(409, str(e)) from e
    session.commit()
    return JobOut.of(job)


def _labels(pairs: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise HTTPException(422, f"label: {pair!r} is not key=value")
        out.append((key, value))
    return tuple(out)


@router.get("", response_model=JobPage, operation_id="list_jobs", responses=AUTH)
def list_jobs(
    session: SessionDep,
    principal: Reader,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    state: Annotated[
        list[State] | None, Query(description="Any of these states (repeat the parameter).")
    ] = None,
    model: Annotated[str | None, Query(max_length=200, description="model_id")] = None,
    method: Annotated[Method | None, Query()] = None,
    label: Annotated[
        list[str] | None,
        Query(description="key=value; repeat for several (all must match)."),
    ] = None,
) -> Response:
    """The team's jobs, newest first, narrowed by every filter given."""
    where = lifecycle.JobFilter(
        team=principal.team,
        states=tuple(s.value for s in state or ()),
        model_id=model,
        method=method.value if method else None,
        labels=_labels(label or []),
    )
    try:
        rows, nxt = lifecycle.list_job_rows(session, LIST_QUERY, limit, cursor, where)
    except ValueError as e:
        raise HTTPException(422, f"cursor: {e}") from e
    session.rollback()  # the rows are plain values: the connection can go back now
    # Built straight from the rows (see api.schemas.job_page_json); response_model documents it.
    return Response(job_page_json(rows, nxt), media_type="application/json")


@router.get(
    "/{job_id}/artifacts",
    response_model=ArtifactsOut,
    operation_id="job_artifacts",
    responses={409: {"description": "The job has not succeeded.", **ERROR_BODY}} | NOT_FOUND | AUTH,
)
def job_artifacts(job_id: str, session: SessionDep, principal: Reader) -> ArtifactsOut:
    """The files of a succeeded job's artifact with sizes and sha256 (its manifest.json, as
    the worker recorded it) and where it was published."""
    job = team_job(session, principal, job_id)
    if job.state != State.succeeded.value or not job.results:
        raise HTTPException(
            409, f"job {job_id} is {job.state}; a job has artifacts once it succeeded"
        )
    r = job.results
    files = [
        ArtifactFile(path=path, size=int(f["size"]), sha256=str(f["sha256"]))
        for path, f in sorted((r.get("files") or {}).items())
    ]
    out = ArtifactsOut(
        job_id=job.id,
        format=r.get("artifact_format"),
        total_bytes=r.get("artifact_bytes"),
        files=files,
        commit=job.publish_commit,
        url=job.publish_url,
        location=r.get("artifact_path") if job.destination.get("kind") == "local" else None,
    )
    return released(session, out)


EVENT_POLL_S = 0.25
KEEPALIVE_S = 15.0


def _sse(event_id: int, kind: str, data: dict) -> str:
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    operation_id="job_events",
    responses={
        200: {
            "content": {
                "text/event-stream": {
                    "example": 'id: 7\nevent: progress\ndata: {"phase": "quantize", "done": 3, '
                    '"total": 30, "message": "layer 3/30", "eta_s": 41.0}\n\n'
                }
            }
        },
        422: {"description": "Last-Event-ID is not an event id.", **ERROR_BODY},
    }
    | NOT_FOUND
    | AUTH,
)
def job_events(
    job_id: str,
    request: Request,
    session: SessionDep,
    principal: Reader,
    last_event_id: Annotated[
        str | None, Header(description="Resume after this event id (sent by EventSource).")
    ] = None,
    after: Annotated[int | None, Query(ge=0, description="Same as Last-Event-ID.")] = None,
) -> StreamingResponse:
    """Server-sent events of one job: `state` (queued, running, ... with the failure reason),
    `progress` (phase, done/total, message, eta_s), `log`. Ends after the final state."""
    released(session, team_job(session, principal, job_id))
    try:
        start = int(last_event_id) if last_event_id is not None else (after or 0)
    except ValueError:
        raise HTTPException(422, f"Last-Event-ID: {last_event_id!r} is not an event id") from None
    make_session = request.app.state.session_factory

    def read(after: int) -> tuple[bool, list[tuple[int, str, dict]]]:
        with make_session() as s:
            # The state first: once it is final, every event before it is committed.
            terminal = State(s.get(Job, job_id).state) in TERMINAL
            events = lifecycle.events_after(s, job_id, after)
            return terminal, [(e.id, e.kind, e.data) for e in events]

    async def stream() -> AsyncIterator[str]:
        # Asynchronous between polls: a watcher holds a worker thread only while it reads,
        # so many open streams do not use up the thread pool the other calls need.
        last, quiet = start, 0.0
        while True:
            terminal, events = await run_in_threadpool(read, last)
            for event_id, kind, data in events:
                yield _sse(event_id, kind, data)
                last = event_id
            if events:
                quiet = 0.0
                continue
            if terminal:
                return
            await asyncio.sleep(EVENT_POLL_S)
            quiet += EVENT_POLL_S
            if quiet >= KEEPALIVE_S:
                yield ": keep-alive\n\n"
                quiet = 0.0

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
