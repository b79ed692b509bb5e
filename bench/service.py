"""Service latency under load, printed as a table.

    python bench/service.py [--requests-per-client 10] [--clients 10,100] [--runs 5]
        [--save bench/results/service-cpu-2core.txt]

A real `quantfoundry serve` (uvicorn, one process), a dispatcher and one idle Celery worker,
on PostgreSQL (a fresh database on the local server) and Redis, as separate processes. httpx
async clients, N at once, each sending its requests back to back:

- create: POST /v1/jobs (the jobs go to the `low` queue, which the worker does not take, so
  they only load the API, the database and the broker);
- list: GET /v1/jobs?limit=50 over those jobs;
- submit -> running: POST a `high` job and read its event stream until `running`, with the
  worker idle (the job then fails fast: its model does not exist).

Goals: list p99 < 50 ms at 100 clients; submit -> running < 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.services import ensure_postgres, ensure_redis, free_port  # noqa: E402

SPEC = {"model_id": "bench/no-such-model", "method": "rtn", "bits": 4, "group_size": 64}


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


async def load(url: str, headers: dict, clients: int, per_client: int, make) -> list[float]:
    """Latencies (ms) of clients x per_client requests, `clients` at a time."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as c:
        # One warm-up request per connection.
        await asyncio.gather(*(make(c) for _ in range(clients)))
        out: list[float] = []

        async def user() -> None:
            for _ in range(per_client):
                t = time.perf_counter()
                r = await make(c)
                out.append((time.perf_counter() - t) * 1000)
                assert r.status_code < 300, r.text

        await asyncio.gather(*(user() for _ in range(clients)))
        return out


def submit_to_running(url: str, headers: dict) -> tuple[float, float]:
    """Seconds from POST to the `running` event of a job, with an idle worker; and, from the
    job row, from created to claimed by the worker (the server-side part)."""
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
        t = time.perf_counter()
        job = c.post("/v1/jobs", json={**SPEC, "priority": "high"}).json()
        with c.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:]).get("state") == "running":
                    dt = time.perf_counter() - t
                    break
        # Let the job end (it fails: no such model) so the worker is idle again.
        while (row := c.get(f"/v1/jobs/{job['id']}").json())["state"] not in ("failed",):
            time.sleep(0.1)
        time.sleep(3.0)  # the worker's fresh child process
        created = datetime.fromisoformat(row["created_at"])
        return dt, (datetime.fromisoformat(row["started_at"]) - created).total_seconds()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="10,100")
    ap.add_argument("--requests-per-client", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5, help="submit -> running repetitions")
    ap.add_argument("--save", type=Path, default=None)
    args = ap.parse_args()

    pg, redis = ensure_postgres(), ensure_redis()
    name = f"qf_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    home = Path(tempfile.mkdtemp(prefix="qf-bench-"))
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("QF_")},
        "QF_HOME": str(home),
        "QF_DATABASE_URL": pg.url.rsplit("/", 1)[0] + f"/{name}",
        "QF_BROKER_URL": redis.url + "/0",
        "QF_QUEUE_PREFIX": prefix,
        "QF_TOKEN_PEPPER": uuid.uuid4().hex,
        "QF_DISPATCH_INTERVAL_S": "0.5",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    qf = [sys.executable, "-m", "quantfoundry"]
    procs = []

    def spawn(*a: str) -> None:
        log = open(home / f"{a[0]}.log", "w")  # noqa: SIM115 - the child owns it
        procs.append(subprocess.Popen([*qf, *a], env=env, stdout=log, stderr=subprocess.STDOUT))

    try:
        subprocess.run([*qf, "db", "upgrade"], env=env, check=True, capture_output=True)
        token = subprocess.run(
            [*qf, "token", "create", "--team", "bench", "--scopes", "submit,read"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        headers = {"Authorization": f"Bearer {token}"}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        spawn("serve", "--port", str(port))
        spawn("worker", "--queues", f"{prefix}-high,{prefix}-default")
        spawn("dispatcher")
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (home / "serve.log").read_text()
            time.sleep(0.2)
        time.sleep(5)  # the worker connects

        rows = []
        for n in [int(x) for x in args.clients.split(",")]:
            low = {**SPEC, "priority": "low"}
            created = asyncio.run(
                load(
                    url,
                    headers,
                    n,
                    args.requests_per_client,
                    lambda c, body=low: c.post("/v1/jobs", json=body),
                )
            )
            listed = asyncio.run(
                load(
                    url,
                    headers,
                    n,
                    args.requests_per_client,
                    lambda c: c.get("/v1/jobs", params={"limit": 50}),
                )
            )
            for what, lat in (("create", created), ("list (50 jobs)", listed)):
                rows.append((what, n, len(lat), pct(lat, 50), pct(lat, 99), max(lat)))
        pairs = [submit_to_running(url, headers) for _ in range(args.runs)]
        runs, claimed = [p[0] for p in pairs], [p[1] for p in pairs]

        cmd = "python bench/service.py " + " ".join(sys.argv[1:])
        lines = [
            f"quantfoundry service on {os.cpu_count()} CPU cores: one uvicorn process, "
            "PostgreSQL, Redis, one idle Celery worker",
            f"command: {cmd.strip()}",
            "",
            f"{'request':<16}{'clients':>8}{'requests':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}",
            "-" * 61,
        ]
        for what, n, count, p50, p99, mx in rows:
            lines.append(f"{what:<16}{n:>8}{count:>10}{p50:>9.1f}{p99:>9.1f}{mx:>9.1f}")
        lines += [
            "",
            f"submit -> running with an idle worker ({len(runs)} runs): "
            f"median {statistics.median(runs):.2f} s, max {max(runs):.2f} s "
            f"(created -> claimed by the worker: median {statistics.median(claimed):.2f} s)",
        ]
        text_out = "\n".join(lines)
        print(text_out)
        if args.save:
            args.save.parent.mkdir(parents=True, exist_ok=True)
            args.save.write_text(text_out + "\n")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
