"""SQLAlchemy models. The same tables on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    # The spec, as validated columns (the natural key of a job is among them).
    model_id: Mapped[str] = mapped_column(String(200))
    revision: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(32))
    bits: Mapped[int] = mapped_column(Integer)
    group_size: Mapped[int] = mapped_column(Integer)
    symmetric: Mapped[bool]
    calibration: Mapped[dict[str, Any]]
    evaluation: Mapped[dict[str, Any]]
    method_options: Mapped[dict[str, Any] | None]
    ignore: Mapped[list[str]] = mapped_column(JSON, default=lambda: ["lm_head"])
    overrides: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    quality_gate: Mapped[dict[str, Any] | None]
    # Where to publish; a Hub token is only named here (a secret reference), never stored.
    destination: Mapped[dict[str, Any]]
    priority: Mapped[str] = mapped_column(String(16), default="default")
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    state: Mapped[str] = mapped_column(String(16), default="queued")
    phase: Mapped[str | None] = mapped_column(String(32))
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    progress_message: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    queue: Mapped[str] = mapped_column(String(64), default="gpu-default")
    worker: Mapped[str | None] = mapped_column(String(200))
    # The running attempt owns the job until then; its worker renews it (heartbeat).
    lease_expires_at: Mapped[datetime | None]

    failure_reason: Mapped[str | None] = mapped_column(String(32))
    failure_message: Mapped[str | None] = mapped_column(Text)
    results: Mapped[dict[str, Any] | None]
    # Recorded once the sink has published, so a retry after a crash does not publish twice.
    publish_commit: Mapped[str | None] = mapped_column(String(200))
    publish_url: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_state", "state"),
        Index("ix_jobs_state_lease", "state", "lease_expires_at"),
    )


class JobEvent(Base):
    """What happened to a job, in order: state changes, progress, log lines. The id is the
    server-sent-event id, so a client resumes with Last-Event-ID."""

    __tablename__ = "job_events"

    # BIGINT on PostgreSQL; SQLite only autoincrements an INTEGER primary key.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]]

    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)


class OutboxEntry(Base):
    """A job waiting to be handed to the broker, written in the job's own transaction so that
    a crash between commit and enqueue loses nothing: the dispatcher sends what is unsent."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id", ondelete="CASCADE"))
    queue: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_outbox_sent_at", "sent_at"),)
