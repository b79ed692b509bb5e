"""The FastAPI app factory."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from api import routes_jobs
from jobs.db import check_migrated, session_factory
from jobs.settings import Settings, get_settings


def _readable(err: dict) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


async def _validation_error(_req: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    return JSONResponse(
        status_code=422,
        content={
            "message": "; ".join(_readable(e) for e in errors),
            "detail": [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in errors],
        },
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        check_migrated(settings.database_url)  # refuse to serve an unmigrated database
        yield

    app = FastAPI(
        title="quantfoundry",
        version="0.1.0",
        description="Batch quantization of LLMs: submit a job, watch it, fetch the artifact.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.session_factory = session_factory(settings.database_url)
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(routes_jobs.router)
    return app
