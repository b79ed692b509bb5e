"""Run one claimed job through quantcore: progress into the job row, results or a failure
reason at the end."""

from __future__ import annotations

import logging
import threading
import time
import traceback

from jobs import lifecycle
from jobs.db import session_scope
from jobs.models import Job
from jobs.settings import Settings
from jobs.states import FailureReason

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
    return FailureReason.internal, f"{type(exc).__name__}: {exc}"


def _request(job: Job):
    from quantcore.pipeline import Calibration, Evaluation, Override, QuantizeRequest

    cal = {k: v for k, v in job.calibration.items() if k != "upload_id"}
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


def run_job(settings: Settings, job_id: str, worker: str) -> str:
    """Claim and run `job_id`. Returns what happened, for the log."""
    url = settings.database_url
    with session_scope(url) as s:
        attempt = lifecycle.claim(s, job_id, worker, settings.lease_s)
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
        device = None if settings.device == "auto" else settings.device
        assert settings.artifact_dir is not None
        # A new attempt of the same job resumes from the last finished layer.
        result = run(
            request,
            settings.artifact_dir / job_id,
            on_progress=on_progress,
            should_cancel=should_cancel,
            device=device,
            checkpoint_dir=settings.home / "checkpoints" / job_id,
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
    with session_scope(url) as s:
        lifecycle.succeed(s, job_id, attempt, result.to_dict())
    return "succeeded"
