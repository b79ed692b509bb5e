"""Failure drills on the cluster backend (PostgreSQL, Redis, the API, dispatcher and Celery
workers as separate processes): duplicate delivery, a Redis restart mid-run, a dispatcher
killed between commit and enqueue, a job whose worker dies three times, a cancel past its
grace period, and the auth matrix over the real server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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


def test_two_api_processes_revocation_bound_and_list_pages(shared, tmp_path):
    """`serve --workers 2` on PostgreSQL: two API processes share the port, each with its own
    token cache (QF_TOKEN_CACHE_S=1 here). A token revoked through the CLI is refused by
    every process within that bound; the list page (built from plain rows) says what GET
    says for each job."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**shared.env, "QF_TOKEN_CACHE_S": "1"}
    log = open(tmp_path / "api2.log", "w")  # noqa: SIM115 - owned by the child
    api = subprocess.Popen(
        [sys.executable, "-m", "quantfoundry", "serve", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not port_open(port):
            assert api.poll() is None and time.monotonic() < deadline, (
                tmp_path / "api2.log"
            ).read_text()
            time.sleep(0.2)
        token = shared.make_token("revoking", "read", name="short-lived")
        listed = shared.cli("token", "list").stdout.splitlines()
        token_id = next(line.split()[0] for line in listed if " short-lived " in line)
        auth = {"Authorization": f"Bearer {token}"}

        def codes(n: int = 16) -> set[int]:
            # A new connection each time, so that both processes answer some of them.
            return {httpx.get(f"{url}/v1/jobs", headers=auth).status_code for _ in range(n)}

        assert codes() == {200}  # now remembered by the processes that answered
        shared.cli("token", "revoke", token_id)
        revoked = time.monotonic()
        while 200 in codes(4):
            assert time.monotonic() < revoked + 1.0 + 0.5, "revocation outlived QF_TOKEN_CACHE_S"
        assert codes() == {401}

        # List pages over PostgreSQL: jobs of several kinds, ended (failed: no such model).
        run = uuid.uuid4().hex[:8]
        specs = [
            {"model_id": "nope/a", "labels": {"run": run}},
            {
                "model_id": "nope/b",
                "method": "gptq",
                "gptq": {"damp": 0.05},
                "overrides": [{"pattern": "down_proj$", "bits": 8}],
                "quality_gate": {"min_top1": 0.5},
                "labels": {"run": run, "kind": "gptq"},
            },
        ]
        ids = [shared.submit(s)["id"] for s in specs]
        for job_id in ids:
            wait_for(shared, job_id, lambda j: j["state"] == "failed", "failed")
        admin = {"Authorization": f"Bearer {shared.token}"}
        page = httpx.get(f"{url}/v1/jobs", params={"label": f"run={run}"}, headers=admin).json()
        assert [j["id"] for j in page["items"]] == ids[::-1]
        for item in page["items"]:
            assert item == httpx.get(f"{url}/v1/jobs/{item['id']}", headers=admin).json()
    finally:
        api.terminate()
        api.wait(20)


def test_outbox_entry_being_sent_is_not_sent_twice(postgres_url):
    """The API's fast path and the dispatcher race for a new job's outbox entry: whichever
    locks it first sends it, the other skips it (a duplicate delivery would cost the worker
    a fresh child process, and the next job would wait for it)."""
    from sqlalchemy import select

    from jobs.db import session_factory, upgrade
    from jobs.dispatch import send_now, send_pending
    from jobs.models import OutboxEntry

    upgrade(postgres_url)
    settings = Settings(database_url=postgres_url, broker_url="redis://127.0.0.1:1/0")
    factory = session_factory(postgres_url)
    sent: list[str] = []

    def send(_settings, job_id, _queue):
        sent.append(job_id)

    def new_entry() -> tuple[str, int]:
        with factory() as s:
            job = lifecycle.create_job(s, JobSpec(model_id="a/b"), team="t")
            s.flush()
            entry = s.scalars(select(OutboxEntry.id).where(OutboxEntry.job_id == job.id)).one()
            s.commit()
            return job.id, entry

    # The API holds the entry (sending it) while the dispatcher looks: skipped, then sent once.
    first, first_entry = new_entry()
    with factory() as api:
        assert send_now(api, settings, first_entry, send)
        assert send_pending(factory, settings, send) == 0
        api.commit()
    assert send_pending(factory, settings, send) == 0
    assert sent == [first]

    # The dispatcher sent it first: the API's fast path finds it sent and leaves it.
    second, second_entry = new_entry()
    assert send_pending(factory, settings, send) == 1
    with factory() as api:
        assert not send_now(api, settings, second_entry, send)
        api.commit()
    assert sent == [first, second]
