"""The REST API's validation and its refusal to run on an unmigrated database (SQLite, no
worker needed: nothing invalid is ever enqueued). Requests carry a token of team `alpha`."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from jobs.auth import create_token, pepper
from jobs.db import NotMigratedError, session_scope, upgrade
from jobs.settings import Settings

GOOD = {
    "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "method": "rtn",
    "bits": 4,
    "group_size": 64,
}


def make_token(settings: Settings, team: str, scopes: str) -> str:
    with session_scope(settings.database_url) as s:
        return create_token(s, pepper(settings), team, scopes)[1]


@pytest.fixture
def client(tmp_path):
    settings = Settings(home=tmp_path)
    upgrade(settings.database_url)
    token = make_token(settings, "alpha", "submit,read")
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {token}"}) as c:
        yield c


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"bits": 5}, "bits", "rtn cannot produce 5-bit"),
        ({"bits": 16}, "bits", "choose one of 2, 3, 4, 8"),
        ({"group_size": 0}, "group_size", "not a supported group size"),
        ({"group_size": 100}, "group_size", "not a supported group size"),
        ({"method": "magic"}, "method", "rtn"),
        ({"model_id": ""}, "model_id", "at least 1 character"),
        ({"model_id": "   "}, "model_id", "must not be empty"),
        ({"model_id": "a/b/c d"}, "model_id", "not a Hub model id"),
        ({"calibration": {"n_samples": 0}}, "calibration.n_samples", "greater than or equal"),
        ({"calibration": {"dataset": "pile"}}, "calibration.dataset", "unknown dataset"),
        ({"colour": "red"}, "colour", "Extra inputs"),
        ({"awq": {"grid": 5}}, "awq", "AWQ options were given but method is rtn"),
        ({"method": "gptq", "gptq": {"damp": 0}}, "gptq.damp", "greater than 0"),
    ],
)
def test_bad_spec_is_422_naming_the_field(client, change, field, words):
    r = client.post("/v1/jobs", json={**GOOD, **change})
    assert r.status_code == 422
    body = r.json()
    assert body["message"].startswith(f"{field}: "), body
    assert words in body["message"]
    assert client.get("/v1/jobs").json()["items"] == []  # nothing stored


def test_missing_model_id_is_named(client):
    r = client.post("/v1/jobs", json={"bits": 4})
    assert r.status_code == 422
    assert r.json()["message"] == "model_id: Field required"


def test_unknown_job_is_404(client):
    r = client.get("/v1/jobs/nope")
    assert r.status_code == 404
    assert "nope" in r.json()["detail"]


def test_bad_cursor_is_422(client):
    r = client.get("/v1/jobs", params={"cursor": "garbage!"})
    assert r.status_code == 422
    assert "cursor" in r.json()["detail"]


def test_app_refuses_unmigrated_database(tmp_path):
    settings = Settings(home=tmp_path)
    with pytest.raises(NotMigratedError, match="quantfoundry db upgrade"):
        with TestClient(create_app(settings)):
            pass


def test_serve_command_refuses_unmigrated_database(tmp_path):
    env = {"QF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    p = subprocess.run(
        [sys.executable, "-m", "quantfoundry", "serve", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert "refusing to start" in p.stderr and "quantfoundry db upgrade" in p.stderr


def test_api_does_not_import_torch():
    code = "import api.app, sys; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
