"""Who is looking: the token from the `qf_token` cookie (or an Authorization header), checked
by the service's own token code, as a Viewer with a team and scopes.

The pages use it to show only what the token may do: a `read`-only token sees no submit form
and no cancel or retry buttons. The API enforces the same scopes on every call anyway."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from sqlalchemy.orm import Session

from jobs.auth import principal_for, token_digest

COOKIE = "qf_token"


@dataclass(frozen=True)
class Viewer:
    name: str
    team: str  # a token sees its own team's jobs only, admin ones too
    scopes: frozenset[str]

    @property
    def can_submit(self) -> bool:
        # The API's rule (jobs.auth.Principal.can): admin may do what submit may.
        return bool(self.scopes & {"submit", "admin"})

    def can_change(self, job_team: str) -> bool:
        """Whether cancel and retry are offered on a job of `job_team`."""
        return self.can_submit and job_team == self.team


def token_of(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.cookies.get(COOKIE) or None


def resolve(request: Request, session: Session, token: str | None) -> Viewer | None:
    """The viewer holding `token`, checked exactly as the API checks it; None when the token
    is missing, unknown or revoked."""
    digest = token_digest(request.app.state.token_pepper, token) if token else None
    if digest is None:
        return None
    # The API's cache too: the same revocation bound (QF_TOKEN_CACHE_S) as the REST calls.
    cache = request.app.state.principals
    principal = cache.get(digest)
    if principal is None:
        principal = principal_for(session, digest)
        if principal is None:
            return None
        cache.put(digest, principal)
    return Viewer(name=principal.name, team=principal.team, scopes=principal.scopes)
