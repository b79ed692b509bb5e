"""Job events as the dashboard shows them: one line of a log tail, and SSE framing."""

from __future__ import annotations

import json
from typing import Any

from api.dashboard.present import duration


def log_line(kind: str, data: dict[str, Any]) -> str:
    """One readable line of a job's event."""
    if kind == "state":
        line = f"state {data.get('state')} (attempt {data.get('attempt', 0)})"
        if data.get("reason"):
            line += f": {data['reason']}"
        if data.get("message"):
            line += f" - {data['message']}"
        return line
    if kind == "progress":
        line = f"[{data.get('phase')}] {data.get('message') or ''}".rstrip()
        if data.get("total"):
            line += f" ({data.get('done', 0)}/{data['total']})"
        if data.get("eta_s") is not None:
            line += f", about {duration(data['eta_s'])} left"
        return line
    if kind == "log":
        return str(data.get("line", ""))
    return f"{kind}: {json.dumps(data, sort_keys=True)}"


def sse(event_id: int, kind: str, data: dict[str, Any]) -> str:
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"
