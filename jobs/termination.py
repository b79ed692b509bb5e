"""Cancel grace: a running job asked to cancel stops by itself between layers; one that is
still `cancelling` after QF_CANCEL_GRACE_S (stuck in a long step, or hung) has its worker
process stopped here, so the slot is really freed, and becomes cancelled.

How the process is reached: Celery's remote control (`revoke(task_id, terminate=True)`), which
the worker's main process carries out on any machine (Redis and other brokers with fanout),
and a SIGKILL when the process runs on this very machine (the embedded default, where the
SQLAlchemy broker has no remote control). The worker's main process then starts a fresh child.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy.orm import sessionmaker

from jobs import lifecycle
from jobs.models import utcnow
from jobs.queue import client, supports_broadcast
from jobs.settings import Settings

log = logging.getLogger(__name__)
Revoke = Callable[[Settings, str], None]


def _revoke(settings: Settings, task_id: str) -> None:
    client(settings).control.revoke(task_id, terminate=True, signal="SIGKILL")


def parse_worker(worker: str | None) -> tuple[str, int] | None:
    """`host:pid` as the task records it."""
    host, _, pid = (worker or "").rpartition(":")
    return (host, int(pid)) if host and pid.isdigit() else None


def _is_worker_process(pid: int) -> bool:
    """Guard against a reused pid: only a quantfoundry/celery process is killed."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"quantfoundry" in cmdline or b"celery" in cmdline


def stop_worker(
    settings: Settings,
    worker: str | None,
    task_id: str | None,
    revoke: Revoke | None = _revoke,
    kill: Callable[[int, int], None] = os.kill,
) -> str:
    """Stop the process running a job; returns what was done, for the job's record. Revoke
    only for a job that can no longer be claimed (cancelled): a redelivered message keeps its
    task id, and revoking it could stop the job's next attempt."""
    done = []
    if revoke is not None and task_id and supports_broadcast(settings.broker_url):
        try:
            revoke(settings, task_id)
            done.append(f"revoked task {task_id} (terminate)")
        except Exception as e:  # the broker may be down; the local kill may still work
            log.warning("revoke of task %s failed: %s", task_id, e)
    where = parse_worker(worker)
    if where and where[0] == socket.gethostname() and _is_worker_process(where[1]):
        try:
            kill(where[1], signal.SIGKILL)
            done.append(f"killed worker process {where[1]}")
        except ProcessLookupError:
            done.append(f"worker process {where[1]} had exited")
    return "; ".join(done) or f"worker {worker} could not be reached; its writes are ignored"


def stop_overdue_cancels(
    factory: sessionmaker, settings: Settings, revoke: Revoke = _revoke
) -> list[tuple[str, str]]:
    """Cancel every job still cancelling after the grace period, then stop its worker
    process (only for the jobs this call moved, so a worker that finished the cancel by
    itself meanwhile is left alone); (job id, what was done)."""
    asked_before = utcnow() - timedelta(seconds=settings.cancel_grace_s)
    won = []
    with factory() as session, session.begin():
        for job in lifecycle.overdue_cancels(session, asked_before):
            how = f"worker {job.worker} was stopped"
            if lifecycle.cancel_after_grace(session, job.id, job.attempt, how):
                won.append((job.id, job.worker, job.task_id))
    return [
        (job_id, stop_worker(settings, worker, task_id, revoke)) for job_id, worker, task_id in won
    ]
