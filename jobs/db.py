"""Engine and sessions from settings, and the check that the schema is migrated."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic_core import from_json
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

import migrations

POOL_SIZE = 20
POOL_OVERFLOW = 10


class NotMigratedError(RuntimeError):
    pass


def _json_loads(data: str | bytes) -> Any:
    """JSON columns: parsed by pydantic-core (Rust), the same values as json.loads in a
    fraction of the time (a page of 50 jobs holds some 400 JSON values)."""
    try:
        return from_json(data)
    except ValueError:  # what json accepts and pydantic-core does not: lone surrogates
        return json.loads(data)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            json_deserializer=_json_loads,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):
            # WAL lets the API read while the worker writes progress.
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # A connection for each of the API's worker threads (api.app limits them to POOL_SIZE):
    # connections past pool_size are closed when returned, and opening one costs PostgreSQL
    # a new backend process, so under load the pool must not overflow routinely.
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=POOL_SIZE,
        max_overflow=POOL_OVERFLOW,
        json_deserializer=_json_loads,
    )


_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}


def engine_for(url: str) -> Engine:
    """One engine (connection pool) per URL and process."""
    if url not in _engines:
        _engines[url] = make_engine(url)
    return _engines[url]


def forget_inherited_connections() -> None:
    """In a forked child: leave the parent's pooled connections to the parent (sharing one
    connection between processes corrupts its state) and start new pools. The engines stay:
    their dialect already knows the server, so the child's first connection skips that."""
    for engine in _engines.values():
        engine.dispose(close=False)


def connect_ahead(url: str) -> None:
    """Open one pooled connection now, so that the next session does not wait for it."""
    with engine_for(url).connect():
        pass


def session_factory(url: str) -> sessionmaker[Session]:
    """One session factory per URL and process (workers open a session per progress write)."""
    if url not in _factories:
        _factories[url] = sessionmaker(engine_for(url), expire_on_commit=False)
    return _factories[url]


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    with session_factory(url)() as session, session.begin():
        yield session


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def check_migrated(url: str) -> None:
    """Raise NotMigratedError, naming the command to run, unless the schema is at head."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    with engine_for(url).connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if current != head:
        raise NotMigratedError(
            f"database {engine_for(url).url.render_as_string(hide_password=True)} is at "
            f"revision {current or 'none (empty)'}, the code needs {head}: "
            "run `quantfoundry db upgrade` (same QF_DATABASE_URL) and start again"
        )
