"""Outbound completion callbacks, signed per Standard Webhooks.

When a job ends (succeeded, failed, cancelled) and has a callback_url, a delivery row is
written in the same transaction (an outbox for callbacks); the dispatcher POSTs it, retrying
with exponential backoff. Each request carries `webhook-id`, `webhook-timestamp` and
`webhook-signature: v1,<base64 HMAC-SHA256 over "id.timestamp.body">` keyed with the secret
`whsec_<base64 key>` (QF_WEBHOOK_SECRET), so a receiver checks it with any Standard Webhooks
library and drops replays by webhook-id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import timedelta

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from jobs.models import Job, WebhookDelivery, utcnow
from jobs.settings import Settings

log = logging.getLogger(__name__)
SECRET_PREFIX = "whsec_"
MAX_BACKOFF_S = 3600.0


def signing_key(secret: str) -> bytes:
    """The key bytes of a `whsec_<base64>` secret."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("QF_WEBHOOK_SECRET must look like whsec_<base64 key>")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error as e:
        raise ValueError(f"QF_WEBHOOK_SECRET: the part after whsec_ is not base64: {e}") from e
    if len(key) < 16:
        raise ValueError("QF_WEBHOOK_SECRET: the key must be at least 16 bytes")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header value."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def verify(key: bytes, headers: dict[str, str], body: bytes, tolerance_s: float = 300.0) -> bool:
    """Check a delivery as a receiver would: a fresh timestamp and a matching v1 signature."""
    try:
        msg_id, ts = headers["webhook-id"], int(headers["webhook-timestamp"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - ts) > tolerance_s:
        return False
    expected = sign(key, msg_id, ts, body)
    return any(hmac.compare_digest(expected, s) for s in headers["webhook-signature"].split())


def add_completion_delivery(session: Session, job_id: str) -> None:
    """Queue the callback of a job that just ended (no-op without a callback_url). Reads the
    row as the caller's transaction sees it now, after the final UPDATE."""
    row = session.execute(
        select(
            Job.callback_url,
            Job.state,
            Job.attempt,
            Job.team,
            Job.model_id,
            Job.revision,
            Job.method,
            Job.bits,
            Job.group_size,
            Job.labels,
            Job.failure_reason,
            Job.failure_message,
            Job.results,
            Job.publish_commit,
            Job.publish_url,
        ).where(Job.id == job_id)
    ).one_or_none()
    if row is None or not row.callback_url:
        return
    now = utcnow()
    results = {k: v for k, v in (row.results or {}).items() if k != "files"} or None
    payload = {
        "type": f"job.{row.state}",
        "timestamp": now.isoformat(),
        "data": {
            "id": job_id,
            "state": row.state,
            "attempt": row.attempt,
            "team": row.team,
            "model_id": row.model_id,
            "revision": row.revision,
            "method": row.method,
            "bits": row.bits,
            "group_size": row.group_size,
            "labels": row.labels,
            "failure": (
                {"reason": row.failure_reason, "message": row.failure_message}
                if row.failure_reason
                else None
            ),
            "results": results,
            "publish_commit": row.publish_commit,
            "publish_url": row.publish_url,
        },
    }
    session.add(
        WebhookDelivery(
            msg_id=f"msg_{uuid.uuid4().hex}",
            job_id=job_id,
            url=row.callback_url,
            event_type=payload["type"],
            payload=payload,
            next_attempt_at=now,
        )
    )


Post = Callable[..., httpx.Response]


def _attempt(delivery: WebhookDelivery, key: bytes, settings: Settings, post: Post) -> str | None:
    """POST one delivery; None on a 2xx, else what went wrong."""
    body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True).encode()
    ts = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": delivery.msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(key, delivery.msg_id, ts, body),
        "user-agent": "quantfoundry-webhooks",
    }
    try:
        r = post(delivery.url, content=body, headers=headers, timeout=settings.webhook_timeout_s)
    except httpx.HTTPError as e:
        return f"{type(e).__name__}: {e}"
    if 200 <= r.status_code < 300:
        return None
    return f"HTTP {r.status_code}: {r.text[:200]}"


def deliver_due(
    factory: sessionmaker, settings: Settings, post: Post = httpx.post, batch: int = 20
) -> dict[str, int]:
    """Send the callbacks that are due, one row at a time (locked, so two dispatchers never
    send the same one at once); failures are retried after backoff * 2^(tries-1)."""
    counts = {"delivered": 0, "retrying": 0, "gave_up": 0}
    if not settings.webhook_secret:
        return counts
    key = signing_key(settings.webhook_secret)
    for _ in range(batch):
        with factory() as session, session.begin():
            now = utcnow()
            delivery = session.scalars(
                select(WebhookDelivery)
                .where(
                    WebhookDelivery.delivered_at.is_(None),
                    WebhookDelivery.failed_at.is_(None),
                    WebhookDelivery.next_attempt_at <= now,
                )
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if delivery is None:
                break
            error = _attempt(delivery, key, settings, post)
            delivery.attempts += 1
            if error is None:
                delivery.delivered_at = utcnow()
                counts["delivered"] += 1
                continue
            delivery.last_error = error
            if delivery.attempts >= settings.webhook_max_attempts:
                delivery.failed_at = utcnow()
                counts["gave_up"] += 1
                log.error(
                    "callback %s of job %s: giving up after %d tries: %s",
                    delivery.msg_id,
                    delivery.job_id,
                    delivery.attempts,
                    error,
                )
            else:
                wait = min(settings.webhook_backoff_s * 2 ** (delivery.attempts - 1), MAX_BACKOFF_S)
                delivery.next_attempt_at = utcnow() + timedelta(seconds=wait)
                counts["retrying"] += 1
                log.warning(
                    "callback %s of job %s failed (%s); try %d in %.0fs",
                    delivery.msg_id,
                    delivery.job_id,
                    error,
                    delivery.attempts + 1,
                    wait,
                )
    return counts
