"""Who is calling: an API token from `Authorization: Bearer <token>` (or the dashboard's
`qf_token` cookie, same check). No token or an unknown one is 401; a token without the
scope an operation needs is 403; another team's job is 404, so ids never leak.

A live token is remembered for QF_TOKEN_CACHE_S seconds (jobs.auth.PrincipalCache), so most
requests do not read the token table; a token revoked through another process is refused
within that bound."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from jobs.auth import Principal, principal_for, token_digest

bearer = HTTPBearer(auto_error=False, description="An API token: `Authorization: Bearer qf_...`")
cookie = APIKeyCookie(name="qf_token", auto_error=False, description="The dashboard's cookie.")

_VERBS = {"read": "read jobs", "submit": "submit or change jobs", "admin": "manage tokens"}


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def _look_up(request: Request, digest: str) -> Principal | None:
    with request.app.state.session_factory() as session:
        return principal_for(session, digest)


async def current_principal(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    cookie_token: Annotated[str | None, Depends(cookie)],
) -> Principal:
    token = creds.credentials if creds else cookie_token
    if not token:
        raise _unauthorized("no API token: send `Authorization: Bearer <token>`")
    digest = token_digest(request.app.state.token_pepper, token)
    if digest is None:
        raise _unauthorized("the API token is unknown or revoked")
    cache = request.app.state.principals
    principal = cache.get(digest)
    if principal is None:
        # Its own short session: the connection is back in the pool before the endpoint
        # waits for a worker thread (under load, holding it across that wait starves the pool).
        principal = await run_in_threadpool(_look_up, request, digest)
        if principal is None:
            raise _unauthorized("the API token is unknown or revoked")
        cache.put(digest, principal)
    return principal


def require(scope: str) -> Callable[..., Principal]:
    async def check(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
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
