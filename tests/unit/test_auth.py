"""Tokens, scopes and teams over the real app (SQLite): every /v1 operation answers 401
without a valid token, 403 without its scope, and 404 for another team's job."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from jobs import lifecycle
from jobs.auth import authenticate, create_token, hash_token, pepper, revoke_token
from jobs.db import session_scope, upgrade
from jobs.models import ApiToken
from jobs.settings import Settings
from jobs.spec import JobSpec

SPEC = {"model_id": "a/b", "method": "rtn", "bits": 4, "group_size": 64}


@pytest.fixture
def env(tmp_path):
    settings = Settings(home=tmp_path)
    upgrade(settings.database_url)
    key = pepper(settings)
    tokens = {}
    with session_scope(settings.database_url) as s:
        for name, team, scopes in [
            ("alpha-rw", "alpha", "submit,read"),
            ("alpha-ro", "alpha", "read"),
            ("alpha-submit", "alpha", "submit"),
            ("alpha-admin", "alpha", "admin"),
            ("beta-rw", "beta", "submit,read"),
        ]:
            tokens[name] = create_token(s, key, team, scopes, name)[1]
        job = lifecycle.create_job(s, JobSpec(**SPEC), team="alpha", owner="alpha-rw").id
    with TestClient(create_app(settings)) as c:
        yield c, tokens, job, settings


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# (method, path, scope needed, json body)
OPERATIONS = [
    ("GET", "/v1/jobs", "read", None),
    ("POST", "/v1/jobs", "submit", SPEC),
    ("GET", "/v1/jobs/{job}", "read", None),
    ("POST", "/v1/jobs/{job}/cancel", "submit", None),
    ("POST", "/v1/jobs/{job}/retry", "submit", None),
    ("GET", "/v1/jobs/{job}/events", "read", None),
    ("GET", "/v1/jobs/{job}/artifacts", "read", None),
    ("GET", "/v1/calibration/nope", "read", None),
    ("GET", "/v1/tokens", "admin", None),
    ("POST", "/v1/tokens", "admin", {"scopes": ["read"]}),
    ("GET", "/v1/watches", "admin", None),
]
WITHOUT = {"read": "alpha-submit", "submit": "alpha-ro", "admin": "alpha-rw"}


@pytest.mark.parametrize(("method", "path", "scope", "body"), OPERATIONS)
def test_auth_matrix(env, method, path, scope, body):
    c, tokens, job, _ = env
    url = path.format(job=job)
    r = c.request(method, url, json=body)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "no API token" in r.json()["detail"]
    r = c.request(method, url, json=body, headers=bearer("qf_not-a-real-token"))
    assert r.status_code == 401 and "unknown or revoked" in r.json()["detail"]
    r = c.request(method, url, json=body, headers=bearer(tokens[WITHOUT[scope]]))
    assert r.status_code == 403, r.text
    assert f"needs the {scope!r} scope" in r.json()["detail"]
    if "{job}" in path:  # another team's job does not exist for this token
        r = c.request(method, url, json=body, headers=bearer(tokens["beta-rw"]))
        assert r.status_code == 404 and job in r.json()["detail"]


def test_team_sees_only_its_jobs_and_records_owner(env):
    c, tokens, job, _ = env
    beta = c.post("/v1/jobs", json=SPEC, headers=bearer(tokens["beta-rw"])).json()
    assert (beta["team"], beta["owner"], beta["queue"]) == ("beta", "beta-rw", "gpu-default")
    alpha_ids = [
        j["id"] for j in c.get("/v1/jobs", headers=bearer(tokens["alpha-ro"])).json()["items"]
    ]
    beta_ids = [
        j["id"] for j in c.get("/v1/jobs", headers=bearer(tokens["beta-rw"])).json()["items"]
    ]
    assert alpha_ids == [job] and beta_ids == [beta["id"]]


def test_cookie_is_accepted_like_the_header(env):
    c, tokens, job, _ = env
    c.cookies.set("qf_token", tokens["alpha-ro"])
    assert c.get(f"/v1/jobs/{job}").status_code == 200
    c.cookies.clear()


def test_tokens_are_hashed_with_the_pepper_shown_once_and_revocable(env):
    c, tokens, _, settings = env
    admin = bearer(tokens["alpha-admin"])
    r = c.post("/v1/tokens", json={"team": "gamma", "scopes": ["submit", "read"]}, headers=admin)
    assert r.status_code == 201
    made = r.json()
    plain = made["token"]
    assert (
        plain.startswith("qf_") and made["team"] == "gamma" and made["scopes"] == ["submit", "read"]
    )
    with session_scope(settings.database_url) as s:
        row = s.scalars(select(ApiToken).where(ApiToken.id == made["id"])).one()
        assert row.token_hash == hash_token(plain, pepper(settings)) != plain
        # Without the server's pepper the stored hash is useless.
        assert authenticate(s, b"another pepper", plain) is None
    listed = c.get("/v1/tokens", headers=admin).json()
    assert made["id"] in [t["id"] for t in listed]
    assert plain not in c.get("/v1/tokens", headers=admin).text
    assert all("token" not in t and "token_hash" not in t for t in listed)
    # A gamma job works, then the token is revoked and stops working at once.
    assert c.post("/v1/jobs", json=SPEC, headers=bearer(plain)).status_code == 201
    assert c.delete(f"/v1/tokens/{made['id']}", headers=admin).json()["revoked_at"]
    assert c.get("/v1/jobs", headers=bearer(plain)).status_code == 401


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"scopes": ["root"]}, "scopes: unknown root"),
        ({"scopes": ["read"], "team": "Bad Team"}, "team: 'Bad Team' must match"),
        ({"scopes": []}, "scopes"),
    ],
)
def test_bad_token_requests_name_the_field(env, body, words):
    c, tokens, _, _ = env
    r = c.post("/v1/tokens", json=body, headers=bearer(tokens["alpha-admin"]))
    assert r.status_code == 422 and words in r.json()["message"]


def test_cli_token_create_prints_a_working_token_once(env, tmp_path):
    import subprocess
    import sys

    _, _, _, settings = env
    p = subprocess.run(
        [sys.executable, "-m", "quantfoundry", "token", "create", "--team", "ops"]
        + ["--scopes", "admin", "--name", "bootstrap"],
        env={"QF_HOME": str(settings.home), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    plain = p.stdout.strip()
    assert "shown once" in p.stderr and plain not in p.stderr
    with session_scope(settings.database_url) as s:
        who = authenticate(s, pepper(settings), plain)
    assert who is not None and (who.name, who.team, who.scopes) == ("bootstrap", "ops", {"admin"})


def test_a_token_revoked_elsewhere_is_refused_within_the_cache_bound(tmp_path):
    """Each API process remembers a live token for QF_TOKEN_CACHE_S: a revocation written
    by another process (here straight to the database, as `quantfoundry token revoke` does)
    is honoured once that has passed, and not a moment later."""
    import time

    ttl = 1.5
    settings = Settings(home=tmp_path, token_cache_s=ttl)
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as s:
        row, plain = create_token(s, pepper(settings), "alpha", "read")
        token_id = row.id
    with TestClient(create_app(settings)) as c:
        assert c.get("/v1/jobs", headers=bearer(plain)).status_code == 200
        remembered = time.monotonic()
        with session_scope(settings.database_url) as s:
            revoke_token(s, token_id)
        revoked = time.monotonic()
        first = c.get("/v1/jobs", headers=bearer(plain)).status_code
        if time.monotonic() < remembered + ttl:
            assert first == 200  # still remembered: the cache is in use
        while c.get("/v1/jobs", headers=bearer(plain)).status_code == 200:
            assert time.monotonic() < revoked + ttl, "a revoked token outlived the cache bound"
            time.sleep(0.05)
        # Once refused it stays refused: a revoked token is never remembered.
        for _ in range(3):
            assert c.get("/v1/jobs", headers=bearer(plain)).status_code == 401


def test_the_token_cache_keeps_teams_apart_and_forgets_what_it_must(env):
    c, tokens, job, _ = env
    alpha, beta = bearer(tokens["alpha-rw"]), bearer(tokens["beta-rw"])
    theirs = c.post("/v1/jobs", json=SPEC, headers=beta).json()["id"]
    for _ in range(2):  # the second round is served from the cache
        assert [j["id"] for j in c.get("/v1/jobs", headers=alpha).json()["items"]] == [job]
        assert [j["id"] for j in c.get("/v1/jobs", headers=beta).json()["items"]] == [theirs]
        assert c.get(f"/v1/jobs/{theirs}", headers=alpha).status_code == 404
        assert c.get(f"/v1/jobs/{job}", headers=beta).status_code == 404
        # Scopes come with the token: a cached read-only token still may not submit.
        r = c.post("/v1/jobs", json=SPEC, headers=bearer(tokens["alpha-ro"]))
        assert r.status_code == 403
    # A token that revokes itself is refused at once by this process.
    me = c.get("/v1/tokens", headers=bearer(tokens["alpha-admin"])).json()
    ro_id = next(t["id"] for t in me if t["name"] == "alpha-ro")
    assert c.delete(f"/v1/tokens/{ro_id}", headers=bearer(tokens["alpha-ro"])).status_code == 200
    assert c.get("/v1/jobs", headers=bearer(tokens["alpha-ro"])).status_code == 401


def test_principal_cache_expires_bounds_and_forgets():
    import time

    from jobs.auth import Principal, PrincipalCache

    p = Principal("t1", "n", "alpha", frozenset({"read"}))
    cache = PrincipalCache(ttl_s=0.2, max_entries=2)
    cache.put("d1", p)
    assert cache.get("d1") is p and cache.get("other") is None
    time.sleep(0.25)
    assert cache.get("d1") is None
    cache.put("d1", p)
    cache.put("d2", Principal("t2", "n2", "beta", frozenset({"read"})))
    cache.forget("t1")
    assert cache.get("d1") is None and cache.get("d2") is not None
    cache.put("d1", p)
    cache.put("d3", p)  # past max_entries: it starts over instead of growing
    assert len(cache._entries) <= 2
    off = PrincipalCache(ttl_s=0)
    off.put("d1", p)
    assert off.get("d1") is None
