"""Creating a job exactly once: the Idempotency-Key a client sends, and the natural key (what
determines the artifact) that CI re-runs may ask to be matched on with `?dedupe=natural`."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from jobs import lifecycle
from jobs.models import CalibrationUpload, Job
from jobs.settings import Settings
from jobs.spec import JobSpec
from jobs.states import State

Dedupe = Literal["none", "natural"]
# The recipe: two jobs that agree on these produce the same artifact.
NATURAL_FIELDS = (
    "model_id",
    "revision",
    "method",
    "bits",
    "group_size",
    "symmetric",
    "calibration",
    "gptq",
    "awq",
    "ignore",
    "overrides",
)


class SpecRejected(ValueError):
    """A spec that is valid on its own but not here (unknown upload, unsigned callback);
    the message names the field."""


class IdempotencyConflict(ValueError):
    """The Idempotency-Key was used before with a different spec."""


class DuplicateInFlight(RuntimeError):
    """Another request with the same Idempotency-Key created the job at the same moment."""


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def request_hash(spec: JobSpec) -> str:
    """The spec after defaults: `{"bits": 4}` and an omitted default are the same request."""
    return _digest(spec.model_dump(mode="json"))


def natural_key(spec: JobSpec) -> str:
    dumped = spec.model_dump(mode="json")
    recipe = {k: dumped[k] for k in NATURAL_FIELDS}
    # Options left out and options given as their defaults are the same recipe.
    recipe["method_options"] = spec.method_options()
    recipe.pop("gptq"), recipe.pop("awq")
    return _digest(recipe)


def _differences(job: Job, spec: JobSpec) -> list[str]:
    before = lifecycle.job_spec(job).model_dump(mode="json")
    now = spec.model_dump(mode="json")
    return sorted(k for k in now if before.get(k) != now[k])


def check_references(session: Session, spec: JobSpec, team: str, settings: Settings) -> None:
    cal = spec.calibration
    if cal.dataset == "upload":
        upload = session.get(CalibrationUpload, cal.upload_id)
        if upload is None or upload.team != team:
            raise SpecRejected(
                f"calibration.upload_id: no upload {cal.upload_id!r} in team {team!r}; "
                "upload the file with POST /v1/calibration and use the id it returns"
            )
    if spec.callback_url and not settings.webhook_secret:
        raise SpecRejected(
            "callback_url: this server has no webhook signing secret (QF_WEBHOOK_SECRET), so "
            "callbacks cannot be signed; ask the operator to set it, or leave callback_url out"
        )


def _lock_natural_key(session: Session, team: str, key: str) -> None:
    """Serialise natural-key dedupe of the same recipe (PostgreSQL; SQLite writes one at a
    time anyway)."""
    if session.get_bind().dialect.name == "postgresql":
        lock_id = int.from_bytes(hashlib.sha256(f"{team}:{key}".encode()).digest()[:8], "big")
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_id - 2**63})


def submit(
    session: Session,
    spec: JobSpec,
    settings: Settings,
    *,
    team: str,
    owner: str | None,
    idempotency_key: str | None = None,
    dedupe: Dedupe = "none",
) -> tuple[Job, bool]:
    """The job for this request and whether it was created now (False: an earlier job with
    the same Idempotency-Key, or with dedupe=natural the same recipe, not failed or
    cancelled). The caller commits."""
    digest = request_hash(spec)
    if idempotency_key:
        earlier = session.scalars(
            select(Job).where(Job.team == team, Job.idempotency_key == idempotency_key)
        ).first()
        if earlier is not None:
            if earlier.request_hash == digest:
                return earlier, False
            raise IdempotencyConflict(
                f"Idempotency-Key {idempotency_key!r} was used for job {earlier.id} with a "
                f"different spec (differs in: {', '.join(_differences(earlier, spec)) or '?'}); "
                "use a new key for a new job"
            )
    check_references(session, spec, team, settings)
    nkey = natural_key(spec)
    if dedupe == "natural":
        _lock_natural_key(session, team, nkey)
        same = session.scalars(
            select(Job)
            .where(
                Job.team == team,
                Job.natural_key == nkey,
                Job.state.not_in([State.failed.value, State.cancelled.value]),
            )
            .order_by(Job.created_at.desc())
            .limit(1)
        ).first()
        if same is not None:
            return same, False
    try:
        job = lifecycle.create_job(
            session,
            spec,
            settings.queue_for(spec.priority),
            settings.max_attempts,
            team=team,
            owner=owner,
            idempotency_key=idempotency_key,
            request_hash=digest,
            natural_key=nkey,
        )
    except IntegrityError:
        session.rollback()
        raise DuplicateInFlight(
            f"another request with Idempotency-Key {idempotency_key!r} is creating this job "
            "right now; fetch it with the same key again in a moment"
        ) from None
    return job, True
