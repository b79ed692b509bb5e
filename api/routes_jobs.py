"""/v1/jobs: create, get, list."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from api.deps import SessionDep, SettingsDep
from api.schemas import JobOut, JobPage
from jobs import lifecycle
from jobs.dispatch import send_entry
from jobs.models import Job, OutboxEntry
from jobs.spec import JobSpec
from jobs.states import TERMINAL, State

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=201, response_model=JobOut)
def create_job(
    spec: JobSpec, session: SessionDep, settings: SettingsDep, response: Response
) -> JobOut:
    job = lifecycle.create_job(session, spec, settings.queue, settings.max_attempts)
    session.commit()
    # Fast path: hand it to the broker now. If that fails the job is still safe in the outbox
    # and the dispatcher sends it.
    entry = session.scalars(select(OutboxEntry).where(OutboxEntry.job_id == job.id)).first()
    try:
        send_entry(session, settings, entry)
        session.commit()
    except Exception:
        session.rollback()
        log.warning("broker unreachable; job %s waits in the outbox", job.id, exc_info=True)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.of(job)


@router.post("/{job_id}/retry", status_code=202, response_model=JobOut)
def retry_job(job_id: str, session: SessionDep, settings: SettingsDep) -> JobOut:
    """A new attempt of a failed or cancelled job (it keeps its id, events and spec)."""
    try:
        job = lifecycle.request_retry(session, job_id, settings.max_attempts)
    except KeyError:
        raise HTTPException(404, f"no job with id {job_id}") from None
    except lifecycle.CancelRefused as e:
        raise HTTPException(409, str(e)) from e
    session.commit()
    return JobOut.of(job)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, session: SessionDep) -> JobOut:
    job = session.get(Job, job_id)
    if job is None:
        raise HTTPException(404, f"no job with id {job_id}")
    return JobOut.of(job)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut)
def cancel_job(job_id: str, session: SessionDep) -> JobOut:
    """A queued job is cancelled at once; a running one becomes `cancelling` and its worker
    stops before the next layer (or evaluation window)."""
    try:
        job = lifecycle.request_cancel(session, job_id)
    except KeyError:
        raise HTTPException(404, f"no job with id {job_id}") from None
    except lifecycle.CancelRefused as e:
        raise HTTPException(409, str(e)) from e
    session.commit()
    return JobOut.of(job)


@router.get("", response_model=JobPage)
def list_jobs(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> JobPage:
    """Jobs, newest first."""
    try:
        jobs, nxt = lifecycle.list_jobs(session, limit, cursor)
    except ValueError as e:
        raise HTTPException(422, f"cursor: {e}") from e
    return JobPage(items=[JobOut.of(j) for j in jobs], next_cursor=nxt)


EVENT_POLL_S = 0.25
KEEPALIVE_S = 15.0


def _sse(event_id: int, kind: str, data: dict) -> str:
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
def job_events(
    job_id: str,
    request: Request,
    session: SessionDep,
    last_event_id: Annotated[
        str | None, Header(description="Resume after this event id (sent by EventSource).")
    ] = None,
    after: Annotated[int | None, Query(ge=0, description="Same as Last-Event-ID.")] = None,
) -> StreamingResponse:
    """Server-sent events of one job: `state` (queued, running, ... with the failure reason),
    `progress` (phase, done/total, message, eta_s). Ends after the job's final state."""
    if session.get(Job, job_id) is None:
        raise HTTPException(404, f"no job with id {job_id}")
    try:
        start = int(last_event_id) if last_event_id is not None else (after or 0)
    except ValueError:
        raise HTTPException(422, f"Last-Event-ID: {last_event_id!r} is not an event id") from None
    make_session = request.app.state.session_factory

    def stream() -> Iterator[str]:
        last, quiet = start, 0.0
        while True:
            with make_session() as s:
                # The state first: once it is final, every event before it is committed.
                terminal = State(s.get(Job, job_id).state) in TERMINAL
                events = lifecycle.events_after(s, job_id, last)
            for e in events:
                yield _sse(e.id, e.kind, e.data)
                last = e.id
            if events:
                quiet = 0.0
                continue
            if terminal:
                return
            time.sleep(EVENT_POLL_S)
            quiet += EVENT_POLL_S
            if quiet >= KEEPALIVE_S:
                yield ": keep-alive\n\n"
                quiet = 0.0

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
