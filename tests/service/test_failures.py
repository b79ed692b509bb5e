"""Failure drills on the cluster backend (PostgreSQL, Redis, the API, dispatcher and Celery
workers as separate processes): duplicate delivery, a Redis restart mid-run, a dispatcher
killed between commit and enqueue, a job whose worker dies three times, a cancel past its
grace period, and the auth matrix over the real server."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid

import httpx
import pytest
from sqlalchemy.orm import Session

from jobs import lifecycle
from jobs.db import engine_for
from jobs.settings import Settings
from jobs.spec import JobSpec
from jobs.submission import DuplicateInFlight, submit
from tests.support.services import free_port, port_open
from tests.support.stack import Stack, base_env
from tests.support.tiny_model import REPO_ID

pytestmark = pytest.mark.service


def spec(**overrides) -> dict:
    s = {
        "model_id": REPO_ID,
        "method": "rtn",
        "bits": 3,
        "group_size": -1,
        "calibration": {"n_samples": 4, "seq_len": 64},
        "evaluation": {"seq_len": 64, "max_windows": 4},
    }
    s.update(overrides)
    return s


LONG = {"evaluation": {"seq_len": 32, "max_windows": 1500}}  # keeps a worker busy


def cluster(tmp_path, hub_cache, pg: str, redis: str, **settings: str) -> Stack:
    env = base_env(tmp_path / "home", hub_cache, database_url=pg, broker_url=redis, **settings)
    return Stack(env=env, logs=tmp_path / "logs")


def settings_of(stack: Stack) -> Settings:
    e = stack.env
    return Settings(
        home=e["QF_HOME"],
        database_url=e["QF_DATABASE_URL"],
        broker_url=e["QF_BROKER_URL"],
        queue_prefix=e["QF_QUEUE_PREFIX"],
    )


def wait_for(stack: Stack, job_id: str, cond, what: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stack.http.get(f"/v1/jobs/{job_id}").json()
        if cond(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never {what}: {job}\n{stack.log('worker')}")


def evaluating(attempt: int):
    return lambda j: (
        j["state"] == "running" and j["attempt"] == attempt and j["progress"]["phase"] == "verify"
    )


def states(stack: Stack, job_id: str) -> list[str]:
    text = stack.http.get(f"/v1/jobs/{job_id}/events").text
    import json

    return [
        json.loads(line[6:])["state"]
        for line in text.splitlines()
        if line.startswith("data: ") and '"state"' in line
    ]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, hub_cache, postgres_admin_url, redis_url):
    """One stack (with a second worker) for the drills that leave it healthy."""
    from sqlalchemy import create_engine, text

    name = f"qf_drills_{uuid.uuid4().hex[:8]}"
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    pg = postgres_admin_url.rsplit("/", 1)[0] + f"/{name}"
    stack = cluster(tmp_path_factory.mktemp("drills"), hub_cache, pg, redis_url + "/0")
    try:
        stack.start()
        stack.spawn("worker2", "worker", "--loglevel", "INFO")
        yield stack
    finally:
        stack.stop()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_duplicate_delivery_runs_once(shared):
    created = shared.submit(spec(priority="high"))
    assert created["queue"] == shared.env["QF_QUEUE_PREFIX"] + "-high"
    # The same message again, at once: both workers get one.
    from jobs.queue import enqueue

    enqueue(settings_of(shared), created["id"], created["queue"])
    job = shared.wait(created["id"])
    assert job["state"] == "succeeded" and job["attempt"] == 1
    assert states(shared, created["id"]) == ["queued", "running", "succeeded"]
    deadline = time.monotonic() + 30
    while "not claimable" not in shared.log("worker") + shared.log("worker2"):
        assert time.monotonic() < deadline, shared.log("worker2")
        time.sleep(0.2)


def test_uploaded_calibration_runs_on_a_worker(shared):
    text = "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(200))
    r = shared.http.post("/v1/calibration", files={"file": ("cal.txt", text.encode())})
    assert r.status_code == 201, r.text
    cal = {"dataset": "upload", "upload_id": r.json()["upload_id"], "n_samples": 4, "seq_len": 64}
    job = shared.wait(shared.submit(spec(calibration=cal))["id"])
    assert job["state"] == "succeeded", job["failure"]


def test_job_survives_a_redis_restart(tmp_path, hub_cache, postgres_url):
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    cmd += ["--appendonly", "no"]
    redis = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    stack = cluster(tmp_path, hub_cache, postgres_url, f"redis://127.0.0.1:{port}/0")
    try:
        while not port_open(port):
            time.sleep(0.1)
        stack.start()
        created = stack.submit(spec(evaluation={"seq_len": 32, "max_windows": 300}))
        wait_for(stack, created["id"], evaluating(1), "started evaluating")
        redis.terminate()  # every message and unacked delivery is gone with it
        redis.wait(10)
        time.sleep(2)
        redis = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        job = stack.wait(created["id"], timeout=240)
        assert job["state"] == "succeeded", (job, stack.log("worker"), stack.log("dispatcher"))
        # The broker is ready again for new work.
        assert stack.http.get("/readyz").json()["failing"] == []
        assert stack.wait(stack.submit(spec())["id"])["state"] == "succeeded"
    finally:
        stack.stop()
        redis.terminate()
        redis.wait(10)


def test_dispatcher_killed_between_commit_and_enqueue(shared):
    shared.procs["dispatcher"].send_signal(signal.SIGKILL)
    shared.procs["dispatcher"].wait(10)
    # What the API commits before its (here never made) hand-off to the broker.
    settings = settings_of(shared)
    with Session(engine_for(settings.database_url)) as s:
        job = lifecycle.create_job(s, JobSpec(**spec()), settings.queue_for("default"), team="test")
        s.commit()
        job_id = job.id
    time.sleep(2)
    assert shared.http.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"
    assert "quantfoundry_outbox_pending 1.0" in shared.http.get("/metrics").text
    shared.spawn("dispatcher", "dispatcher")  # restarted: it sends what is unsent
    job = shared.wait(job_id)
    assert job["state"] == "succeeded" and job["attempt"] == 1


def test_three_worker_deaths_end_in_worker_lost(tmp_path, hub_cache, postgres_url, redis_url):
    stack = cluster(tmp_path, hub_cache, postgres_url, redis_url + "/0")
    try:
        stack.start()
        created = stack.submit(spec(**LONG))
        for attempt in (1, 2, 3):
            job = wait_for(stack, created["id"], evaluating(attempt), f"ran attempt {attempt}")
            os.kill(int(job["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
        job = stack.wait(created["id"], timeout=120)
        assert (job["state"], job["attempt"]) == ("failed", 3)
        assert job["failure"]["reason"] == "worker_lost"
        assert "3 of 3" in job["failure"]["message"]
        # It stays failed: redelivered messages and the reaper do not start it again.
        time.sleep(6)
        again = stack.http.get(f"/v1/jobs/{created['id']}").json()
        assert (again["state"], again["attempt"]) == ("failed", 3)
        assert states(stack, created["id"]).count("running") == 3
        text = stack.http.get("/metrics").text
        assert 'quantfoundry_job_failures_total{reason="worker_lost"} 1.0' in text
    finally:
        stack.stop()


def test_cancel_past_grace_kills_the_worker_and_frees_the_slot(
    tmp_path, hub_cache, postgres_url, redis_url
):
    # A long lease: only the grace period can end this cancel.
    stack = cluster(
        tmp_path, hub_cache, postgres_url, redis_url + "/0", cancel_grace_s="2", lease_s="60"
    )
    try:
        stack.start()
        created = stack.submit(spec(**LONG))
        job = wait_for(stack, created["id"], evaluating(1), "started evaluating")
        pid = int(job["worker"].rsplit(":", 1)[1])
        os.kill(pid, signal.SIGSTOP)  # hung: it will never look at the cancel flag
        t0 = time.monotonic()
        r = stack.http.post(f"/v1/jobs/{created['id']}/cancel")
        assert r.status_code == 202 and r.json()["state"] == "cancelling"
        job = wait_for(stack, created["id"], lambda j: j["state"] == "cancelled", "cancelled", 30)
        assert time.monotonic() - t0 < 15
        assert "grace period" in job["progress"]["message"]
        deadline = time.monotonic() + 15
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split()[2] == "Z":  # reaped by its parent soon
                        break
            except OSError:
                break
            time.sleep(0.1)
        else:
            assert not os.path.exists(f"/proc/{pid}"), "the hung worker process still lives"
        # The slot is free: the next job runs on the same (one) worker.
        assert stack.wait(stack.submit(spec())["id"], timeout=120)["state"] == "succeeded"
    finally:
        stack.stop()


def test_auth_over_the_real_server(shared):
    job = shared.submit(spec())
    url = f"{shared.url}/v1/jobs/{job['id']}"
    assert httpx.get(url).status_code == 401
    reader = {"Authorization": f"Bearer {shared.make_token('test', 'read')}"}
    assert httpx.post(f"{shared.url}/v1/jobs", json=spec(), headers=reader).status_code == 403
    other = {"Authorization": f"Bearer {shared.make_token('other', 'read,submit')}"}
    assert httpx.get(url, headers=other).status_code == 404

    # Eight clients send the same Idempotency-Key at once: one job.
    key = {"Idempotency-Key": f"burst-{uuid.uuid4().hex}"}
    codes, ids = [], []

    def post():
        r = shared.http.post("/v1/jobs", json=spec(), headers=key)
        codes.append(r.status_code)
        if r.status_code < 300:
            ids.append(r.json()["id"])

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes.count(201) == 1 and set(codes) <= {200, 201, 409}, codes
    assert len(set(ids)) == 1


def test_concurrent_same_key_loses_with_a_conflict(postgres_url):
    """Two transactions with one Idempotency-Key: the second blocks on the unique index and,
    once the first commits, is refused (the API answers 409)."""
    from jobs.db import upgrade

    upgrade(postgres_url)
    settings = Settings(database_url=postgres_url, broker_url="redis://127.0.0.1:1/0")
    engine = engine_for(postgres_url)
    first, second = Session(engine), Session(engine)
    try:
        a, created = submit(
            first, JobSpec(model_id="a/b"), settings, team="t", owner="x", idempotency_key="k1"
        )
        assert created
        outcome = {}

        def racer():
            try:
                submit(
                    second,
                    JobSpec(model_id="a/b"),
                    settings,
                    team="t",
                    owner="y",
                    idempotency_key="k1",
                )
                outcome["result"] = "created"
            except DuplicateInFlight as e:
                outcome["result"] = str(e)

        t = threading.Thread(target=racer)
        t.start()
        time.sleep(1.0)
        assert t.is_alive()  # waiting on the first transaction's row
        first.commit()
        t.join(10)
        assert "is creating this job right now" in outcome["result"]
    finally:
        first.close()
        second.close()
