"""Prometheus metrics computed from the database at scrape time, so every API process (there
are several in production) reports the same figures: gauges from the job table, cumulative
histograms and counters from the append-only job_measurements rows."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker

from jobs.models import Job, JobMeasurement, OutboxEntry, WebhookDelivery, utcnow
from jobs.spec import Method
from jobs.states import State

QUEUE_WAIT_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600)
PHASE_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600)


def _histogram(
    session: Session, name: str, buckets: tuple[float, ...]
) -> list[tuple[str, list[tuple[str, float]], float]]:
    """(label, cumulative buckets, sum) per label of measurement `name`, in one query."""
    m = JobMeasurement
    cols = [func.sum(case((m.value <= b, 1), else_=0)) for b in buckets]
    rows = session.execute(
        select(m.label, func.count(), func.coalesce(func.sum(m.value), 0.0), *cols)
        .where(m.name == name)
        .group_by(m.label)
    ).all()
    out = []
    for label, count, total, *under in rows:
        pairs = [(str(float(b)), float(n or 0)) for b, n in zip(buckets, under, strict=True)]
        out.append((label, [*pairs, ("+Inf", float(count))], float(total)))
    return out


class DatabaseCollector(Collector):
    def __init__(self, factory: sessionmaker):
        self.factory = factory

    def collect(self) -> Iterator[Metric]:
        with self.factory() as session:
            yield from self._jobs(session)
            yield from self._measurements(session)
            yield from self._plumbing(session)

    def _jobs(self, session: Session) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "quantfoundry_jobs", "Jobs by state and method.", labels=["state", "method"]
        )
        counts = {
            (s, m): n
            for s, m, n in session.execute(
                select(Job.state, Job.method, func.count()).group_by(Job.state, Job.method)
            )
        }
        for state in State:  # every series exists from the start, at 0
            for method in Method:
                jobs.add_metric([state.value, method.value], counts.pop((state, method), 0))
        for (state, method), n in counts.items():
            jobs.add_metric([state, method], n)
        yield jobs
        stale = session.scalar(
            select(func.count()).where(
                Job.state.in_([State.running.value, State.cancelling.value]),
                Job.lease_expires_at < utcnow(),
            )
        )
        yield GaugeMetricFamily(
            "quantfoundry_stale_leases",
            "Running jobs whose worker stopped renewing the lease (the reaper takes them back).",
            value=stale or 0,
        )

    def _measurements(self, session: Session) -> Iterator[Metric]:
        wait = HistogramMetricFamily(
            "quantfoundry_queue_wait_seconds",
            "From queued to claimed by a worker, per attempt.",
            labels=["queue"],
        )
        attempts = CounterMetricFamily(
            "quantfoundry_job_attempts", "Attempts started (claims).", labels=["queue"]
        )
        for label, buckets, total in _histogram(session, "queue_wait", QUEUE_WAIT_BUCKETS):
            wait.add_metric([label], buckets, total)
            attempts.add_metric([label], buckets[-1][1])
        yield wait
        yield attempts
        phases = HistogramMetricFamily(
            "quantfoundry_phase_seconds",
            "Seconds per phase of succeeded jobs (load, calibrate, quantize, save, verify...).",
            labels=["phase"],
        )
        for label, buckets, total in _histogram(session, "phase", PHASE_BUCKETS):
            phases.add_metric([label], buckets, total)
        yield phases
        failures = CounterMetricFamily(
            "quantfoundry_job_failures", "Attempts that ended failed, by reason.", labels=["reason"]
        )
        for reason, n in session.execute(
            select(JobMeasurement.label, func.count())
            .where(JobMeasurement.name == "failure")
            .group_by(JobMeasurement.label)
        ):
            failures.add_metric([reason], n)
        yield failures

    def _plumbing(self, session: Session) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "quantfoundry_outbox_pending",
            "Jobs waiting to be handed to the broker.",
            value=session.scalar(select(func.count()).where(OutboxEntry.sent_at.is_(None))) or 0,
        )
        d = WebhookDelivery
        yield GaugeMetricFamily(
            "quantfoundry_callbacks_pending",
            "Completion callbacks not yet delivered.",
            value=session.scalar(
                select(func.count()).where(d.delivered_at.is_(None), d.failed_at.is_(None))
            )
            or 0,
        )
        yield CounterMetricFamily(
            "quantfoundry_callbacks_failed",
            "Completion callbacks given up after the last try.",
            value=session.scalar(select(func.count()).where(d.failed_at.is_not(None))) or 0,
        )
