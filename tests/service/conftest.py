"""The service tier: real PostgreSQL and Redis (found or started, never skipped), and the
service as separate processes on either backend."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
from sqlalchemy import create_engine, text

from tests.support.services import ServiceUnavailable, ensure_postgres, ensure_redis
from tests.support.stack import Stack, base_env


@pytest.fixture(scope="session")
def postgres_admin_url():
    try:
        server = ensure_postgres()
    except ServiceUnavailable as e:
        pytest.fail(str(e))
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def redis_url():
    try:
        server = ensure_redis()
    except ServiceUnavailable as e:
        pytest.fail(str(e))
    yield server.url
    server.stop()


@contextmanager
def fresh_database(admin_url: str, prefix: str = "qf_test") -> Iterator[str]:
    """A new PostgreSQL database, dropped on exit; yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def postgres_url(postgres_admin_url):
    """A fresh database for one test, dropped afterwards."""
    with fresh_database(postgres_admin_url) as url:
        yield url


@pytest.fixture(scope="module", params=["embedded", "cluster"])
def stack(request, tmp_path_factory, hub_cache):
    """The API and one worker as processes, shared by a module's tests (each test leaves it
    idle); `embedded` is SQLite + SQLAlchemy broker, `cluster` is PostgreSQL (a database of
    its own) + Redis."""
    root = tmp_path_factory.mktemp(f"stack-{request.param}")
    with ExitStack() as cleanup:
        if request.param == "embedded":
            env = base_env(root / "home", hub_cache)
        else:
            admin = request.getfixturevalue("postgres_admin_url")
            pg = cleanup.enter_context(fresh_database(admin))
            redis = request.getfixturevalue("redis_url")
            env = base_env(root / "home", hub_cache, database_url=pg, broker_url=redis + "/0")
        s = Stack(env=env, logs=root / "logs")
        cleanup.callback(s.stop)
        yield s.start()
