"""/dashboard: the internal web pages, rendered on the server.

Reads go through the API's database session, limited to the viewer's team; changes (submit,
cancel, retry) are made by the page's JavaScript calling the REST API with the same token
(the `qf_token` cookie), so validation and permissions are the API's own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from api.dashboard import compare, identity, present, queries
from api.dashboard.events import log_line, sse
from api.dashboard.identity import Viewer
from api.deps import SessionDep
from jobs import lifecycle
from jobs.models import Job
from jobs.spec import (
    CALIBRATION_DATASETS,
    FORWARD_DTYPES,
    GROUP_SIZES,
    METHOD_BITS,
    PRIORITIES,
    Method,
)
from jobs.states import TERMINAL, State

HERE = Path(__file__).parent / "dashboard"
PREFIX = "/dashboard"
router = APIRouter(prefix=PREFIX, include_in_schema=False)
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.globals.update(present=present, prefix=PREFIX)
templates.env.filters.update(age=present.age, size=present.size, duration=present.duration)
static = StaticFiles(directory=HERE / "static")

STREAM_POLL_S = 0.5
STREAM_KEEPALIVE_S = 15.0
# A stream ends after this long and the browser reconnects with Last-Event-ID: no connection
# outlives a redeploy by much, and a revoked token stops receiving within this time.
STREAM_MAX_S = 300.0


class LoginRequired(Exception):
    """Raised by the viewer dependency; the app turns it into a redirect to the login page."""

    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


def login_redirect(_request: Request, exc: LoginRequired) -> RedirectResponse:
    return RedirectResponse(f"{PREFIX}/login?{urlencode({'next': exc.next_url})}", 303)


def current_viewer(request: Request, session: SessionDep) -> Viewer:
    viewer = identity.resolve(request, session, identity.token_of(request))
    if viewer is None:
        nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(nxt)
    return viewer


ViewerDep = Annotated[Viewer, Depends(current_viewer)]


def _page(request: Request, name: str, viewer: Viewer | None, status: int = 200, **ctx: Any):
    ctx.update(viewer=viewer)
    return templates.TemplateResponse(request, name, ctx, status_code=status)


def _filters(
    state: str = "", model: str = "", method: str = "", label: str = "", owner: str = ""
) -> queries.Filters:
    return queries.Filters(
        state=state, model=model.strip(), method=method, label=label.strip(), owner=owner.strip()
    )


FiltersDep = Annotated[queries.Filters, Depends(_filters)]


@router.get("", response_class=HTMLResponse)
def jobs_page(
    request: Request, session: SessionDep, viewer: ViewerDep, filters: FiltersDep
) -> Response:
    jobs = queries.list_jobs(session, viewer, filters)
    return _page(
        request,
        "jobs.html",
        viewer,
        jobs=jobs,
        filters=filters,
        states=[s.value for s in State],
        methods=[m.value for m in Method],
        after=queries.latest_event_id(session),
    )


@router.get("/rows/{job_id}", response_class=HTMLResponse)
def job_row(
    job_id: str, request: Request, session: SessionDep, viewer: ViewerDep, filters: FiltersDep
) -> Response:
    """One row of the jobs list; 204 when the job is not (or no longer) in the filtered list."""
    job = queries.visible_job(session, viewer, job_id)
    if job is None or not filters.matches(job):
        return Response(status_code=204)
    return _page(request, "_row.html", viewer, job=job)


@router.get("/stream")
async def stream(
    request: Request,
    viewer: ViewerDep,
    after: Annotated[int, Query(ge=0)] = 0,
) -> StreamingResponse:
    """Server-sent `job` events ({job_id, kind, ...data}) of every job the viewer may see."""
    last_id = request.headers.get("last-event-id", "")
    start = int(last_id) if last_id.isdigit() else after
    make_session = request.app.state.session_factory

    def read(since: int) -> list[tuple[int, str, str, dict]]:
        with make_session() as s:
            return [
                (e.id, e.job_id, e.kind, e.data) for e in queries.events_since(s, viewer, since)
            ]

    async def events() -> AsyncIterator[str]:
        yield "retry: 2000\n\n"
        last, began, quiet = start, time.monotonic(), 0.0
        while time.monotonic() - began < STREAM_MAX_S:
            if await request.is_disconnected():
                return
            batch = await run_in_threadpool(read, last)
            for event_id, job_id, kind, data in batch:
                yield sse(event_id, "job", {"job_id": job_id, "kind": kind, **data})
                last = event_id
            if batch:
                quiet = 0.0
                continue
            await asyncio.sleep(STREAM_POLL_S)
            quiet += STREAM_POLL_S
            if quiet >= STREAM_KEEPALIVE_S:
                yield ": keep-alive\n\n"
                quiet = 0.0

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def _job_context(session, viewer: Viewer, job: Job) -> dict[str, Any]:
    events = queries.job_events(session, job.id)
    eta = next((e.data.get("eta_s") for e in reversed(events) if e.kind == "progress"), None)
    results = job.results or {}
    files = sorted((results.get("files") or {}).items())
    return dict(
        job=job,
        spec_json=lifecycle.job_spec(job).model_dump_json(indent=2, exclude_none=True),
        results=results,
        files=files,
        log=[(e.id, e.created_at, log_line(e.kind, e.data)) for e in events],
        last_event_id=events[-1].id if events else 0,
        eta_s=eta if job.state == State.running.value else None,
        terminal=State(job.state) in TERMINAL,
        can_change=viewer.can_change(job.team),
    )


def _visible_or_404(session, viewer: Viewer, job_id: str) -> Job:
    job = queries.visible_job(session, viewer, job_id)
    if job is None:
        raise HTTPException(404, f"no job with id {job_id}")
    return job


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, request: Request, session: SessionDep, viewer: ViewerDep) -> Response:
    job = _visible_or_404(session, viewer, job_id)
    return _page(request, "job.html", viewer, **_job_context(session, viewer, job))


@router.get("/jobs/{job_id}/panel", response_class=HTMLResponse)
def job_panel(job_id: str, request: Request, session: SessionDep, viewer: ViewerDep) -> Response:
    """The job page's body, swapped in when the job changes state."""
    job = _visible_or_404(session, viewer, job_id)
    return _page(request, "_job_panel.html", viewer, **_job_context(session, viewer, job))


