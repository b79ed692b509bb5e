"""The dispatcher: hands outbox entries to the broker and reaps expired leases.

Sending is at-least-once: an entry is marked sent only after the broker took it, so a crash
in between sends it again, and the worker's fenced claim turns the duplicate into a no-op.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from jobs import lifecycle
from jobs.models import Job, OutboxEntry, utcnow
from jobs.queue import enqueue
from jobs.settings import Settings
from jobs.termination import stop_overdue_cancels, stop_worker
from jobs.webhooks import deliver_due

log = logging.getLogger(__name__)
Send = Callable[[Settings, str, str], None]


def send_entry(session: Session, settings: Settings, entry: OutboxEntry, send: Send = enqueue):
    """Send one entry and mark it sent (the caller commits). Raises when the broker is down."""
    send(settings, entry.job_id, entry.queue)
    entry.sent_at = utcnow()


def send_pending(factory: sessionmaker, settings: Settings, send: Send = enqueue) -> int:
    """Send every unsent entry, oldest first, each in its own transaction with its row
    locked; stops at the first broker error. On PostgreSQL an entry locked by someone else
    (the API sending it this very moment, see send_now) is skipped rather than sent twice:
    a second delivery is harmless (the claim is fenced) but costs the worker a fresh child
    process, and the next job would wait for it."""
    sent = 0
    with factory() as session:
        while True:
            entry = session.scalars(
                select(OutboxEntry)
                .where(OutboxEntry.sent_at.is_(None))
                .order_by(OutboxEntry.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if entry is None:
                break
            try:
                send_entry(session, settings, entry, send)
            except Exception:
                session.rollback()
                log.exception("broker unreachable; the unsent entries wait")
                break
            session.commit()
            sent += 1
    return sent


def send_now(session: Session, settings: Settings, entry_id: int, send: Send = enqueue) -> bool:
    """Send one committed entry at once (the API's fast path) unless the dispatcher has sent
    it meanwhile; its row stays locked until the caller commits, so the dispatcher skips it.
    True when this call sent it. Raises when the broker is down (the caller rolls back and
    the dispatcher sends it later)."""
    entry = session.scalars(
        select(OutboxEntry)
        .where(OutboxEntry.id == entry_id, OutboxEntry.sent_at.is_(None))
        .with_for_update()
    ).first()
    if entry is None:
        return False
    send_entry(session, settings, entry, send)
    return True


def _lost_workers(session: Session, job_ids: list[str]) -> list[tuple[str, str | None]]:
    """The workers that held the jobs just reaped, read in the reaping transaction (a new
    attempt may claim a job, and record its own worker, as soon as that commits)."""
    if not job_ids:
        return []
    return [
        tuple(r) for r in session.execute(select(Job.id, Job.worker).where(Job.id.in_(job_ids)))
    ]


def tick(factory: sessionmaker, settings: Settings, send: Send = enqueue) -> dict[str, int]:
    """One round: stop cancels past their grace period, reap expired leases, re-queue lost
    messages, send the outbox."""
    stopped = stop_overdue_cancels(factory, settings)
    for job_id, how in stopped:
        log.warning(
            "job %s: still cancelling after %.0fs; %s", job_id, settings.cancel_grace_s, how
        )
    with factory() as session, session.begin():
        reaped = lifecycle.reap_expired(session)
        lost = _lost_workers(session, [job_id for job_id, _ in reaped])
        requeued = lifecycle.requeue_unclaimed(
            session, utcnow() - timedelta(seconds=settings.redispatch_after_s)
        )
    for job_id, action in reaped:
        log.warning("job %s: lease expired, %s", job_id, action)
    for job_id, worker in lost:
        # Hung rather than dead? Stop it so it frees its slot (its writes are fenced off).
        # No revoke here: a redelivered message keeps the task id of the lost run.
        log.warning("job %s: %s", job_id, stop_worker(settings, worker, None, revoke=None))
    for job_id in requeued:
        log.warning("job %s: queued but never taken; sending again", job_id)
    return {
        "stopped": len(stopped),
        "reaped": len(reaped),
        "requeued": len(requeued),
        "sent": send_pending(factory, settings, send),
    }


def _deliver_callbacks(factory: sessionmaker, settings: Settings, stop: threading.Event) -> None:
    """Completion callbacks, in their own thread: a slow receiver never delays dispatching."""
    while not stop.is_set():
        try:
            deliver_due(factory, settings)
        except Exception:
            log.exception("callback round failed")
        stop.wait(settings.dispatch_interval_s)


def run(factory: sessionmaker, settings: Settings, stop: threading.Event) -> None:
    log.info("dispatcher running every %.1fs", settings.dispatch_interval_s)
    callbacks = threading.Thread(
        target=_deliver_callbacks, args=(factory, settings, stop), daemon=True
    )
    callbacks.start()
    while not stop.is_set():
        try:
            tick(factory, settings)
        except Exception:  # the database may be restarting: keep going
            log.exception("dispatcher round failed")
        stop.wait(settings.dispatch_interval_s)
    callbacks.join(timeout=settings.webhook_timeout_s + 5)
