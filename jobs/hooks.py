"""Inbound Hub webhooks: a push to a watched model's branch creates that watch's matrix of
jobs, pinned to the pushed commit, once per (webhook id, repo, sha)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.models import Job, WatchedRepo
from jobs.settings import Settings
from jobs.spec import JobSpec
from jobs.submission import DuplicateInFlight, submit

HOOK_OWNER = "hf-webhook"


@dataclass(frozen=True)
class Push:
    webhook_id: str
    repo: str
    branch: str
    sha: str


def parse_push(payload: dict[str, Any]) -> tuple[Push | None, str]:
    """The model push a Hub webhook payload announces, or None and why it is ignored."""
    event = payload.get("event") or {}
    repo = payload.get("repo") or {}
    if event.get("scope") != "repo.content" or event.get("action") != "update":
        return None, f"event {event.get('scope')}/{event.get('action')} is not a content push"
    if repo.get("type") != "model":
        return None, f"repo type {repo.get('type')!r} is not a model"
    webhook_id = str((payload.get("webhook") or {}).get("id") or "")
    for ref in payload.get("updatedRefs") or []:
        name, sha = str(ref.get("ref", "")), ref.get("newSha")
        if name.startswith("refs/heads/") and sha:
            return Push(
                webhook_id, str(repo.get("name")), name.removeprefix("refs/heads/"), sha
            ), ""
    if repo.get("headSha"):  # no refs listed: the main branch moved to headSha
        return Push(webhook_id, str(repo.get("name")), "main", repo["headSha"]), ""
    return None, "no updated branch in the payload"


def validate_watch_specs(model_id: str, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each entry of a watch's matrix is a JobSpec without model_id and revision (the push
    sets them). Raises ValueError naming `specs[i].field`."""
    for i, spec in enumerate(specs):
        for fixed in ("model_id", "revision"):
            if fixed in spec:
                raise ValueError(f"specs[{i}].{fixed}: set by the push; leave it out")
        try:
            JobSpec.model_validate({**spec, "model_id": model_id})
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            raise ValueError(f"specs[{i}]{'.' + loc if loc else ''}: {msg}") from None
    return specs


def _dedupe_key(push: Push, watch: WatchedRepo, index: int) -> str:
    return f"hf:{push.webhook_id}:{push.repo}@{push.sha}:{watch.id}:{index}"[:200]


def _create(session: Session, settings: Settings, push: Push) -> list[tuple[Job, bool]]:
    watches = session.scalars(
        select(WatchedRepo).where(
            WatchedRepo.model_id == push.repo, WatchedRepo.branch == push.branch
        )
    ).all()
    out = []
    for watch in watches:
        for i, entry in enumerate(watch.specs):
            spec = JobSpec.model_validate({**entry, "model_id": push.repo, "revision": push.sha})
            out.append(
                submit(
                    session,
                    spec,
                    settings,
                    team=watch.team,
                    owner=HOOK_OWNER,
                    idempotency_key=_dedupe_key(push, watch, i),
                )
            )
    return out


def jobs_for_push(session: Session, settings: Settings, push: Push) -> list[tuple[Job, bool]]:
    """The jobs of every watch on the pushed repo and branch: created now (True) or found from
    an earlier delivery of the same push (False). The caller commits."""
    try:
        return _create(session, settings, push)
    except DuplicateInFlight:
        # The same push delivered twice at once: the other request made them; find them.
        return _create(session, settings, push)
