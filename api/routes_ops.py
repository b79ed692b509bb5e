"""/healthz (the process is up), /readyz (database and broker answer), /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.readiness import check_broker, check_database

router = APIRouter(tags=["ops"])


@router.get("/healthz", operation_id="healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    operation_id="readyz",
    responses={
        503: {
            "description": "The database or the broker does not answer; `failing` names it.",
            "content": {
                "application/json": {
                    "example": {
                        "status": "unavailable",
                        "failing": ["broker"],
                        "checks": {"database": "ok", "broker": "ConnectionError: ..."},
                    }
                }
            },
        }
    },
)
def readyz(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    checks = {
        "database": check_database(settings.database_url),
        "broker": check_broker(settings.broker_url),
    }
    failing = [name for name, err in checks.items() if err]
    body = {
        "status": "unavailable" if failing else "ok",
        "failing": failing,
        "checks": {name: err or "ok" for name, err in checks.items()},
    }
    return JSONResponse(body, status_code=503 if failing else 200)


@router.get(
    "/metrics",
    operation_id="metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
def metrics(request: Request) -> Response:
    """Prometheus text format (computed from the database, so every API replica agrees)."""
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
