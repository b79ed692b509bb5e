"""Every change of a job's state goes through here, each a fenced UPDATE.

A worker's writes carry the attempt it claimed; once the job has moved on (another attempt,
a cancel), they match no row and are ignored, so a stale worker can never overwrite a newer one.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, Select, and_, or_, select, update
from sqlalchemy.orm import Session

from jobs.models import Job, JobEvent, JobMeasurement, OutboxEntry, utcnow
from jobs.spec import JobSpec
from jobs.states import TERMINAL, FailureReason, State, check_transition
from jobs.webhooks import add_completion_delivery


def create_job(
    session: Session,
    spec: JobSpec,
    queue: str = "gpu-default",
    max_attempts: int = 3,
    *,
    team: str = "default",
    owner: str | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    natural_key: str | None = None,
) -> Job:
    """The job row, its first event and its outbox entry, in the caller's transaction."""
    job = Job(
        team=team,
        owner=owner,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        natural_key=natural_key,
        callback_url=spec.callback_url,
        queued_at=utcnow(),
        model_id=spec.model_id,
        revision=spec.revision,
        method=spec.method.value,
        bits=spec.bits,
        group_size=spec.group_size,
        symmetric=spec.symmetric,
        calibration=spec.calibration.model_dump(),
        evaluation=spec.evaluation.model_dump(),
        method_options=spec.method_options() or None,
        ignore=list(spec.ignore),
        overrides=[o.model_dump() for o in spec.overrides],
        quality_gate=spec.quality_gate.model_dump() if spec.quality_gate else None,
        destination=spec.destination.model_dump(),
        priority=spec.priority,
        labels=dict(spec.labels),
        state=State.queued.value,
        attempt=0,
        max_attempts=max_attempts,
        queue=queue,
    )
    session.add(job)
    session.flush()
    add_event(session, job.id, "state", {"state": State.queued.value, "attempt": 0})
    session.add(OutboxEntry(job_id=job.id, queue=queue))
    return job


def add_event(session: Session, job_id: str, kind: str, data: dict[str, Any]) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, data=data))


def events_after(session: Session, job_id: str, after: int, limit: int = 500) -> list[JobEvent]:
    q = (
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.id > after)
        .order_by(JobEvent.id)
        .limit(limit)
    )
    return list(session.scalars(q))


def job_spec(job: Job) -> JobSpec:
    return JobSpec(
        model_id=job.model_id,
        revision=job.revision,
        method=job.method,
        bits=job.bits,
        group_size=job.group_size,
        symmetric=job.symmetric,
        calibration=job.calibration,
        evaluation=job.evaluation,
        gptq=job.method_options if job.method == "gptq" else None,
        awq=job.method_options if job.method == "awq" else None,
        ignore=job.ignore,
        overrides=job.overrides,
        quality_gate=job.quality_gate,
        destination=job.destination,
        priority=job.priority,
        labels=job.labels,
        callback_url=job.callback_url,
    )


def _fenced(
    session: Session, job_id: str, src: State, seen_attempt: int, dst: State, **values: Any
) -> bool:
    """UPDATE ... WHERE state = src AND attempt = seen_attempt: true when this caller won."""
    check_transition(src, dst)
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == src.value, Job.attempt == seen_attempt)
        .values(state=dst.value, updated_at=utcnow(), **values)
    )
    if res.rowcount != 1:
        return False
    event = {"state": dst.value, "attempt": values.get("attempt", seen_attempt)}
    for key in ("failure_reason", "failure_message"):
        if key in values:
            event[key.removeprefix("failure_")] = values[key]
    add_event(session, job_id, "state", event)
    if dst == State.failed:
        measure(session, job_id, "failure", values.get("failure_reason") or "internal", 1.0)
    if dst in TERMINAL:
        add_completion_delivery(session, job_id)
    return True


def measure(session: Session, job_id: str, name: str, label: str, value: float) -> None:
    """An append-only figure for /metrics (see jobs.models.JobMeasurement)."""
    session.add(JobMeasurement(job_id=job_id, name=name, label=label[:64], value=value))


