"""A small client of the REST API for the CLI and scripts: where the API is, the token, and
the server-sent event stream of a job (resumed after a dropped connection)."""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


def config_path() -> Path:
    """`QF_CONFIG`, else `$XDG_CONFIG_HOME/quantfoundry/cli.toml`."""
    if os.environ.get("QF_CONFIG"):
        return Path(os.environ["QF_CONFIG"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "quantfoundry" / "cli.toml"


@dataclass(frozen=True)
class ClientConfig:
    url: str
    token: str | None


class ConfigError(ValueError):
    pass


def load_config(url: str | None = None, token: str | None = None) -> ClientConfig:
    """Flags first, then `QF_API_URL` / `QF_API_TOKEN`, then the config file (`api_url`,
    `token`), then the local default."""
    file: dict[str, Any] = {}
    path = config_path()
    if path.exists():
        try:
            file = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from e
    url = url or os.environ.get("QF_API_URL") or file.get("api_url") or DEFAULT_URL
    token = token or os.environ.get("QF_API_TOKEN") or file.get("token")
    return ClientConfig(url=str(url).rstrip("/"), token=token)


class ApiError(Exception):
    """The API refused or failed a request; `status` is the HTTP status (0: unreachable)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _message(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text.strip() or r.reason_phrase
    if isinstance(body, dict):
        msg = body.get("message") or body.get("detail")
        if isinstance(msg, str):
            return msg
        if msg is not None:
            return json.dumps(msg)
    return json.dumps(body)


@dataclass(frozen=True)
class Event:
    id: int
    kind: str
    data: dict[str, Any]


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Events of a text/event-stream, one per blank-line-terminated block; comments skipped."""
    eid, kind, data = None, "message", []
    for line in lines:
        if line == "":
            if data:
                yield Event(int(eid) if eid else 0, kind, json.loads("\n".join(data)))
            eid, kind, data = None, "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "id":
                eid = value
            elif field == "event":
                kind = value
            elif field == "data":
                data.append(value)


class Client:
    def __init__(self, config: ClientConfig, timeout: float = 30.0):
        headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
        self.config = config
        self.http = httpx.Client(base_url=config.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ApiError(0, f"cannot reach the API at {self.config.url}: {e}") from e
        if r.status_code >= 400:
            raise ApiError(r.status_code, _message(r))
        return r.json() if r.content else None

    def submit(
        self, spec: dict[str, Any], idempotency_key: str | None = None, dedupe: str | None = None
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        params = {"dedupe": dedupe} if dedupe else {}
        return self.request("POST", "/v1/jobs", json=spec, headers=headers, params=params)

    def list_jobs(self, **filters: Any) -> dict[str, Any]:
        params = {k: v for k, v in filters.items() if v not in (None, [], ())}
        return self.request("GET", "/v1/jobs", params=params)

    def get(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel")

    def retry(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/retry")

    def artifacts(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}/artifacts")

    def events(self, job_id: str, after: int = 0, reconnects: int = 20) -> Iterator[Event]:
        """The job's events until its final state. A dropped stream is resumed with
        Last-Event-ID, so nothing is seen twice or missed."""
        last, failures = after, 0
        while True:
            headers = {"Last-Event-ID": str(last)} if last else {}
            try:
                with self.http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=None
                ) as r:
                    if r.status_code >= 400:
                        r.read()
                        raise ApiError(r.status_code, _message(r))
                    for event in parse_sse(r.iter_lines()):
                        last, failures = event.id or last, 0
                        yield event
                return  # the server ends the stream after the final state
            except (httpx.TransportError, httpx.RemoteProtocolError) as e:
                failures += 1
                if failures > reconnects:
                    raise ApiError(0, f"lost the event stream of job {job_id}: {e}") from e
                time.sleep(min(0.2 * 2**failures, 5.0))
