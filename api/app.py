"""The FastAPI app factory."""

from __future__ import annotations

import gc
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from api import (
    routes_dashboard,
    routes_hooks,
    routes_jobs,
    routes_ops,
    routes_tokens,
    routes_uploads,
)
from api.metrics import DatabaseCollector
from jobs.auth import PrincipalCache, pepper
from jobs.db import POOL_SIZE, check_migrated, session_factory
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


DESCRIPTION = """Batch quantization of LLMs: submit a job, watch it, fetch the artifact.

Every /v1 call needs an API token (`Authorization: Bearer <token>`, or the dashboard's
`qf_token` cookie) with the scope the operation names (`read`, `submit`, `admin`); a token
sees only its team's jobs. The first admin token comes from
`quantfoundry token create --team T --scopes admin`."""


def _allowed_methods(req: Request) -> str:
    """Every method of every route at this path (Starlette names only the first route's)."""
    methods: set[str] = set()
    for route in req.app.routes:
        match, _ = route.matches({**req.scope, "method": "GET"})
        if match != Match.NONE or route.matches({**req.scope, "method": "POST"})[0] != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


async def _http_error(req: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Every error body has `message` (what a person reads); `detail` stays for old clients."""
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(req)
    return JSONResponse(
        status_code=exc.status_code,
        content={"message": str(exc.detail), "detail": exc.detail},
        headers=headers or None,
    )


ERROR_SCHEMA = {
    "title": "Error",
    "type": "object",
    "required": ["message", "detail"],
    "properties": {
        "message": {"type": "string", "description": "What is wrong, naming the field."},
        "detail": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"$ref": "#/components/schemas/ValidationError"}},
            ]
        },
    },
}


def _openapi(app: FastAPI):
    """FastAPI's schema, with every error response documented as the body it really is:
    `{message, detail}` (see _http_error and _validation_error)."""

    def build() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        doc.setdefault("components", {}).setdefault("schemas", {})
        doc["components"]["schemas"]["HTTPValidationError"] = ERROR_SCHEMA
        ref = {"$ref": "#/components/schemas/HTTPValidationError"}
        for item in doc["paths"].values():
            for op in item.values():
                responses = op.setdefault("responses", {})
                if "requestBody" in op:
                    responses.setdefault("400", {"description": "The body could not be parsed."})
                if op.get("security"):
                    responses.setdefault("401", {"description": "No valid API token."})
                    responses.setdefault("403", {"description": "The token lacks the scope."})
                for status, resp in responses.items():
                    if status[0] in "45":
                        body = resp.setdefault("content", {}).setdefault("application/json", {})
                        body.setdefault("schema", ref)
        app.openapi_schema = doc
        return doc

    return build


def create_app(settings: Settings | None = None, *, serving: bool = False) -> FastAPI:
    """The app; `serving`: it is the server process's one app (see serving_app)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        check_migrated(settings.database_url)  # refuse to serve an unmigrated database
        # As many worker threads (sync endpoints) as pooled connections, not anyio's 40:
        # more threads than connections would open and close connections past the pool,
        # and on a few cores they only take turns on the GIL.
        to_thread.current_default_thread_limiter().total_tokens = POOL_SIZE
        if serving:
            # What start-up made (modules, the app: some 170k objects) lives as long as the
            # server: keep it out of the collector's full passes, which otherwise walk it
            # all and stall every request in flight for 0.1-0.3 s (seen on 2 cores).
            gc.collect()
            gc.freeze()
        yield

    app = FastAPI(
        title="quantfoundry",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.session_factory = session_factory(settings.database_url)
    app.state.token_pepper = pepper(settings)
    app.state.principals = PrincipalCache(settings.token_cache_s)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(app.state.session_factory))
    app.state.metrics = registry
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    app.include_router(routes_ops.router)
    app.include_router(routes_jobs.router)
    app.include_router(routes_uploads.router)
    app.include_router(routes_tokens.router)
    app.include_router(routes_hooks.router)
    routes_dashboard.install(app)
    app.openapi = _openapi(app)
    return app


def serving_app() -> FastAPI:
    """The app as `quantfoundry serve` runs it, in each of its processes."""
    return create_app(serving=True)