def claim(
    session: Session,
    job_id: str,
    worker: str,
    lease_s: float = 120.0,
    task_id: str | None = None,
) -> int | None:
    """Move a queued job to running; returns the attempt number claimed, or None when the job
    is not claimable (already running elsewhere, finished, cancelled, unknown)."""
    job = session.get(Job, job_id)
    if job is None or job.state != State.queued.value:
        return None
    seen = job.attempt
    now = utcnow()
    queued_at = job.queued_at or job.created_at
    ok = _fenced(
        session,
        job_id,
        State.queued,
        seen,
        State.running,
        attempt=seen + 1,
        worker=worker,
        task_id=task_id,
        started_at=now,
        phase="starting",
        progress_done=0,
        progress_total=0,
        lease_expires_at=now + timedelta(seconds=lease_s),
        cancel_requested_at=None,
    )
    if not ok:
        return None
    if queued_at.tzinfo is None:  # SQLite returns naive datetimes (stored as UTC)
        queued_at = queued_at.replace(tzinfo=now.tzinfo)
    measure(session, job_id, "queue_wait", job.queue, max(0.0, (now - queued_at).total_seconds()))
    return seen + 1


def heartbeat(session: Session, job_id: str, attempt: int, lease_s: float) -> bool:
    """Renew the lease of the attempt that holds the job; false when it no longer does."""
    res = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.attempt == attempt,
            Job.state.in_([State.running.value, State.cancelling.value]),
        )
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
    )
    return res.rowcount == 1


def record_progress(
    session: Session,
    job_id: str,
    attempt: int,
    phase: str,
    done: int,
    total: int,
    message: str,
    eta_s: float | None = None,
) -> bool:
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == State.running.value, Job.attempt == attempt)
        .values(
            phase=phase,
            progress_done=done,
            progress_total=total,
            progress_message=message,
            updated_at=utcnow(),
        )
    )
    if res.rowcount != 1:
        return False
    event = {"phase": phase, "done": done, "total": total, "message": message}
    if eta_s is not None:
        event["eta_s"] = round(eta_s, 1)
    add_event(session, job_id, "progress", event)
    return True


def _finish(session: Session, job_id: str, attempt: int, dst: State, **values: Any) -> bool:
    """End the attempt's run; a cancel that arrived too late to stop it loses to the result."""
    return any(
        _fenced(session, job_id, src, attempt, dst, finished_at=utcnow(), **values)
        for src in (State.running, State.cancelling)
    )


def succeed(session: Session, job_id: str, attempt: int, results: dict[str, Any]) -> bool:
    ok = _finish(
        session,
        job_id,
        attempt,
        State.succeeded,
        results=results,
        phase="done",
        lease_expires_at=None,
    )
    if ok:
        for phase, seconds in (results.get("seconds") or {}).items():
            if isinstance(seconds, int | float):
                measure(session, job_id, "phase", str(phase), float(seconds))
    return ok


def fail(session: Session, job_id: str, attempt: int, reason: FailureReason, message: str) -> bool:
    return _finish(
        session,
        job_id,
        attempt,
        State.failed,
        failure_reason=reason.value,
        failure_message=message,
        lease_expires_at=None,
    )


class CancelRefused(ValueError):
    pass


def request_cancel(session: Session, job_id: str) -> Job:
    """Cancel a queued job at once; ask a running one to stop (the worker stops between
    layers and moves it from cancelling to cancelled). Raises CancelRefused when finished."""
    job = session.get(Job, job_id)
    if job is None:
        raise KeyError(job_id)
    state = State(job.state)
    if state == State.queued:
        ok = _fenced(
            session,
            job_id,
            State.queued,
            job.attempt,
            State.cancelled,
            finished_at=utcnow(),
            progress_message="cancelled before it started",
        )
    elif state == State.running:
        ok = _fenced(
            session,
            job_id,
            State.running,
            job.attempt,
            State.cancelling,
            cancel_requested_at=utcnow(),
        )
    elif state == State.cancelling:
        ok = True
    else:
        raise CancelRefused(f"job {job_id} is already {state.value}; there is nothing to cancel")
    if not ok:  # it moved on between the read and the update: let the caller look again
        raise CancelRefused(f"job {job_id} changed state while cancelling; retry")
    session.flush()
    session.refresh(job)
    return job


