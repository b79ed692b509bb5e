"""Run one claimed job through quantcore: progress into the job row, results or a failure
reason at the end."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from jobs import lifecycle
from jobs.db import session_scope
from jobs.gate import check_gate, gate_message
from jobs.models import Job
from jobs.settings import Settings
from jobs.states import FailureReason
from workers.sinks import PublishError, find_existing, publish, resolve_destination, spec_summary

log = logging.getLogger(__name__)


def failure_for(exc: BaseException) -> tuple[FailureReason, str]:
    """Map an exception to a failure reason and a message a person can act on."""
    import torch

    from quantcore.errors import BadRequestError, ModelNotFoundError, UnsupportedModelError

    if isinstance(exc, ModelNotFoundError):
        return FailureReason.model_not_found, str(exc)
    if isinstance(exc, (BadRequestError, UnsupportedModelError)):
        return FailureReason.bad_input, str(exc)
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return FailureReason.oom, f"ran out of memory: {exc}; use a worker with more memory"
    if type(exc).__name__ == "SoftTimeLimitExceeded":  # Celery's, raised at QF_JOB_TIME_LIMIT_S
        return FailureReason.timeout, (
            "the job ran past the time limit (QF_JOB_TIME_LIMIT_S); use a faster worker, "
            "fewer evaluation windows, or ask the operator for a longer limit"
        )
    return FailureReason.internal, f"{type(exc).__name__}: {exc}"


def _request(job: Job):
    from sqlalchemy.orm import object_session

    from jobs.uploads import materialize
    from quantcore.errors import BadRequestError
    from quantcore.pipeline import Calibration, Evaluation, Override, QuantizeRequest

    cal = {k: v for k, v in job.calibration.items() if k != "upload_id"}
    if cal.get("dataset") == "upload":
        # The upload lives in the database; calibrate from a local copy of it.
        try:
            path = materialize(object_session(job), job.calibration["upload_id"])
        except LookupError as e:
            raise BadRequestError(f"calibration.upload_id: {e}") from None
        cal.update(dataset="file", path=str(path))
    return QuantizeRequest(
        model_id=job.model_id,
        revision=job.revision,
        method=job.method,
        bits=job.bits,
        group_size=job.group_size,
        symmetric=job.symmetric,
        calibration=Calibration(**cal),
        evaluation=Evaluation(**job.evaluation),
        ignore=tuple(job.ignore),
        overrides=tuple(Override(**o) for o in job.overrides),
        method_options=job.method_options or {},
    )


def run_job(settings: Settings, job_id: str, worker: str, task_id: str | None = None) -> str:
    """Claim and run `job_id`. Returns what happened, for the log."""
    url = settings.database_url
    with session_scope(url) as s:
        attempt = lifecycle.claim(s, job_id, worker, settings.lease_s, task_id=task_id)
    if attempt is None:
        return "not claimable (already taken, finished or unknown)"

    last_write = 0.0
    phase_started: dict[str, float] = {}

    def on_progress(p) -> None:
        nonlocal last_write
        now = time.monotonic()
        started = phase_started.setdefault(p.phase, now)
        # Phase starts and ends and finished layers always land; the rest is throttled.
        important = p.milestone or p.done in (0, p.total)
        if not important and now - last_write < settings.progress_interval_s:
            return
        last_write = now
        eta = (now - started) / p.done * (p.total - p.done) if 0 < p.done <= p.total else None
        with session_scope(url) as s:
            lifecycle.record_progress(
                s, job_id, attempt, p.phase, p.done, p.total, p.message, eta_s=eta
            )

    last_check = 0.0

    def should_cancel() -> bool:
        nonlocal last_check
        now = time.monotonic()
        if now - last_check < settings.cancel_poll_s:
            return False
        last_check = now
        with session_scope(url) as s:
            return lifecycle.cancel_requested(s, job_id, attempt)

    stop_beat = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(settings, job_id, attempt, stop_beat), daemon=True
    )
    beat.start()
    try:
        return _run_claimed(settings, job_id, attempt, on_progress, should_cancel)
    finally:
        stop_beat.set()
        beat.join()


def _heartbeat(settings: Settings, job_id: str, attempt: int, stop: threading.Event) -> None:
    """Renew the lease a few times per lease period while this process lives; a killed worker
    stops renewing and the reaper takes the job back."""
    while not stop.wait(settings.lease_s / 4):
        try:
            with session_scope(settings.database_url) as s:
                if not lifecycle.heartbeat(s, job_id, attempt, settings.lease_s):
                    return  # the job moved on (finished, reaped): nothing left to hold
        except Exception:
            log.exception("heartbeat for job %s failed; retrying", job_id)


def _run_claimed(settings: Settings, job_id: str, attempt: int, on_progress, should_cancel) -> str:
    url = settings.database_url
    try:
        from quantcore.errors import CancelledError
        from quantcore.pipeline import run

        with session_scope(url) as s:
            job = s.get(Job, job_id)
            assert job is not None
            request = _request(job)
            spec = lifecycle.job_spec(job).model_dump(mode="json")
            # The card and the commit are published: nothing that may carry a credential.
            spec.pop("callback_url", None)
            earlier = _EarlierAttempt(job.publish_commit, job.results)
        destination = resolve_destination(spec["destination"], spec)
        if _finished_earlier(settings, job_id, attempt, destination, earlier):
            return "succeeded (published by an earlier attempt)"
        device = None if settings.device == "auto" else settings.device
        # A new attempt of the same job resumes from the last finished layer. The artifact
        # is staged; the sink publishes it once verified and through the gate.
        result = run(
            request,
            _staging(settings, job_id),
            on_progress=on_progress,
            should_cancel=should_cancel,
            device=device,
            checkpoint_dir=settings.home / "checkpoints" / job_id,
            card={"spec": spec, "repo_id": destination.get("repo_id")},
        )
    except CancelledError as exc:
        log.info("job %s cancelled: %s", job_id, exc)
        with session_scope(url) as s:
            lifecycle.finish_cancelled(s, job_id, attempt)
        return "cancelled"
    except Exception as exc:  # every failure ends the job with a reason
        reason, message = failure_for(exc)
        log.error(
            "job %s failed (%s): %s\n%s", job_id, reason.value, message, traceback.format_exc()
        )
        with session_scope(url) as s:
            lifecycle.fail(s, job_id, attempt, reason, message)
        return f"failed: {reason.value}"
    return _gate_and_publish(
        settings, job_id, attempt, spec, destination, result.to_dict(), on_progress
    )


# --- after verification: the quality gate, then publishing exactly once ---


@dataclass(frozen=True)
class _EarlierAttempt:
    publish_commit: str | None
    results: dict | None


def _staging(settings: Settings, job_id: str) -> Path:
    return settings.home / "staging" / job_id


def _finished_earlier(
    settings: Settings, job_id: str, attempt: int, destination: dict, earlier: _EarlierAttempt
) -> bool:
    """A retry after a crash: if an earlier attempt passed the gate and published (recorded,
    or found in the sink by job id), finish with its figures instead of running again."""
    if earlier.results is None:
        return False
    published = None
    if earlier.publish_commit is None:
        try:
            published = find_existing(destination, job_id, settings)
        except Exception as exc:  # not knowing is no reason to fail: publish() looks again
            log.warning("job %s: could not look for an earlier publish: %s", job_id, exc)
            return False
        if published is None:
            return False
    with session_scope(settings.database_url) as s:
        if published is not None:
            lifecycle.record_publish(s, job_id, attempt, published.commit, published.url)
        lifecycle.succeed(s, job_id, attempt, earlier.results)
    shutil.rmtree(_staging(settings, job_id), ignore_errors=True)
    return True


def _gate_and_publish(
    settings: Settings,
    job_id: str,
    attempt: int,
    spec: dict,
    destination: dict,
    results: dict,
    on_progress,
) -> str:
    from quantcore.pipeline import Progress

    url = settings.database_url
    staging = _staging(settings, job_id)
    with session_scope(url) as s:
        lifecycle.record_results(s, job_id, attempt, results)
    violations = check_gate(spec.get("quality_gate"), results)
    if violations:
        message = gate_message(violations)
        log.info("job %s failed its quality gate: %s", job_id, message)
        with session_scope(url) as s:
            lifecycle.fail(s, job_id, attempt, FailureReason.quality_gate, message)
        shutil.rmtree(staging, ignore_errors=True)
        return "failed: quality_gate"

    def publish_progress(done: int, total: int, message: str) -> None:
        on_progress(Progress("publish", done, total, message))

    try:
        published = publish(
            destination,
            staging,
            job_id,
            spec_summary(spec),
            settings,
            on_progress=publish_progress,
            spec_json=json.dumps(spec, indent=2, sort_keys=True),
        )
    except Exception as exc:
        message = str(exc) if isinstance(exc, PublishError) else f"{type(exc).__name__}: {exc}"
        message = f"publishing failed: {message}"
        log.error("job %s failed (publish_failed): %s", job_id, message)
        with session_scope(url) as s:
            lifecycle.fail(s, job_id, attempt, FailureReason.publish_failed, message)
        return "failed: publish_failed"
    if destination.get("kind", "local") == "local":
        results = {**results, "artifact_path": published.location}
    else:
        shutil.rmtree(staging, ignore_errors=True)
    with session_scope(url) as s:
        lifecycle.record_publish(s, job_id, attempt, published.commit, published.url)
    with session_scope(url) as s:
        lifecycle.succeed(s, job_id, attempt, results)
    return "succeeded"
