"""API tokens: created once (the plain token is shown then and never again), stored as an
HMAC-SHA256 of the token under a server-side pepper, scoped (submit, read, admin) and bound
to a team. Tokens are 256-bit random strings, so a fast keyed hash is enough: there is
nothing to brute-force, and the pepper keeps a leaked table useless on its own."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.models import ApiToken, utcnow
from jobs.settings import Settings

SCOPES = ("submit", "read", "admin")
TOKEN_PREFIX = "qf_"
TEAM_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,99}$"


class TokenError(ValueError):
    """A token request that cannot be honoured; the message names the field."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id and name, its team and scopes."""

    token_id: str
    name: str
    team: str
    scopes: frozenset[str]

    def can(self, scope: str) -> bool:
        # admin may do everything a team member may, in its own team.
        return scope in self.scopes or "admin" in self.scopes


def pepper(settings: Settings) -> bytes:
    """QF_TOKEN_PEPPER; on the embedded default (SQLite) a random one kept in home, created
    on first use. Outside it the pepper must be set: API replicas must agree on it."""
    if settings.token_pepper:
        return settings.token_pepper.encode()
    if not settings.database_url.startswith("sqlite"):
        raise RuntimeError(
            "QF_TOKEN_PEPPER is not set: with a shared database every API process must hash "
            "tokens with the same secret (e.g. `openssl rand -hex 32`)"
        )
    path = Path(settings.home) / "token-pepper"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def hash_token(token: str, key: bytes) -> str:
    return hmac.new(key, token.encode(), hashlib.sha256).hexdigest()


def parse_scopes(scopes: str | list[str]) -> list[str]:
    items = scopes.split(",") if isinstance(scopes, str) else list(scopes)
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise TokenError(f"scopes: give at least one of {', '.join(SCOPES)}")
    unknown = [s for s in items if s not in SCOPES]
    if unknown:
        raise TokenError(f"scopes: unknown {', '.join(unknown)}; choose from {', '.join(SCOPES)}")
    return sorted(set(items), key=SCOPES.index)


def check_team(team: str) -> str:
    if not re.match(TEAM_PATTERN, team):
        raise TokenError(f"team: {team!r} must match {TEAM_PATTERN}")
    return team


def create_token(
    session: Session,
    key: bytes,
    team: str,
    scopes: str | list[str],
    name: str | None = None,
    created_by: str | None = None,
) -> tuple[ApiToken, str]:
    """A new token row (in the caller's transaction) and the plain token, to show once."""
    check_team(team)
    parsed = parse_scopes(scopes)
    name = name or f"{team}-{secrets.token_hex(3)}"
    if not re.match(NAME_PATTERN, name):
        raise TokenError(f"name: {name!r} must match {NAME_PATTERN}")
    plain = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        name=name,
        team=team,
        scopes=parsed,
        token_hash=hash_token(plain, key),
        prefix=plain[:10],
        created_by=created_by,
    )
    session.add(row)
    session.flush()
    return row, plain


def authenticate(session: Session, key: bytes, token: str) -> Principal | None:
    """The principal of a live token, or None (unknown, revoked, malformed)."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    digest = hash_token(token, key)
    row = session.scalars(select(ApiToken).where(ApiToken.token_hash == digest)).first()
    # The lookup is by digest; compare again in constant time before trusting it.
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.token_hash, digest):
        return None
    return Principal(row.id, row.name, row.team, frozenset(row.scopes))


def list_tokens(session: Session, team: str | None = None) -> list[ApiToken]:
    q = select(ApiToken).order_by(ApiToken.created_at, ApiToken.id)
    if team:
        q = q.where(ApiToken.team == team)
    return list(session.scalars(q))


def revoke_token(session: Session, token_id: str) -> ApiToken | None:
    row = session.get(ApiToken, token_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
    return row
