"""Publishing from real worker processes (PostgreSQL + Redis, as on a cluster) to FakeHub,
the local test double of the Hub's HTTP API, through the real `huggingface_hub` client:
exactly one commit even when the worker dies between the Hub's commit and recording it; a
read-only token fails with publish_failed; a missed quality gate publishes nothing; the token
never shows."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest
from sqlalchemy import create_engine, text

from tests.service.conftest import fresh_database
from tests.support.fake_hub import FakeHub, Token
from tests.support.stack import Stack, base_env
from tests.support.tiny_model import REPO_ID

pytestmark = pytest.mark.service
WRITE, READ = f"hf_w_{uuid.uuid4().hex}", f"hf_r_{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def hub():
    fake = FakeHub({WRITE: Token("alice", orgs=("acme",)), READ: Token("bob", write=False)})
    yield fake.start()
    fake.stop()


@pytest.fixture(scope="module")
def database(postgres_admin_url):
    with fresh_database(postgres_admin_url, "qf_publish") as url:
        yield url


@pytest.fixture(scope="module")
def stack(tmp_path_factory, hub_cache, hub, database, redis_url):
    tmp = tmp_path_factory.mktemp("publish")
    env = base_env(
        tmp / "home",
        hub_cache,
        database_url=database,
        broker_url=redis_url + "/0",
    )
    # The model still comes from the local cache first; only the sink talks to "the Hub".
    env.update(
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT=hub.url,
        QF_SECRET_HUB_TOKEN=WRITE,
        QF_SECRET_READONLY=READ,
    )
    s = Stack(env=env, logs=tmp / "logs")
    try:
        yield s.start()
    finally:
        s.stop()


def spec(repo: str, **extra) -> dict:
    return {
        "model_id": REPO_ID,
        "method": "rtn",
        "bits": 3,
        "group_size": -1,
        "calibration": {"n_samples": 4, "seq_len": 64},
        "evaluation": {"seq_len": 64, "max_windows": 4},
        "destination": {"kind": "hub", "repo_id": repo},
        **extra,
    }


def publish_record(stack: Stack, job_id: str) -> tuple[str | None, str | None]:
    engine = create_engine(stack.env["QF_DATABASE_URL"])
    with engine.connect() as c:
        row = c.execute(
            text("SELECT publish_commit, publish_url FROM jobs WHERE id = :id"), {"id": job_id}
        ).one()
    engine.dispose()
    return row[0], row[1]


def assert_token_never_shown(stack: Stack, job_id: str) -> None:
    job = stack.http.get(f"/v1/jobs/{job_id}").text
    events = stack.http.get(f"/v1/jobs/{job_id}/events").text
    logs = "".join((stack.logs / f"{n}.log").read_text() for n in ("worker", "api"))
    for token in (WRITE, READ):
        assert token not in job and token not in events and token not in logs


def test_crash_between_commit_and_record_still_one_commit(stack, hub):
    repo = f"acme/tiny-{uuid.uuid4().hex[:6]}"
    hub.hold_commit_response = release = threading.Event()
    hub.commit_landed.clear()
    created = stack.submit(spec(repo))
    deadline = time.monotonic() + 180
    while not hub.commit_landed.wait(0.2):
        job = stack.http.get(f"/v1/jobs/{created['id']}").json()
        assert job["state"] in ("queued", "running"), (job, stack.log("worker"))
        assert time.monotonic() < deadline, stack.log("worker")
    # The Hub has the commit; the worker is waiting for the answer. Kill it there.
    job = stack.http.get(f"/v1/jobs/{created['id']}").json()
    assert job["progress"]["phase"] == "publish"
    os.kill(int(job["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    time.sleep(0.5)
    hub.hold_commit_response = None
    release.set()

    job = stack.wait(created["id"], timeout=180)
    assert job["state"] == "succeeded", (job, stack.log("worker"))
    assert job["attempt"] == 2
    ours = [c for c in hub.history(repo) if created["id"] in c.description]
    assert len(ours) == 1 and len(hub.history(repo)) == 2  # the repo's first commit + ours
    commit, url = publish_record(stack, created["id"])
    assert commit == ours[0].oid and url.endswith(f"/{repo}/commit/{commit}")
    assert hub.repos[repo].private
    files = hub.files(repo)
    assert {"README.md", "manifest.json", "config.json", "model.safetensors"} <= set(files)
    assert b"## Verification" in files["README.md"]
    assert job["results"]["kl"] > 0 and job["results"]["ppl_quant"] > job["results"]["ppl_base"]
    assert_token_never_shown(stack, created["id"])


def test_read_only_token_and_missed_gate_publish_nothing(stack, hub):
    repo = f"acme/tiny-{uuid.uuid4().hex[:6]}"
    ro = stack.submit(
        spec(repo, destination={"kind": "hub", "repo_id": repo, "token_secret": "readonly"})
    )
    gated = stack.submit(spec(repo, quality_gate={"min_top1": 0.999, "max_kl": 10}))
    job = stack.wait(ro["id"], timeout=180)
    assert job["state"] == "failed" and job["failure"]["reason"] == "publish_failed"
    msg = job["failure"]["message"]
    assert "token in secret 'readonly' has no write access to" in msg and repo in msg
    assert_token_never_shown(stack, ro["id"])

    job = stack.wait(gated["id"], timeout=180)
    assert job["state"] == "failed" and job["failure"]["reason"] == "quality_gate"
    assert "top-1 agreement" in job["failure"]["message"]
    assert "KL" not in job["failure"]["message"]  # that limit was met
    assert job["results"]["top1"] < 0.999  # the figures are kept
    assert repo not in hub.repos and publish_record(stack, gated["id"]) == (None, None)
