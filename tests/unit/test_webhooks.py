"""Outbound completion callbacks: Standard Webhooks signatures, and delivery with retries to a
real local HTTP receiver that verifies every request as a receiver would."""

from __future__ import annotations

import base64
import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select, update

from jobs import lifecycle
from jobs.db import session_factory, session_scope, upgrade
from jobs.models import WebhookDelivery, utcnow
from jobs.settings import Settings
from jobs.spec import JobSpec
from jobs.states import FailureReason
from jobs.webhooks import deliver_due, sign, signing_key, verify

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def test_signature_matches_the_standard_webhooks_example():
    # The example in the Standard Webhooks specification.
    key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    body = b'{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == expected


@pytest.mark.parametrize(
    ("secret", "words"),
    [("plain", "whsec_"), ("whsec_!!!", "not base64"), ("whsec_" + "YWJj", "at least 16")],
)
def test_bad_secret_is_named(secret, words):
    with pytest.raises(ValueError, match=words):
        signing_key(secret)


class Receiver:
    """A local HTTP endpoint: answers with the next status from `script` (then 200) and
    keeps each request with whether its signature verified."""

    def __init__(self, script: list[int]):
        self.script = list(script)
        self.seen: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                ok = verify(signing_key(SECRET), headers, body)
                outer.seen.append({"headers": headers, "body": json.loads(body), "ok": ok})
                status = outer.script.pop(0) if outer.script else 200
                self.send_response(status if ok else 401)
                self.end_headers()

            def log_message(self, *_):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def receiver():
    r = Receiver([500])
    yield r
    r.close()


def _due_now(url: str) -> None:
    with session_scope(url) as s:
        s.execute(update(WebhookDelivery).values(next_attempt_at=utcnow()))


def test_callback_is_signed_retried_and_delivered_once(tmp_path, receiver):
    settings = Settings(home=tmp_path, webhook_secret=SECRET, webhook_backoff_s=30)
    upgrade(settings.database_url)
    url = settings.database_url
    with session_scope(url) as s:
        spec = JobSpec(model_id="a/b", callback_url=receiver.url, labels={"ci": "7"})
        job_id = lifecycle.create_job(s, spec, team="alpha").id
    with session_scope(url) as s:
        lifecycle.claim(s, job_id, "w")
    with session_scope(url) as s:
        lifecycle.fail(s, job_id, 1, FailureReason.oom, "ran out of memory")
    factory = session_factory(url)

    # First try: the receiver answers 500; the delivery waits backoff seconds.
    assert deliver_due(factory, settings) == {"delivered": 0, "retrying": 1, "gave_up": 0}
    assert deliver_due(factory, settings)["retrying"] == 0  # not due yet
    with session_scope(url) as s:
        d = s.scalars(select(WebhookDelivery)).one()
        assert d.attempts == 1 and "HTTP 500" in d.last_error
        assert d.next_attempt_at.replace(tzinfo=None) > (utcnow() + timedelta(seconds=25)).replace(
            tzinfo=None
        )
    _due_now(url)
    assert deliver_due(factory, settings)["delivered"] == 1
    assert deliver_due(factory, settings) == {"delivered": 0, "retrying": 0, "gave_up": 0}

    assert [r["ok"] for r in receiver.seen] == [True, True]
    # Both tries are the same message (receivers drop replays by webhook-id).
    assert receiver.seen[0]["headers"]["webhook-id"] == receiver.seen[1]["headers"]["webhook-id"]
    body = receiver.seen[1]["body"]
    assert body["type"] == "job.failed"
    data = body["data"]
    assert (data["id"], data["state"], data["team"], data["labels"]) == (
        job_id,
        "failed",
        "alpha",
        {"ci": "7"},
    )
    assert data["failure"] == {"reason": "oom", "message": "ran out of memory"}


def test_callback_gives_up_after_the_last_try(tmp_path):
    rec = Receiver([503, 503, 503])
    try:
        settings = Settings(home=tmp_path, webhook_secret=SECRET, webhook_max_attempts=3)
        upgrade(settings.database_url)
        with session_scope(settings.database_url) as s:
            job_id = lifecycle.create_job(s, JobSpec(model_id="a/b", callback_url=rec.url)).id
            lifecycle.request_cancel(s, job_id)  # a queued job is cancelled at once
        factory = session_factory(settings.database_url)
        for _ in range(3):
            _due_now(settings.database_url)
            counts = deliver_due(factory, settings)
        assert counts["gave_up"] == 1 and len(rec.seen) == 3
        assert rec.seen[0]["body"]["type"] == "job.cancelled"
        with session_scope(settings.database_url) as s:
            assert s.scalars(select(WebhookDelivery)).one().failed_at is not None
    finally:
        rec.close()


def test_a_tampered_body_does_not_verify():
    key = signing_key(SECRET)
    import time

    ts = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(ts)}
    headers["webhook-signature"] = sign(key, "msg_1", ts, b'{"a":1}')
    assert verify(key, headers, b'{"a":1}')
    assert not verify(key, headers, b'{"a":2}')
    old = {**headers, "webhook-timestamp": str(ts - 3600)}
    assert not verify(key, old, b'{"a":1}')


def test_visibility_timeout_must_exceed_the_time_limit():
    with pytest.raises(ValueError, match="must exceed job_time_limit_s"):
        Settings(job_time_limit_s=3600, broker_visibility_timeout_s=3000)
    s = Settings(job_time_limit_s=3600, broker_url="redis://127.0.0.1:6379/0")
    assert s.broker_visibility_timeout_s == 7200
    from jobs.queue import celery_config

    conf = celery_config(s)
    assert conf["task_time_limit"] < conf["broker_transport_options"]["visibility_timeout"]
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1 and conf["worker_max_tasks_per_child"] == 1
    assert conf["worker_cancel_long_running_tasks_on_connection_loss"] is True
    assert s.worker_queues() == ["gpu-high", "gpu-default", "gpu-low"]
    assert Settings(queue_prefix="a100").queue_for("high") == "a100-high"