@router.get("/compare", response_class=HTMLResponse)
def compare_page(
    request: Request,
    session: SessionDep,
    viewer: ViewerDep,
    model: str = "",
    x: compare.XAxis = "bpw",
) -> Response:
    models = queries.finished_models(session, viewer)
    model = model or (models[0] if models else "")
    jobs = queries.finished_jobs(session, viewer, model) if model else []
    pts = [
        p
        for j in jobs
        if (p := compare.point_of(j.id, lifecycle.job_spec(j).model_dump(), j.results))
    ]
    points = compare.with_front(pts, x)
    return _page(
        request,
        "compare.html",
        viewer,
        models=models,
        model=model,
        x=x,
        x_labels=compare.X_LABELS,
        points=points,
        plot=compare.plot(points, x),
        colours=compare.METHOD_COLOURS,
        skipped=len(jobs) - len(points),
    )


@router.get("/submit", response_class=HTMLResponse)
def submit_page(request: Request, viewer: ViewerDep) -> Response:
    if not viewer.can_submit:
        return _page(
            request,
            "message.html",
            viewer,
            status=403,
            title="Submitting needs a token with the submit scope",
            text="Your token may only read. Ask your team for a token with the submit scope.",
        )
    return _page(
        request,
        "submit.html",
        viewer,
        methods=[m.value for m in Method],
        bits={m.value: list(b) for m, b in METHOD_BITS.items()},
        group_sizes=list(GROUP_SIZES),
        datasets=list(CALIBRATION_DATASETS),
        forward_dtypes=list(FORWARD_DTYPES),
        priorities=list(PRIORITIES),
    )


def _safe_next(nxt: str) -> str:
    """Only paths of this dashboard: a login link cannot send anyone elsewhere."""
    return nxt if nxt.startswith(PREFIX) and not nxt.startswith("//") else PREFIX


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = PREFIX) -> Response:  # noqa: A002 - query name
    return _page(request, "login.html", None, next=_safe_next(next), error=None)


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    session: SessionDep,
    token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = PREFIX,  # noqa: A002 - form field name
) -> Response:
    token = token.strip()
    viewer = identity.resolve(request, session, token) if token else None
    if viewer is None:
        error = "Paste a token." if not token else "That token is not valid (unknown or revoked)."
        return _page(request, "login.html", None, 401, next=_safe_next(next), error=error)
    response = RedirectResponse(_safe_next(next), 303)
    response.set_cookie(
        identity.COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse(f"{PREFIX}/login", 303)
    response.delete_cookie(identity.COOKIE, path="/", httponly=True, samesite="strict")
    return response


def install(app) -> None:
    """Mount the dashboard on the app: pages, static files, the login redirect, `/`."""
    app.include_router(router)
    app.mount(f"{PREFIX}/static", static, name="dashboard-static")
    app.add_exception_handler(LoginRequired, login_redirect)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(PREFIX, 307)
