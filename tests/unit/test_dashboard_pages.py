"""The dashboard's pages over HTTP (no browser, no worker): login and its cookie, what a token
of each scope is offered, team isolation, list filters, the compare view, failures in words.
Jobs are made and finished through jobs.lifecycle, as the API and a worker would."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.dashboard import queries
from api.dashboard.identity import Viewer
from jobs import auth, lifecycle
from jobs.db import session_factory, upgrade
from jobs.settings import Settings
from jobs.spec import JobSpec
from jobs.states import FailureReason


@pytest.fixture
def env(tmp_path):
    settings = Settings(home=tmp_path, token_pepper="test-pepper")
    upgrade(settings.database_url)
    make = session_factory(settings.database_url)
    with TestClient(create_app(settings), follow_redirects=False) as client:
        yield client, make


def _token(make, team: str, scopes: str, name: str) -> str:
    with make() as s:
        _, plain = auth.create_token(s, b"test-pepper", team, scopes, name=name)
        s.commit()
    return plain


def _job(make, team="ml", owner="alice", results=None, failure=None, **spec) -> str:
    spec = {"model_id": "org/base", "method": "rtn", "bits": 4, "group_size": 128, **spec}
    with make() as s:
        job = lifecycle.create_job(s, JobSpec(**spec), team=team, owner=owner)
        s.commit()
        if results is not None or failure is not None:
            attempt = lifecycle.claim(s, job.id, "test-worker")
            if failure:
                lifecycle.fail(s, job.id, attempt, *failure)
            else:
                lifecycle.succeed(s, job.id, attempt, results)
            s.commit()
        return job.id


def _login(client, token: str) -> None:
    r = client.post("/dashboard/login", data={"token": token, "next": "/dashboard/compare"})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/compare"


def test_login_sets_a_strict_httponly_cookie_and_logout_clears_it(env):
    client, make = env
    assert client.get("/dashboard").headers["location"] == "/dashboard/login?next=%2Fdashboard"
    bad = client.post("/dashboard/login", data={"token": "qf_nope"})
    assert bad.status_code == 401 and "not valid" in bad.text
    token = _token(make, "ml", "read", "viewer")
    r = client.post("/dashboard/login", data={"token": token, "next": "https://evil.example/"})
    assert r.headers["location"] == "/dashboard"  # never sent elsewhere
    cookie = r.headers["set-cookie"].lower()
    assert "qf_token=" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/dashboard").status_code == 200
    out = client.post("/dashboard/logout")
    assert out.status_code == 303 and 'qf_token=""' in out.headers["set-cookie"]


def test_read_only_token_is_offered_no_changes(env):
    client, make = env
    queued = _job(make)
    failed = _job(make, failure=(FailureReason.oom, "CUDA out of memory at layer 3"))
    _login(client, _token(make, "ml", "read", "viewer"))
    assert 'id="nav-submit"' not in client.get("/dashboard").text
    assert client.get("/dashboard/submit").status_code == 403
    assert 'id="cancel"' not in client.get(f"/dashboard/jobs/{queued}").text
    page = client.get(f"/dashboard/jobs/{failed}").text
    assert 'id="retry"' not in page
    # The failure in plain words, with the worker's own message.
    assert "ran out of memory" in page and "CUDA out of memory at layer 3" in page


def test_submit_token_is_offered_the_form_and_actions(env):
    client, make = env
    queued = _job(make)
    failed = _job(make, failure=(FailureReason.quality_gate, "perplexity rose 9% > 5%"))
    _login(client, _token(make, "ml", "submit,read", "alice"))
    assert 'id="nav-submit"' in client.get("/dashboard").text
    form = client.get("/dashboard/submit").text
    assert 'data-error-for="bits"' in form and 'data-error-for="calibration.n_samples"' in form
    # Every forward dtype the spec takes, "auto" chosen.
    assert 'name="calibration.forward_dtype"' in form
    options = "<option selected>auto</option><option >float32</option><option >bfloat16</option>"
    assert options in form
    assert 'id="cancel"' in client.get(f"/dashboard/jobs/{queued}").text
    page = client.get(f"/dashboard/jobs/{failed}").text
    assert 'id="retry"' in page and "missed the job&#39;s quality gate" in page


def test_another_teams_jobs_are_invisible(env):
    client, make = env
    theirs = _job(make, team="other", owner="carol")
    mine = _job(make, team="ml", owner="alice")
    _login(client, _token(make, "ml", "submit,read,admin", "root"))
    listing = client.get("/dashboard").text
    assert f"job-{mine}" in listing and f"job-{theirs}" not in listing
    assert client.get(f"/dashboard/jobs/{theirs}").status_code == 404
    assert client.get(f"/dashboard/rows/{theirs}").status_code == 204
    with make() as s:
        viewer = Viewer("root", "ml", frozenset({"admin"}))
        assert {e.job_id for e in queries.events_since(s, viewer, 0)} == {mine}


def test_list_filters_and_rows(env):
    client, make = env
    a = _job(make, labels={"release": "v1"}, method="gptq", owner="alice")
    b = _job(make, labels={"release": "v2"}, model_id="org/other", owner="bob")
    _login(client, _token(make, "ml", "read", "viewer"))

    def listed(**params) -> set[str]:
        text = client.get("/dashboard", params=params).text
        return {j for j in (a, b) if f"job-{j}" in text}

    assert listed() == {a, b}
    assert listed(method="gptq") == {a}
    assert listed(model="OTHER") == {b}
    assert listed(label="release=v1") == {a}
    assert listed(label="release") == {a, b}
    assert listed(owner="bob") == {b}
    assert listed(state="succeeded") == set()
    assert client.get(f"/dashboard/rows/{a}", params={"method": "rtn"}).status_code == 204
    row = client.get(f"/dashboard/rows/{a}", params={"method": "gptq"})
    assert row.status_code == 200 and "gptq w4 g128 asym" in row.text


def test_compare_view_plots_finished_jobs_and_the_front(env):
    client, make = env
    figures = {"ppl_base": 10.0, "ppl_quant": 10.5, "kl": 0.01, "top1": 0.95}
    rtn = _job(make, results={**figures, "ppl_change_pct": 5.0, "size_bytes": 1000})
    gptq = _job(make, method="gptq", results={**figures, "ppl_change_pct": 1.5, "size_bytes": 1000})
    w8 = _job(make, bits=8, group_size=-1, results={**figures, "ppl_change_pct": 0.2})
    _job(make, model_id="org/else", results={**figures, "ppl_change_pct": 1.0})
    _job(make)  # not finished: not a point
    _login(client, _token(make, "ml", "read", "viewer"))
    page = client.get("/dashboard/compare", params={"model": "org/base"}).text
    for job_id in (rtn, gptq, w8):
        assert f'data-job="{job_id}"' in page
    assert page.count("<circle") == 3 and 'id="front"' in page
    assert page.count('class="on-front"') == 2  # gptq w4 and rtn w8; rtn w4 is beaten
    assert "4.156" in page  # 4 + (16 + 4)/128 bits per weight
    # By size, the job without one is left out.
    by_size = client.get("/dashboard/compare", params={"model": "org/base", "x": "size"}).text
    assert by_size.count("<circle") == 2
    other = client.get("/dashboard/compare", params={"model": "org/else"}).text
    assert other.count("<circle") == 1