def cancel_requested(session: Session, job_id: str, attempt: int) -> bool:
    """Whether the run holding `attempt` should stop (cancel asked, or the job moved on)."""
    job = session.get(Job, job_id)
    return job is None or job.attempt != attempt or job.state != State.running.value


def finish_cancelled(
    session: Session, job_id: str, attempt: int, message: str | None = None
) -> bool:
    """cancelling -> cancelled for `attempt`; `message` says how, when its worker did not
    stop on its own."""
    extra = {} if message is None else {"progress_message": message}
    return _fenced(
        session,
        job_id,
        State.cancelling,
        attempt,
        State.cancelled,
        finished_at=utcnow(),
        phase="cancelled",
        lease_expires_at=None,
        **extra,
    )


def request_retry(session: Session, job_id: str, budget: int) -> Job:
    """A new attempt of a failed or cancelled job, with `budget` more attempts."""
    job = session.get(Job, job_id)
    if job is None:
        raise KeyError(job_id)
    state = State(job.state)
    if state not in (State.failed, State.cancelled):
        raise CancelRefused(f"job {job_id} is {state.value}; only failed or cancelled jobs retry")
    ok = _fenced(
        session,
        job_id,
        state,
        job.attempt,
        State.queued,
        failure_reason=None,
        failure_message=None,
        results=None,
        finished_at=None,
        phase=None,
        progress_done=0,
        progress_total=0,
        progress_message="retry requested",
        max_attempts=job.attempt + budget,
        queued_at=utcnow(),
        cancel_requested_at=None,
    )
    if not ok:
        raise CancelRefused(f"job {job_id} changed state while retrying; retry")
    session.add(OutboxEntry(job_id=job_id, queue=job.queue))
    session.flush()
    session.refresh(job)
    return job


def reap_expired(session: Session, now: datetime | None = None) -> list[tuple[str, str]]:
    """Take back jobs whose worker stopped renewing its lease: another attempt while attempts
    remain, else failed(worker_lost); a job being cancelled is simply cancelled."""
    now = now or utcnow()
    expired = session.scalars(
        select(Job).where(
            Job.state.in_([State.running.value, State.cancelling.value]),
            Job.lease_expires_at < now,
        )
    ).all()
    actions = []
    for job in expired:
        src, attempt = State(job.state), job.attempt
        if src == State.cancelling:
            if finish_cancelled(session, job.id, attempt):
                actions.append((job.id, "cancelled"))
        elif attempt < job.max_attempts:
            if _fenced(session, job.id, src, attempt, State.retrying, lease_expires_at=None):
                _fenced(
                    session,
                    job.id,
                    State.retrying,
                    attempt,
                    State.queued,
                    progress_message=f"attempt {attempt} lost its worker; retrying",
                    queued_at=now,
                )
                session.add(OutboxEntry(job_id=job.id, queue=job.queue))
                actions.append((job.id, "retrying"))
        elif _fenced(
            session,
            job.id,
            src,
            attempt,
            State.failed,
            finished_at=now,
            lease_expires_at=None,
            failure_reason=FailureReason.worker_lost.value,
            failure_message=f"the worker running attempt {attempt} of {job.max_attempts} "
            "stopped renewing its lease (killed, out of memory, or its machine went away); "
            "no attempts are left: look at the worker logs, then retry the job",
        ):
            actions.append((job.id, "failed"))
    return actions


def requeue_unclaimed(session: Session, older_than: datetime) -> list[str]:
    """Queued jobs whose last hand-off to the broker is older than `older_than` and that no
    worker took (a lost message): hand them over again."""
    latest = (
        select(OutboxEntry.job_id)
        .where(or_(OutboxEntry.sent_at.is_(None), OutboxEntry.sent_at >= older_than))
        .scalar_subquery()
    )
    stale = session.scalars(
        select(Job).where(Job.state == State.queued.value, Job.id.not_in(latest))
    ).all()
    for job in stale:
        session.add(OutboxEntry(job_id=job.id, queue=job.queue))
    return [j.id for j in stale]


