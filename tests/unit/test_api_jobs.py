"""The job API beyond validation (SQLite, no worker): create-once (Idempotency-Key and
natural keys), list filters, artifacts, calibration uploads, /readyz, /metrics, and the
inbound Hub webhook."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from jobs import lifecycle
from jobs.auth import create_token, pepper
from jobs.db import session_scope, upgrade
from jobs.settings import Settings
from jobs.states import FailureReason

SPEC = {"model_id": "org/model-a", "method": "rtn", "bits": 4, "group_size": 64}


def _client(settings: Settings, team: str = "alpha", scopes: str = "submit,read") -> TestClient:
    with session_scope(settings.database_url) as s:
        token = create_token(s, pepper(settings), team, scopes)[1]
    return TestClient(create_app(settings), headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def settings(tmp_path):
    s = Settings(home=tmp_path, hf_webhook_secret="hook-secret")
    upgrade(s.database_url)
    return s


@pytest.fixture
def client(settings):
    with _client(settings) as c:
        yield c


def test_idempotency_key_creates_once(client):
    key = {"Idempotency-Key": "ci-run-1234"}
    first = client.post("/v1/jobs", json=SPEC, headers=key)
    assert first.status_code == 201
    # The same spec (here with a default spelled out) under the same key: the same job.
    again = client.post("/v1/jobs", json={**SPEC, "revision": "main"}, headers=key)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == f"/v1/jobs/{first.json()['id']}"
    other = client.post("/v1/jobs", json={**SPEC, "bits": 8}, headers=key)
    assert other.status_code == 422
    msg = other.json()["message"]
    assert "ci-run-1234" in msg and first.json()["id"] in msg and "differs in: bits" in msg
    assert len(client.get("/v1/jobs").json()["items"]) == 1


def test_natural_dedupe_maps_reruns_to_the_live_job(client, settings):
    a = client.post("/v1/jobs", json=SPEC, params={"dedupe": "natural"}).json()
    # Labels and priority are not part of the recipe: a CI re-run maps to the same job.
    b = client.post("/v1/jobs", json={**SPEC, "labels": {"ci": "2"}}, params={"dedupe": "natural"})
    assert b.status_code == 200 and b.json()["id"] == a["id"]
    # Without dedupe, or with another recipe, a new job.
    assert client.post("/v1/jobs", json=SPEC).status_code == 201
    c = client.post("/v1/jobs", json={**SPEC, "symmetric": True}, params={"dedupe": "natural"})
    assert c.status_code == 201
    # A failed job does not count: the re-run makes a new one.
    with session_scope(settings.database_url) as s:
        lifecycle.claim(s, c.json()["id"], "w")
    with session_scope(settings.database_url) as s:
        lifecycle.fail(s, c.json()["id"], 1, FailureReason.oom, "x")
    d = client.post("/v1/jobs", json={**SPEC, "symmetric": True}, params={"dedupe": "natural"})
    assert d.status_code == 201 and d.json()["id"] != c.json()["id"]
    assert client.post("/v1/jobs", json=SPEC, params={"dedupe": "maybe"}).status_code == 422


def test_list_filters_and_cursor(client, settings):
    made = []
    for i, (model, method, labels) in enumerate(
        [
            ("org/model-a", "rtn", {"release": "v1"}),
            ("org/model-a", "gptq", {"release": "v2"}),
            ("org/model-b", "rtn", {"release": "v1", "ci": "yes"}),
            ("org/model-b", "awq", {}),
        ]
    ):
        spec = {**SPEC, "model_id": model, "method": method, "labels": labels}
        made.append(client.post("/v1/jobs", json=spec).json()["id"])
        assert i == len(made) - 1
    with session_scope(settings.database_url) as s:
        lifecycle.claim(s, made[2], "w")

    def ids(**params):
        return [j["id"] for j in client.get("/v1/jobs", params=params).json()["items"]]

    assert ids(model="org/model-a") == [made[1], made[0]]
    assert ids(method="rtn") == [made[2], made[0]]
    assert ids(label="release=v1") == [made[2], made[0]]
    assert ids(label=["release=v1", "ci=yes"]) == [made[2]]
    assert ids(state="running") == [made[2]]
    assert ids(state=["running", "queued"], model="org/model-b") == [made[3], made[2]]
    # Filters and the cursor compose.
    page = client.get("/v1/jobs", params={"method": "rtn", "limit": 1}).json()
    assert [j["id"] for j in page["items"]] == [made[2]]
    nxt = client.get(
        "/v1/jobs", params={"method": "rtn", "limit": 1, "cursor": page["next_cursor"]}
    )
    assert [j["id"] for j in nxt.json()["items"]] == [made[0]]
    assert (
        client.get("/v1/jobs", params={"label": "novalue"})
        .json()["message"]
        .startswith("label: 'novalue' is not key=value")
    )
    assert client.get("/v1/jobs", params={"state": "sleeping"}).status_code == 422


def test_list_page_is_job_out_of_every_job(client, settings):
    """The list page is built from plain rows without pydantic (api.schemas.job_page_json):
    it must say exactly what JobOut.of says, for every kind of job."""
    from sqlalchemy import update

    from api.schemas import JobOut
    from jobs.models import Job
    from jobs.spec import JobSpec

    specs = [
        SPEC,
        {**SPEC, "method": "gptq", "gptq": {"damp": 0.05, "act_order": False}},
        {**SPEC, "method": "awq", "bits": 3, "group_size": 128, "symmetric": True},
        {
            **SPEC,
            "overrides": [{"pattern": r"down_proj$", "bits": 8}, {"pattern": "lm", "skip": True}],
            "ignore": ["lm_head", r"embed\.\w+"],
            "quality_gate": {"max_ppl_increase_pct": 5.0},
            "destination": {"kind": "hub", "namespace": "org", "private": False},
            "labels": {"release": "v1", "ci": "yes"},
            "priority": "high",
            "calibration": {"dataset": "file", "path": "/data/c.jsonl", "n_samples": 8},
            "evaluation": {"seq_len": 64, "max_windows": None},
        },
    ]
    ids = [client.post("/v1/jobs", json=s).json()["id"] for s in specs]
    with session_scope(settings.database_url) as s:
        # One with a callback (the API needs a signing secret for that), written directly.
        spec = JobSpec(**SPEC, callback_url="https://ci.example.com/hook")
        ids.append(lifecycle.create_job(s, spec, team="alpha").id)
        lifecycle.claim(s, ids[0], "host:1")
        lifecycle.record_progress(s, ids[0], 1, "quantize", 3, 30, "layer 3/30", eta_s=4.0)
        lifecycle.claim(s, ids[1], "host:2")
        lifecycle.fail(s, ids[1], 1, FailureReason.oom, "ran out of memory")
        lifecycle.claim(s, ids[2], "host:3")
        results = {"ppl": {"base": 12.5, "quant": 13.25}, "files": {"a": {"size": 1}}}
        lifecycle.succeed(s, ids[2], 1, {**results, "top1": 0.9, "note": 'ü ☃ "q"'})
        # A row written before calibration had text_field and seed: JobSpec fills defaults.
        old = {"dataset": "wiki-excerpt", "n_samples": 4, "seq_len": 64}
        s.execute(update(Job).where(Job.id == ids[3]).values(calibration=old))
    with session_scope(settings.database_url) as s:
        expected = [JobOut.of(j).model_dump(mode="json") for j in lifecycle.list_jobs(s, 50)[0]]
    r = client.get("/v1/jobs")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {"items": expected, "next_cursor": None}
    assert [j["id"] for j in expected] == ids[::-1]
    assert expected[1]["spec"]["calibration"]["text_field"] == "text"  # the old row
    assert expected[-2]["spec"]["gptq"]["damp"] == 0.05
    # Pages and filters go through the same path.
    page = client.get("/v1/jobs", params={"limit": 2, "state": ["queued", "running"]}).json()
    assert page["items"] == [e for e in expected if e["state"] in ("queued", "running")][:2]
    assert page["next_cursor"]

    # Not-a-number in someone's results (SQLite keeps it): null, as pydantic writes it.
    with session_scope(settings.database_url) as s:
        s.execute(update(Job).where(Job.id == ids[2]).values(results={"ppl": float("nan")}))
    body = client.get("/v1/jobs").text
    assert "NaN" not in body
    assert next(j for j in json.loads(body)["items"] if j["id"] == ids[2])["results"] == {
        "ppl": None
    }


def test_artifacts_of_a_succeeded_job(client, settings):
    job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
    r = client.get(f"/v1/jobs/{job_id}/artifacts")
    assert r.status_code == 409 and "queued" in r.json()["message"]
    files = {"model.safetensors": {"size": 1234, "sha256": "ab" * 32}}
    files["config.json"] = {"size": 56, "sha256": "cd" * 32}
    results = {
        "files": files,
        "artifact_path": "/data/artifacts/x",
        "artifact_bytes": 1290,
        "artifact_format": "pack-quantized",
    }
    with session_scope(settings.database_url) as s:
        lifecycle.claim(s, job_id, "w")
        lifecycle.record_publish(s, job_id, 1, "c0ffee", "file:///data/artifacts/x")
        lifecycle.succeed(s, job_id, 1, results)
    art = client.get(f"/v1/jobs/{job_id}/artifacts").json()
    assert art["files"] == [
        {"path": "config.json", "size": 56, "sha256": "cd" * 32},
        {"path": "model.safetensors", "size": 1234, "sha256": "ab" * 32},
    ]
    assert (art["commit"], art["url"], art["location"]) == (
        "c0ffee",
        "file:///data/artifacts/x",
        "/data/artifacts/x",
    )
    assert (art["format"], art["total_bytes"]) == ("pack-quantized", 1290)


def test_calibration_upload_and_reference(client, settings, tmp_path):
    text = "first line of calibration text\nsecond line\n"
    r = client.post("/v1/calibration", files={"file": ("cal.txt", text.encode(), "text/plain")})
    assert r.status_code == 201, r.text
    up = r.json()
    assert (up["format"], up["size"], up["lines"]) == ("txt", len(text), 2)
    import hashlib

    assert up["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    got = client.get(f"/v1/calibration/{up['upload_id']}").json()
    assert {k: got[k] for k in ("upload_id", "sha256", "size", "lines")} == {
        k: up[k] for k in ("upload_id", "sha256", "size", "lines")
    }

    cal = {"dataset": "upload", "upload_id": up["upload_id"]}
    assert client.post("/v1/jobs", json={**SPEC, "calibration": cal}).status_code == 201
    missing = client.post("/v1/jobs", json={**SPEC, "calibration": {**cal, "upload_id": "nope"}})
    assert missing.status_code == 422
    assert missing.json()["message"].startswith("calibration.upload_id: no upload 'nope'")
    # Another team's upload does not exist for this team.
    with _client(settings, team="beta") as beta:
        r = beta.post("/v1/jobs", json={**SPEC, "calibration": cal})
        assert r.status_code == 422 and "calibration.upload_id" in r.json()["message"]
        assert beta.get(f"/v1/calibration/{up['upload_id']}").status_code == 404

    # The worker's copy is the same bytes, named by their digest.
    from jobs.uploads import materialize

    with session_scope(settings.database_url) as s:
        path = materialize(s, up["upload_id"], tmp_path / "w")
    assert path.read_text() == text and path.name == f"{up['sha256']}.txt"


@pytest.mark.parametrize(
    ("name", "data", "status", "words"),
    [
        ("cal.csv", b"a,b\n", 422, "must end in .txt or .jsonl"),
        ("cal.txt", b"", 422, "is empty"),
        ("cal.txt", b"\xff\xfe bad", 422, "not UTF-8"),
        ("cal.jsonl", b'{"text": "ok"}\n{"text": \n', 422, "line 2 is not JSON"),
        ("cal.jsonl", b'{"text": "ok"}\n[1, 2]\n', 422, "line 2 is not a JSON object"),
        ("cal.txt", b"x" * 2048, 413, "larger than the limit of 1024 bytes"),
    ],
)
def test_bad_uploads_say_what_is_wrong(tmp_path, name, data, status, words):
    s = Settings(home=tmp_path, calibration_max_bytes=1024)
    upgrade(s.database_url)
    with _client(s) as c:
        r = c.post("/v1/calibration", files={"file": (name, data)})
        assert r.status_code == status and words in r.json()["message"], r.text


def test_callback_needs_a_signing_secret(client):
    r = client.post("/v1/jobs", json={**SPEC, "callback_url": "http://127.0.0.1:9/hook"})
    assert r.status_code == 422 and "QF_WEBHOOK_SECRET" in r.json()["message"]


def test_readyz_names_what_is_down(settings, tmp_path):
    with _client(settings) as c:
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["failing"] == []
    bad = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(bad)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        body = r.json()
        assert body["failing"] == ["broker"] and body["checks"]["database"] == "ok"
        assert "Connection" in body["checks"]["broker"]


def test_metrics_from_the_database(client, settings):
    ids = [
        client.post("/v1/jobs", json={**SPEC, "priority": p}).json()["id"] for p in ("high", "low")
    ]
    with session_scope(settings.database_url) as s:
        lifecycle.claim(s, ids[0], "w")
        lifecycle.succeed(s, ids[0], 1, {"seconds": {"quantize": 12.5, "verify": 3.0}})
        lifecycle.claim(s, ids[1], "w")
        lifecycle.fail(s, ids[1], 1, FailureReason.oom, "too big")
    text = client.get("/metrics").text
    assert 'quantfoundry_jobs{method="rtn",state="succeeded"} 1.0' in text
    assert 'quantfoundry_jobs{method="rtn",state="failed"} 1.0' in text
    assert 'quantfoundry_jobs{method="gptq",state="running"} 0.0' in text
    assert 'quantfoundry_job_failures_total{reason="oom"} 1.0' in text
    assert 'quantfoundry_job_attempts_total{queue="gpu-high"} 1.0' in text
    assert 'quantfoundry_queue_wait_seconds_count{queue="gpu-low"} 1.0' in text
    assert 'quantfoundry_phase_seconds_bucket{le="5.0",phase="verify"} 1.0' in text
    assert 'quantfoundry_phase_seconds_bucket{le="5.0",phase="quantize"} 0.0' in text
    assert 'quantfoundry_phase_seconds_sum{phase="quantize"} 12.5' in text
    assert "quantfoundry_stale_leases 0.0" in text
    # A second API process over the same database reports the same figures.
    with _client(settings) as other:
        again = other.get("/metrics").text
    series = [ln for ln in text.splitlines() if ln.startswith("quantfoundry_")]
    assert series == [ln for ln in again.splitlines() if ln.startswith("quantfoundry_")]


def _push(repo: str, sha: str, webhook_id: str = "wh-1", ref: str = "refs/heads/main") -> dict:
    return {
        "event": {"action": "update", "scope": "repo.content"},
        "repo": {"type": "model", "name": repo, "id": "x", "headSha": sha},
        "updatedRefs": [{"ref": ref, "oldSha": "0" * 40, "newSha": sha}],
        "webhook": {"id": webhook_id, "version": 3},
    }


def test_hub_webhook_creates_the_watch_matrix_once(settings):
    with _client(settings, scopes="admin") as admin:
        bad = admin.post("/v1/watches", json={"model_id": "org/model-a", "specs": [{"bits": 5}]})
        assert bad.status_code == 422 and bad.json()["message"].startswith("specs[0].bits")
        w = admin.post(
            "/v1/watches",
            json={
                "model_id": "org/model-a",
                "specs": [{"method": "rtn", "bits": 4, "group_size": 64}, {"bits": 8}],
            },
        )
        assert w.status_code == 201
        hook = {"X-Webhook-Secret": "hook-secret"}
        sha = "a" * 40
        assert admin.post("/v1/hooks/hf", json=_push("org/model-a", sha)).status_code == 401
        r = admin.post(
            "/v1/hooks/hf", json=_push("org/model-a", sha), headers={"X-Webhook-Secret": "no"}
        )
        assert r.status_code == 401
        first = admin.post("/v1/hooks/hf", json=_push("org/model-a", sha), headers=hook).json()
        assert len(first["created"]) == 2 and first["existing"] == []
        # The Hub delivers the same push again: nothing new.
        again = admin.post("/v1/hooks/hf", json=_push("org/model-a", sha), headers=hook).json()
        assert again["created"] == [] and sorted(again["existing"]) == sorted(first["created"])
        jobs = admin.get("/v1/jobs").json()["items"]
        assert {(j["spec"]["revision"], j["spec"]["bits"], j["owner"]) for j in jobs} == {
            (sha, 4, "hf-webhook"),
            (sha, 8, "hf-webhook"),
        }
        other = admin.post("/v1/hooks/hf", json=_push("org/unwatched", sha), headers=hook)
        assert other.json()["ignored"] == "org/unwatched@main is not watched"
        branch = _push("org/model-a", "b" * 40, ref="refs/heads/dev")
        assert admin.post("/v1/hooks/hf", json=branch, headers=hook).json()["created"] == []
        discussion = {
            **_push("org/model-a", sha),
            "event": {"action": "create", "scope": "discussion"},
        }
        r = admin.post("/v1/hooks/hf", json=discussion, headers=hook).json()
        assert "not a content push" in r["ignored"]


def test_hub_webhook_without_secret_is_refused(tmp_path):
    s = Settings(home=tmp_path)
    upgrade(s.database_url)
    with TestClient(create_app(s)) as c:
        r = c.post("/v1/hooks/hf", content=json.dumps(_push("o/m", "a" * 40)))
        assert r.status_code == 503 and "QF_HF_WEBHOOK_SECRET" in r.json()["message"]
