"""The service as separate processes: migrations, the API (uvicorn) and a Celery worker,
each started through the `quantfoundry` command exactly as an operator would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.services import free_port

TERMINAL = {"succeeded", "failed", "cancelled"}
CORPUS = Path(os.environ.get("QF_HOME", Path(__file__).resolve().parents[2] / ".quantfoundry"))
CORPUS = CORPUS / "corpus"


@dataclass
class Stack:
    env: dict[str, str]
    logs: Path
    url: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    token: str = ""  # an admin token of team `test`, made with `quantfoundry token create`
    http: httpx.Client = field(default_factory=httpx.Client)  # carries the token

    def make_token(self, team: str, scopes: str, name: str | None = None) -> str:
        args = ["token", "create", "--team", team, "--scopes", scopes]
        return self.cli(*args, *(["--name", name] if name else [])).stdout.strip()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "quantfoundry", *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "quantfoundry", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs[name] = proc
        return proc

    def start(self) -> Stack:
        self.logs.mkdir(parents=True, exist_ok=True)
        # The corpus this run already parsed: each stack's worker would otherwise spend ~25 s
        # parsing the Wikipedia excerpt again in its fresh home.
        from quantcore.data import wiki_excerpt

        wiki_excerpt.articles()  # parsed once per run, into this process's QF_HOME
        home = Path(self.env["QF_HOME"])
        if CORPUS.is_dir() and not (home / "corpus").exists():
            shutil.copytree(CORPUS, home / "corpus")
        self.cli("db", "upgrade")
        self.token = self.make_token("test", "submit,read,admin", "stack")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )
        api = self.spawn("api", "serve", "--port", str(port))
        self.spawn("worker", "worker", "--loglevel", "INFO")
        self.spawn("dispatcher", "dispatcher")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if api.poll() is not None:
                raise RuntimeError(f"API exited:\n{self.log('api')}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"API not healthy in 60s:\n{self.log('api')}")

    def log(self, name: str) -> str:
        p = self.logs / f"{name}.log"
        return p.read_text()[-4000:] if p.exists() else ""

    def stop(self) -> None:
        self.http.close()
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()

    def submit(self, spec: dict) -> dict:
        r = self.http.post("/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        return r.json()

    def wait(self, job_id: str, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        seen_phases: list[str] = []
        while time.monotonic() < deadline:
            job = self.http.get(f"/v1/jobs/{job_id}").json()
            phase = job["progress"]["phase"]
            if phase and (not seen_phases or seen_phases[-1] != phase):
                seen_phases.append(phase)
            if job["state"] in TERMINAL:
                job["_phases_seen"] = seen_phases
                return job
            if self.procs["worker"].poll() is not None:
                raise AssertionError(f"worker exited:\n{self.log('worker')}")
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not finished in {timeout}s:\n{self.log('worker')}")


def base_env(home: Path, hub_cache: Path, **settings: str) -> dict[str, str]:
    """The environment of every stack process. Jobs go to queues named after a fresh prefix,
    so runs sharing one Redis never take each other's jobs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
    # `queue=` from callers written before priority queues names this run's queue prefix.
    prefix = settings.pop("queue", None) or f"test-{uuid.uuid4().hex[:8]}"
    env.update(
        QF_HOME=str(home),
        HF_HUB_CACHE=str(hub_cache),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        # Short leases and a brisk dispatcher, so that lost workers are noticed in seconds.
        QF_LEASE_S="4",
        QF_DISPATCH_INTERVAL_S="0.3",
        QF_CANCEL_POLL_S="0.3",
        QF_QUEUE_PREFIX=prefix,
        QF_TOKEN_PEPPER=uuid.uuid4().hex,
    )
    env.update({f"QF_{k.upper()}": v for k, v in settings.items()})  # the caller's win
    return env
