"""How figures and states read on the dashboard: small pure formatting functions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

# What each failure reason means and what a person can do about it (the job's own message
# carries the specifics).
FAILURE_ADVICE: dict[str, str] = {
    "bad_input": "The job's input could not be used. Fix the spec and submit it again.",
    "model_not_found": "The model or revision could not be found. Check the model id and "
    "revision, or download the model into the workers' cache.",
    "oom": "The worker ran out of memory. Retry on a larger GPU, or use a smaller calibration "
    "set or sequence length.",
    "timeout": "The job ran longer than allowed. Retry it, or make it smaller.",
    "worker_lost": "The worker running the job stopped answering and no attempts were left. "
    "Look at the worker logs, then retry.",
    "quality_gate": "The quantized model missed the job's quality gate; nothing was "
    "published. Try more bits or a smaller group size, or relax the gate.",
    "publish_failed": "The artifact was made but could not be published. Check the "
    "destination and its token secret, then retry.",
    "internal": "An unexpected error inside quantfoundry. Retry; if it fails again, report "
    "the message below.",
}

STATE_WORDS: dict[str, str] = {
    "queued": "waiting for a worker",
    "cancelling": "stopping after the current step",
    "retrying": "its worker was lost; another attempt is queued",
}


def failure_advice(reason: str | None) -> str:
    if not reason:
        return ""
    return FAILURE_ADVICE.get(reason, f"The job failed ({reason}).")


def scheme(method: str, bits: int, group_size: int, symmetric: bool) -> str:
    """e.g. 'gptq w4 g128 asym', 'rtn w8 per-channel sym'."""
    group = "per-channel" if group_size == -1 else f"g{group_size}"
    return f"{method} w{bits} {group} {'sym' if symmetric else 'asym'}"


def age(since: datetime | None, now: datetime | None = None) -> str:
    """'42s', '5m', '3h', '2d' since a moment."""
    if since is None:
        return ""
    now = now or datetime.now(UTC)
    if since.tzinfo is None:  # SQLite returns naive datetimes; they are UTC
        since = since.replace(tzinfo=UTC)
    s = max(0, int((now - since).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def duration(seconds: float | None) -> str:
    """'1h 02m', '3m 05s', '12s'; empty when unknown."""
    if seconds is None:
        return ""
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def size(n: float | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # unreachable


def percent(done: int, total: int) -> int:
    if total <= 0:
        return 0
    return max(0, min(100, round(100 * done / total)))


def signed_pct(x: float | None) -> str:
    return "" if x is None else f"{x:+.2f}%"


def number(x: Any, digits: int = 3) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)
