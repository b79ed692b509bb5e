"""Who is calling: an API token from `Authorization: Bearer <token>` (or the dashboard's
`qf_token` cookie, same check). No token or an unknown one is 401; a token without the
scope an operation needs is 403; another team's job is 404, so ids never leak."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from api.deps import SessionDep
from jobs.auth import Principal, authenticate

bearer = HTTPBearer(auto_error=False, description="An API token: `Authorization: Bearer qf_...`")
cookie = APIKeyCookie(name="qf_token", auto_error=False, description="The dashboard's cookie.")

_VERBS = {"read": "read jobs", "submit": "submit or change jobs", "admin": "manage tokens"}


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def current_principal(
    request: Request,
    session: SessionDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    cookie_token: Annotated[str | None, Depends(cookie)],
) -> Principal:
    token = creds.credentials if creds else cookie_token
    if not token:
        raise _unauthorized("no API token: send `Authorization: Bearer <token>`")
    principal = authenticate(session, request.app.state.token_pepper, token)
    # End the read now: a request must not hold a pooled connection while it waits for a
    # worker thread to run its endpoint (under load that starves the pool).
    session.rollback()
    if principal is None:
        raise _unauthorized("the API token is unknown or revoked")
    return principal


def require(scope: str) -> Callable[..., Principal]:
    def check(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if not principal.can(scope):
            have = ", ".join(sorted(principal.scopes)) or "none"
            raise HTTPException(
                403,
                f"token {principal.name!r} (scopes: {have}) may not {_VERBS[scope]}: "
                f"it needs the {scope!r} scope",
            )
        return principal

    return check


Reader = Annotated[Principal, Depends(require("read"))]
Submitter = Annotated[Principal, Depends(require("submit"))]
Admin = Annotated[Principal, Depends(require("admin"))]
Caller = Annotated[Principal, Depends(current_principal)]
