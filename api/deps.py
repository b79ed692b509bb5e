"""Dependencies: the settings and one database session per request.

Both are `async def`: FastAPI runs a plain `def` dependency in the thread pool, and a hop
there and back costs more than making a Session object (which connects only when used)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from jobs.settings import Settings


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    session = request.app.state.session_factory()
    try:
        yield session
    finally:
        if session.in_transaction():
            # An endpoint that ended without ending its transaction (an error): the rollback
            # talks to the database, so not on the event loop.
            await run_in_threadpool(session.close)
        else:
            session.close()


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
