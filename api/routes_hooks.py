"""Inbound Hub webhooks (`POST /v1/hooks/hf`) and the watched repos they act on
(`/v1/watches`, admin): a push to a watched model's branch creates the watch's jobs once."""

from __future__ import annotations

import hmac
import json
import logging
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.auth import Admin
from api.deps import SessionDep, SettingsDep
from api.schemas import ERROR_BODY, HookResult, WatchIn, WatchOut
from jobs import hooks
from jobs.auth import TokenError, check_team
from jobs.dispatch import send_pending
from jobs.models import WatchedRepo
from jobs.settings import Settings
from jobs.submission import DuplicateInFlight, SpecRejected

log = logging.getLogger(__name__)
router = APIRouter(tags=["hooks"])


@router.post(
    "/v1/hooks/hf",
    response_model=HookResult,
    operation_id="hub_webhook",
    responses={
        401: {"description": "X-Webhook-Secret missing or wrong.", **ERROR_BODY},
        409: {"description": "The same push is being handled right now.", **ERROR_BODY},
        422: {"description": "Not a JSON object, or a watch's spec is refused.", **ERROR_BODY},
        503: {"description": "No secret configured (QF_HF_WEBHOOK_SECRET).", **ERROR_BODY},
    },
)
async def hub_webhook(
    request: Request,
    settings: SettingsDep,
    x_webhook_secret: Annotated[str | None, Header(description="The webhook's secret.")] = None,
) -> HookResult:
    """A Hugging Face Hub webhook. A push (`repo.content` update) to a watched model's branch
    creates each job of the watch's matrix, pinned to the pushed commit, exactly once per
    (webhook id, repo, sha): the Hub's redeliveries find the jobs already there."""
    if not settings.hf_webhook_secret:
        raise HTTPException(503, "Hub webhooks are not configured: set QF_HF_WEBHOOK_SECRET")
    given = (x_webhook_secret or "").encode()
    if not hmac.compare_digest(given, settings.hf_webhook_secret.encode()):
        raise HTTPException(401, "X-Webhook-Secret is missing or wrong")
    try:
        payload = json.loads(await request.body())
    except ValueError:
        raise HTTPException(422, "body: not JSON") from None
    if not isinstance(payload, dict):
        raise HTTPException(422, "body: not a JSON object")
    push, why = hooks.parse_push(payload)
    if push is None:
        return HookResult(created=[], existing=[], ignored=why)
    return await run_in_threadpool(_handle_push, request.app.state.session_factory, settings, push)


def _handle_push(factory, settings: Settings, push: hooks.Push) -> HookResult:
    with factory() as session:
        try:
            jobs = hooks.jobs_for_push(session, settings, push)
        except SpecRejected as e:
            raise HTTPException(422, f"a watch of {push.repo}: {e}") from e
        except DuplicateInFlight as e:
            raise HTTPException(409, str(e)) from e
        session.commit()
        created = [j.id for j, new in jobs if new]
        existing = [j.id for j, new in jobs if not new]
    if created:  # hand them to the broker now; the dispatcher would in a moment anyway
        try:
            send_pending(factory, settings)
        except Exception:
            log.warning("broker unreachable; %d hook jobs wait in the outbox", len(created))
    ignored = None if jobs else f"{push.repo}@{push.branch} is not watched"
    return HookResult(created=created, existing=existing, ignored=ignored)


@router.post(
    "/v1/watches",
    status_code=201,
    response_model=WatchOut,
    operation_id="create_watch",
    tags=["hooks"],
    responses={
        409: {
            "description": "This repo and branch are already watched for the team.",
            **ERROR_BODY,
        },
        422: {"description": "A spec of the matrix is invalid.", **ERROR_BODY},
    },
)
def create_watch(body: WatchIn, session: SessionDep, principal: Admin) -> WatchOut:
    """Watch a Hub model: each push to `branch` creates one job per entry of `specs`."""
    team = body.team or principal.team
    try:
        check_team(team)
        hooks.validate_watch_specs(body.model_id, body.specs)
    except (TokenError, ValueError) as e:
        raise HTTPException(422, str(e)) from e
    watch = WatchedRepo(model_id=body.model_id, branch=body.branch, team=team, specs=body.specs)
    session.add(watch)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise HTTPException(
            409, f"{body.model_id}@{body.branch} is already watched for team {team}"
        ) from None
    return WatchOut.model_validate(watch)


@router.get("/v1/watches", response_model=list[WatchOut], operation_id="list_watches")
def list_watches(session: SessionDep, _principal: Admin) -> list[WatchOut]:
    rows = session.scalars(select(WatchedRepo).order_by(WatchedRepo.created_at)).all()
    return [WatchOut.model_validate(w) for w in rows]


@router.delete(
    "/v1/watches/{watch_id}",
    status_code=204,
    operation_id="delete_watch",
    responses={404: {"description": "No such watch.", **ERROR_BODY}},
)
def delete_watch(watch_id: str, session: SessionDep, _principal: Admin) -> None:
    watch = session.get(WatchedRepo, watch_id)
    if watch is None:
        raise HTTPException(404, f"no watch with id {watch_id}")
    session.delete(watch)
    session.commit()
