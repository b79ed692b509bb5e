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
import threading
import time
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


def token_digest(key: bytes, token: str) -> str | None:
    """The stored form of `token`, or None for something that cannot be a token."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    return hash_token(token, key)


def authenticate(session: Session, key: bytes, token: str) -> Principal | None:
    """The principal of a live token, or None (unknown, revoked, malformed)."""
    digest = token_digest(key, token)
    return None if digest is None else principal_for(session, digest)


def principal_for(session: Session, digest: str) -> Principal | None:
    """The principal of the live token stored as `digest`, or None."""
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


class PrincipalCache:
    """Recently seen live tokens (by digest) and their principals, for `ttl_s` seconds, so
    that a request need not read the token table. The price is the bound on revocation: a
    token revoked elsewhere (the CLI, another API process) keeps working here for at most
    `ttl_s`; `forget` makes a revocation through this process take effect at once. Unknown
    and revoked tokens are never cached. A principal carries its token's team and scopes,
    which never change, so a hit is exactly what the table would say but for revocation."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> Principal | None:
        hit = self._entries.get(digest)
        if hit is None:
            return None
        if time.monotonic() >= hit[0]:
            with self._lock:
                self._entries.pop(digest, None)
            return None
        return hit[1]

    def put(self, digest: str, principal: Principal) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                # Many distinct live tokens at once: start over rather than grow.
                self._entries.clear()
            self._entries[digest] = (time.monotonic() + self.ttl_s, principal)

    def forget(self, token_id: str) -> None:
        """Drop the token `token_id` (revoked through this process)."""
        with self._lock:
            for digest in [d for d, (_, p) in self._entries.items() if p.token_id == token_id]:
                del self._entries[digest]
