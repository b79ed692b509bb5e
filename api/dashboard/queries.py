"""The dashboard's reads of jobs and their events, each limited to what the viewer may see."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from api.dashboard.identity import Viewer
from jobs.models import Job, JobEvent

PAGE = 100


@dataclass(frozen=True)
class Filters:
    state: str = ""
    model: str = ""
    method: str = ""
    label: str = ""  # key=value, or key alone
    owner: str = ""  # the name of the token that submitted it

    def query(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v}

    def matches(self, job: Job) -> bool:
        if self.state and job.state != self.state:
            return False
        if self.model and self.model.lower() not in job.model_id.lower():
            return False
        if self.method and job.method != self.method:
            return False
        if self.owner and job.owner != self.owner:
            return False
        if self.label:
            key, _, value = self.label.partition("=")
            labels = job.labels or {}
            if key.strip() not in labels:
                return False
            if value and labels[key.strip()] != value.strip():
                return False
        return True


def _visible(q: Select, viewer: Viewer) -> Select:
    # The API's rule: a token sees its own team's jobs only.
    return q.where(Job.team == viewer.team)


def visible_job(session: Session, viewer: Viewer, job_id: str) -> Job | None:
    return session.scalars(_visible(select(Job).where(Job.id == job_id), viewer)).first()


def list_jobs(session: Session, viewer: Viewer, filters: Filters) -> list[Job]:
    """Newest first. Label filters are applied here (labels are JSON, not a column to index)."""
    q = _visible(select(Job), viewer)
    if filters.state:
        q = q.where(Job.state == filters.state)
    if filters.method:
        q = q.where(Job.method == filters.method)
    if filters.model:
        q = q.where(func.lower(Job.model_id).contains(filters.model.lower()))
    if filters.owner:
        q = q.where(Job.owner == filters.owner)
    q = q.order_by(Job.created_at.desc(), Job.id.desc())
    if not filters.label:
        return list(session.scalars(q.limit(PAGE)))
    return [j for j in session.scalars(q.limit(PAGE * 10)) if filters.matches(j)][:PAGE]


def latest_event_id(session: Session) -> int:
    return session.scalar(select(func.max(JobEvent.id))) or 0


def events_since(session: Session, viewer: Viewer, after: int, limit: int = 500) -> list[JobEvent]:
    """Every visible job's events after `after`, in order (the live jobs list)."""
    q = select(JobEvent).join(Job, Job.id == JobEvent.job_id).where(JobEvent.id > after)
    return list(session.scalars(_visible(q, viewer).order_by(JobEvent.id).limit(limit)))


def job_events(session: Session, job_id: str, tail: int = 50) -> list[JobEvent]:
    """The job's last `tail` events, oldest first."""
    q = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc()).limit(tail)
    return list(reversed(list(session.scalars(q))))


def finished_models(session: Session, viewer: Viewer) -> list[str]:
    q = _visible(select(Job.model_id).where(Job.state == "succeeded").distinct(), viewer)
    return sorted(session.scalars(q))


def finished_jobs(session: Session, viewer: Viewer, model_id: str) -> list[Job]:
    q = select(Job).where(Job.state == "succeeded", Job.model_id == model_id)
    return list(session.scalars(_visible(q, viewer).order_by(Job.created_at)))