# Cursor pagination over (created_at, id), newest first: stable under concurrent inserts.
def encode_cursor(job: Job | Row) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        return datetime.fromisoformat(created), str(job_id)
    except (ValueError, TypeError) as e:
        raise ValueError("cursor is not one this API returned") from e


@dataclass(frozen=True)
class JobFilter:
    """What GET /v1/jobs narrows to; every given condition must hold."""

    team: str | None = None
    states: tuple[str, ...] = ()
    model_id: str | None = None
    method: str | None = None
    labels: tuple[tuple[str, str], ...] = ()


def list_jobs(
    session: Session, limit: int, cursor: str | None = None, where: JobFilter | None = None
) -> tuple[list[Job], str | None]:
    rows = list(session.scalars(_listing(select(Job), limit, cursor, where)))
    nxt = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], nxt


def list_job_rows(
    session: Session,
    query: Select,
    limit: int,
    cursor: str | None = None,
    where: JobFilter | None = None,
) -> tuple[list[Row], str | None]:
    """list_jobs as plain rows of `query`, a select of Job columns that includes
    Job.created_at and Job.id: no ORM objects, and only what the caller shows. Build the
    select once and reuse it (making one costs more than running it)."""
    # On the session's connection: a Core query, without the ORM's per-row loading.
    rows = session.connection().execute(_listing(query, limit, cursor, where)).all()
    nxt = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], nxt


def _listing(q: Select, limit: int, cursor: str | None, where: JobFilter | None) -> Select:
    """Newest first, narrowed by `where`, after `cursor`, one more than a page (to tell
    whether there is a next one)."""
    q = q.order_by(Job.created_at.desc(), Job.id.desc())
    where = where or JobFilter()
    if where.team is not None:
        q = q.where(Job.team == where.team)
    if where.states:
        q = q.where(Job.state.in_(where.states))
    if where.model_id:
        q = q.where(Job.model_id == where.model_id)
    if where.method:
        q = q.where(Job.method == where.method)
    for key, value in where.labels:
        q = q.where(Job.labels[key].as_string() == value)
    if cursor:
        created, job_id = decode_cursor(cursor)
        q = q.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    return q.limit(limit + 1)


def overdue_cancels(session: Session, asked_before: datetime) -> list[Job]:
    """Jobs still cancelling although the cancel was asked before `asked_before`."""
    return list(
        session.scalars(
            select(Job).where(
                Job.state == State.cancelling.value, Job.cancel_requested_at < asked_before
            )
        )
    )


def cancel_after_grace(session: Session, job_id: str, attempt: int, how: str) -> bool:
    """End a cancel whose worker did not stop in its grace period (its process was stopped)."""
    return finish_cancelled(
        session, job_id, attempt, f"did not stop within the cancel grace period; {how}"
    )


# --- results and publishing (written by the worker after verification) ---


def record_results(session: Session, job_id: str, attempt: int, results: dict[str, Any]) -> bool:
    """Keep the verification figures on the job before the gate and publishing, so a gate
    failure keeps them and a later attempt that finds its publish can finish without rerunning."""
    res = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.attempt == attempt,
            Job.state.in_([State.running.value, State.cancelling.value]),
        )
        .values(results=results, updated_at=utcnow())
    )
    return res.rowcount == 1


def record_publish(session: Session, job_id: str, attempt: int, commit: str, url: str) -> bool:
    """Record where the artifact was published (fenced by attempt): from then on no attempt
    of this job publishes again."""
    res = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.attempt == attempt,
            Job.state.in_([State.running.value, State.cancelling.value]),
        )
        .values(publish_commit=commit, publish_url=url, updated_at=utcnow())
    )
    if res.rowcount != 1:
        return False
    add_event(session, job_id, "log", {"line": f"published {url} (commit {commit})"})
    return True
