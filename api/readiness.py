"""Whether the database and the broker answer: what /readyz reports."""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from jobs.db import engine_for

TIMEOUT_S = 2.0


def check_database(url: str) -> str | None:
    """None when a trivial query succeeds, else the error."""
    try:
        with engine_for(url).connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


@lru_cache(maxsize=4)
def _broker_engine(url: str) -> Engine:
    return create_engine(url, pool_pre_ping=True)


@lru_cache(maxsize=4)
def _redis(url: str):
    import redis

    return redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)


def check_broker(url: str) -> str | None:
    try:
        if url.startswith(("redis://", "rediss://")):
            _redis(url).ping()
        elif url.startswith("sqla+"):
            with _broker_engine(url.removeprefix("sqla+")).connect() as conn:
                conn.execute(text("SELECT 1"))
        else:
            from kombu import Connection

            with Connection(url, connect_timeout=TIMEOUT_S) as conn:
                conn.ensure_connection(max_retries=1, timeout=TIMEOUT_S)
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None
