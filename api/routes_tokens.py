"""/v1/tokens: API tokens (admin). The token itself is returned once, at creation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request

from api.auth import Admin, Caller
from api.deps import SessionDep
from api.schemas import ERROR_BODY, TokenCreated, TokenIn, TokenOut
from jobs import auth
from jobs.models import ApiToken

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])
AUTH = {
    401: {"description": "No API token, or an unknown or revoked one.", **ERROR_BODY},
    403: {"description": "The token lacks the admin scope.", **ERROR_BODY},
}


def _out(row: ApiToken) -> dict:
    return {
        "id": row.id,
        "name": row.name,
        "team": row.team,
        "scopes": list(row.scopes),
        "prefix": row.prefix,
        "created_at": row.created_at,
        "created_by": row.created_by,
        "revoked_at": row.revoked_at,
    }


@router.post(
    "",
    status_code=201,
    response_model=TokenCreated,
    operation_id="create_token",
    responses={422: {"description": "Bad team, scopes or name.", **ERROR_BODY}} | AUTH,
)
def create_token(
    body: TokenIn, request: Request, session: SessionDep, principal: Admin
) -> TokenCreated:
    """A new token for a team (default: the caller's). Keep the `token` now: only its keyed
    hash is stored."""
    try:
        row, plain = auth.create_token(
            session,
            request.app.state.token_pepper,
            body.team or principal.team,
            body.scopes,
            body.name,
            created_by=principal.name,
        )
    except auth.TokenError as e:
        raise HTTPException(422, str(e)) from e
    session.commit()
    return TokenCreated(**_out(row), token=plain)


@router.get("", response_model=list[TokenOut], operation_id="list_tokens", responses=AUTH)
def list_tokens(
    session: SessionDep,
    _principal: Admin,
    team: Annotated[str | None, Query(max_length=100)] = None,
) -> list[TokenOut]:
    """Every token (no secrets), oldest first; `team` narrows to one team."""
    return [TokenOut(**_out(r)) for r in auth.list_tokens(session, team)]


@router.delete(
    "/{token_id}",
    response_model=TokenOut,
    operation_id="revoke_token",
    responses={404: {"description": "No such token.", **ERROR_BODY}} | AUTH,
)
def revoke_token(
    token_id: str, request: Request, session: SessionDep, principal: Caller
) -> TokenOut:
    """Revoke a token (admin; any token may also revoke itself). This API process refuses it
    at once; other API processes within QF_TOKEN_CACHE_S seconds (5 by default)."""
    if token_id != principal.token_id and not principal.can("admin"):
        raise HTTPException(403, "only an admin token may revoke other tokens")
    row = auth.revoke_token(session, token_id)
    if row is None:
        raise HTTPException(404, f"no token with id {token_id}")
    session.commit()
    request.app.state.principals.forget(token_id)
    return TokenOut(**_out(row))
