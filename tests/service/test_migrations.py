"""Migrations on PostgreSQL: up to head, down to base, up again, and no drift from the models."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect

from jobs.db import alembic_config, check_migrated, downgrade, upgrade

pytestmark = pytest.mark.service


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_up_down_up_and_no_drift(postgres_url):
    upgrade(postgres_url)
    check_migrated(postgres_url)
    assert _tables(postgres_url) == {
        "jobs",
        "job_events",
        "outbox",
        "api_tokens",
        "calibration_uploads",
        "job_measurements",
        "webhook_deliveries",
        "watched_repos",
    }
    downgrade(postgres_url, "base")
    assert _tables(postgres_url) == set()
    upgrade(postgres_url)
    # Fails when the models and the migrations disagree (alembic autogenerate would emit ops).
    command.check(alembic_config(postgres_url))
