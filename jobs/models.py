"""SQLAlchemy models. The same tables on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every database: SQLite returns naive values, which
    would reach clients without an offset (not an RFC 3339 date-time)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime()}


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

    # Who submitted it: a team sees only its own jobs; owner is the token's name.
    team: Mapped[str] = mapped_column(String(100), default="default")
    owner: Mapped[str | None] = mapped_column(String(100))
    # Create once: the client's Idempotency-Key with a digest of the spec it came with, and
    # the natural key (what determines the artifact) for ?dedupe=natural.
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    natural_key: Mapped[str | None] = mapped_column(String(64))
    # Signed completion callback (Standard Webhooks), delivered by the dispatcher.
    callback_url: Mapped[str | None] = mapped_column(Text)
    # When the current attempt was queued (queue-wait metric), its Celery task, and when a
    # cancel was asked (the grace period runs from then).
    queued_at: Mapped[datetime | None]
    task_id: Mapped[str | None] = mapped_column(String(200))
    cancel_requested_at: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_state", "state"),
        Index("ix_jobs_state_lease", "state", "lease_expires_at"),
        Index("ix_jobs_team_created_at_id", "team", "created_at", "id"),
        Index("ix_jobs_team_natural_key", "team", "natural_key"),
        UniqueConstraint("team", "idempotency_key", name="uq_jobs_team_idempotency_key"),
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


class ApiToken(Base):
    """An API token: only its HMAC (with the server's pepper) is stored; the token itself is
    shown once, when it is created."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100))
    team: Mapped[str] = mapped_column(String(100))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # the first characters, to recognise it
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(100))
    revoked_at: Mapped[datetime | None]


class CalibrationUpload(Base):
    """A calibration file uploaded through the API, kept in the database so that a worker on
    any machine can read it."""

    __tablename__ = "calibration_uploads"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team: Mapped[str] = mapped_column(String(100))
    owner: Mapped[str | None] = mapped_column(String(100))
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(8))  # txt | jsonl
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    lines: Mapped[int] = mapped_column(Integer)
    content: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_calibration_uploads_team", "team"),)


class JobMeasurement(Base):
    """Append-only figures for /metrics (queue waits, phase seconds, failures): any API
    process computes the same cumulative histograms and counters from them at scrape time."""

    __tablename__ = "job_measurements"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    name: Mapped[str] = mapped_column(String(32))  # queue_wait | phase | failure
    label: Mapped[str] = mapped_column(String(64))  # queue | phase name | failure reason
    value: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_job_measurements_name_label", "name", "label"),)


class WebhookDelivery(Base):
    """An outbound completion callback, written in the transaction that ends the job and
    delivered (retried with backoff) by the dispatcher: an outbox for callbacks."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    msg_id: Mapped[str] = mapped_column(String(40), unique=True)  # the webhook-id header
    job_id: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(String(40))
    payload: Mapped[dict[str, Any]]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]  # gave up after the last attempt
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_webhook_deliveries_due", "delivered_at", "failed_at", "next_attempt_at"),
    )


class WatchedRepo(Base):
    """A Hub model whose pushes (inbound Hub webhook) create a matrix of jobs for a team."""

    __tablename__ = "watched_repos"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    model_id: Mapped[str] = mapped_column(String(200))
    branch: Mapped[str] = mapped_column(String(200), default="main")
    team: Mapped[str] = mapped_column(String(100))
    specs: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("model_id", "branch", "team", name="uq_watched_repos_model_branch_team"),
    )
