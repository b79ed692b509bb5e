"""Job state changes: the transition table, fenced claims, pagination."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from jobs import lifecycle
from jobs.db import session_scope, upgrade
from jobs.models import Job
from jobs.settings import Settings
from jobs.spec import JobSpec
from jobs.states import FailureReason, State, TransitionError, check_transition


@pytest.fixture
def url(tmp_path):
    u = Settings(home=tmp_path).database_url
    upgrade(u)
    return u


def _new(url: str) -> str:
    with session_scope(url) as s:
        return lifecycle.create_job(s, JobSpec(model_id="a/b")).id


def test_transition_table():
    check_transition(State.queued, State.running)
    for src, dst in [
        (State.succeeded, State.running),
        (State.queued, State.succeeded),
        (State.cancelled, State.running),
    ]:
        with pytest.raises(TransitionError, match=f"from {src.value} to {dst.value}"):
            check_transition(src, dst)


def test_claim_is_fenced(url):
    job_id = _new(url)
    with session_scope(url) as s:
        assert lifecycle.claim(s, job_id, "w1") == 1
    # A duplicate delivery of the same message finds the job taken.
    with session_scope(url) as s:
        assert lifecycle.claim(s, job_id, "w2") is None
    with session_scope(url) as s:
        assert lifecycle.record_progress(s, job_id, 1, "quantize", 1, 2, "layer 1/2")
        # A stale attempt's writes match nothing.
        assert not lifecycle.record_progress(s, job_id, 0, "quantize", 2, 2, "stale")
        assert not lifecycle.succeed(s, job_id, 2, {})
    with session_scope(url) as s:
        assert lifecycle.fail(s, job_id, 1, FailureReason.oom, "too big")
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        assert (job.state, job.failure_reason, job.progress_message) == (
            "failed",
            "oom",
            "layer 1/2",
        )
        assert job.finished_at is not None
        assert lifecycle.claim(s, job_id, "w3") is None


def test_list_is_newest_first_with_stable_cursor(url):
    ids = [_new(url) for _ in range(5)]
    seen = []
    cursor = None
    with session_scope(url) as s:
        while True:
            page, cursor = lifecycle.list_jobs(s, 2, cursor)
            seen += [j.id for j in page]
            if cursor is None:
                break
    assert seen == ids[::-1]


def test_cancel_queued_running_and_finished(url):
    queued = _new(url)
    with session_scope(url) as s:
        job = lifecycle.request_cancel(s, queued)
        assert job.state == "cancelled" and job.finished_at is not None
        assert lifecycle.claim(s, queued, "w") is None  # a late delivery does not run it
        with pytest.raises(lifecycle.CancelRefused, match="already cancelled"):
            lifecycle.request_cancel(s, queued)

    running = _new(url)
    with session_scope(url) as s:
        assert lifecycle.claim(s, running, "w") == 1
        assert not lifecycle.cancel_requested(s, running, 1)
        assert lifecycle.request_cancel(s, running).state == "cancelling"
        assert lifecycle.cancel_requested(s, running, 1)
        # Progress of a run being cancelled is not recorded; the worker finishes the cancel.
        assert not lifecycle.record_progress(s, running, 1, "quantize", 1, 2, "x")
        assert lifecycle.finish_cancelled(s, running, 1)
        assert s.get(Job, running).state == "cancelled"

    late = _new(url)
    with session_scope(url) as s:
        lifecycle.claim(s, late, "w")
        lifecycle.request_cancel(s, late)
        # The run finished before it saw the cancel: the result stands.
        assert lifecycle.succeed(s, late, 1, {"ppl_quant": 1.0})
        assert s.get(Job, late).state == "succeeded"


def test_migrations_match_models_on_sqlite(url):
    from alembic import command

    from jobs.db import alembic_config, downgrade

    command.check(alembic_config(url))
    downgrade(url, "base")
    upgrade(url)
    command.check(alembic_config(url))


def test_reaper_retries_then_fails_worker_lost(url):
    from datetime import timedelta

    from jobs.models import OutboxEntry, utcnow

    with session_scope(url) as s:
        job_id = lifecycle.create_job(s, JobSpec(model_id="a/b"), max_attempts=2).id
    later = utcnow() + timedelta(seconds=10)
    for attempt in (1, 2):
        with session_scope(url) as s:
            assert lifecycle.claim(s, job_id, f"w{attempt}", lease_s=1) == attempt
            assert lifecycle.reap_expired(s) == []  # lease still valid
        with session_scope(url) as s:
            action = "retrying" if attempt == 1 else "failed"
            assert lifecycle.reap_expired(s, now=later) == [(job_id, action)]
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        assert (job.state, job.failure_reason, job.attempt) == ("failed", "worker_lost", 2)
        assert "2 of 2" in job.failure_message
        # One outbox entry from creation, one from the retry.
        assert len(s.scalars(select(OutboxEntry).where(OutboxEntry.job_id == job_id)).all()) == 2
        # A person retries it: a new attempt with a fresh budget.
        job = lifecycle.request_retry(s, job_id, budget=3)
        assert (job.state, job.failure_reason, job.max_attempts) == ("queued", None, 5)
        assert lifecycle.claim(s, job_id, "w3") == 3


def test_heartbeat_keeps_the_lease(url):
    from datetime import timedelta

    from jobs.models import utcnow

    job_id = _new(url)
    with session_scope(url) as s:
        lifecycle.claim(s, job_id, "w", lease_s=1)
        assert lifecycle.heartbeat(s, job_id, 1, lease_s=60)
        assert not lifecycle.heartbeat(s, job_id, 2, lease_s=60)  # not the holder
        assert lifecycle.reap_expired(s, now=utcnow() + timedelta(seconds=30)) == []


def test_requeue_unclaimed_sends_again(url):
    from datetime import timedelta

    from jobs.models import OutboxEntry, utcnow

    job_id = _new(url)
    with session_scope(url) as s:
        for e in s.scalars(select(OutboxEntry)).all():
            e.sent_at = utcnow() - timedelta(hours=1)
    with session_scope(url) as s:
        assert lifecycle.requeue_unclaimed(s, utcnow() - timedelta(minutes=5)) == [job_id]
    with session_scope(url) as s:  # the new entry is unsent: nothing more to add
        assert lifecycle.requeue_unclaimed(s, utcnow() - timedelta(minutes=5)) == []
