"""Service latency under load, printed as a table.

    python bench/service.py [--api-workers 2] [--clients 10,100] [--requests-per-client 10]
        [--rate 1.0] [--duration 30] [--runs 5] [--gap 1.0]
        [--save bench/results/service-cpu-2core.txt]

A real `quantfoundry serve` (uvicorn, `--api-workers` processes), a dispatcher and one idle
Celery worker, on PostgreSQL (a fresh database on the local server) and Redis, as separate
processes on this machine, with the load generator (httpx, asyncio, one connection per
client) beside them. Two kinds of load:

- closed loop: N clients each send their next request as soon as the last one answered (no
  think time). That measures saturation: the server is never idle, so latency is about
  N / throughput, whatever a request costs;
- open loop: N clients each send one request a second on average (intervals drawn uniformly
  in [0.5, 1.5] s, like dashboards polling), whether or not the server keeps up. Latency runs
  from the request's scheduled time, so a server that falls behind is charged for the wait.

PostgreSQL is told to ANALYZE after each phase (autovacuum would within a minute), so that
list pages are planned on statistics of the jobs just created.

Requests: create is POST /v1/jobs (the jobs go to the `low` queue, which the worker does not
take, so they load only the API, the database and the broker); list is GET
/v1/jobs?limit=50 (full pages: the create runs come first). Submit -> running: POST a `high`
job and read its event stream until `running`, with the worker idle; the job then fails fast
(its model does not exist) and the next one is submitted `--gap` seconds after that.

Goals (issue 6): list p99 < 50 ms at 100 clients; submit -> running < 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from tests.support.services import ensure_postgres, ensure_redis, free_port  # noqa: E402

SPEC = {"model_id": "bench/no-such-model", "method": "rtn", "bits": 4, "group_size": 64}
Request = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


def pct(values: list[float], p: float) -> float:
    """The nearest-rank percentile."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


@dataclass
class Result:
    latencies_ms: list[float]
    wall_s: float
    errors: int = 0

    @property
    def rate(self) -> float:
        return len(self.latencies_ms) / self.wall_s


@contextmanager
def gc_paused() -> Iterator[None]:
    """The load generator's own garbage collector off while it measures: a full pass over
    its heap stalled its event loop for half a second (seen), which the table would have
    charged to the server."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _clients(url: str, headers: dict, n: int) -> list[httpx.AsyncClient]:
    """One client with one keep-alive connection per simulated user, as N dashboards or CI
    jobs would be (one shared pool of N connections costs httpx far more CPU per request at
    N = 100, CPU that the server on the same cores would miss)."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return [
        httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60)
        for _ in range(n)
    ]


async def _close(clients: list[httpx.AsyncClient]) -> None:
    await asyncio.gather(*(c.aclose() for c in clients))


async def _timed(make: Request, c: httpx.AsyncClient, since: float, out: list[float]) -> int:
    """Send one request; append its latency counted from `since` (ms) to `out`; 1 if it
    failed (transport error or status >= 300), else 0."""
    try:
        r = await make(c)
        failed = r.status_code >= 300
    except httpx.TransportError:
        failed = True
    out.append((time.perf_counter() - since) * 1000)
    return int(failed)


async def closed_loop(
    url: str, headers: dict, clients: int, per_client: int, make: Request
) -> Result:
    """`clients` users, each sending `per_client` requests back to back."""
    users = _clients(url, headers, clients)
    try:
        await asyncio.gather(*(make(c) for c in users))  # open the connections
        out: list[float] = []
        errors = 0

        async def user(c: httpx.AsyncClient) -> None:
            nonlocal errors
            for _ in range(per_client):
                errors += await _timed(make, c, time.perf_counter(), out)

        t0 = time.perf_counter()
        await asyncio.gather(*(user(c) for c in users))
        return Result(out, time.perf_counter() - t0, errors)
    finally:
        await _close(users)


async def open_loop(
    url: str, headers: dict, clients: int, rate: float, duration: float, make: Request
) -> Result:
    """`clients` users, each sending on its own schedule (mean `rate` per second, intervals
    uniform in [0.5, 1.5] / rate) for `duration` seconds. A request's latency counts from its
    scheduled time, not from when a late predecessor let it go (no coordinated omission)."""
    rng = random.Random(0)
    users = _clients(url, headers, clients)
    try:
        await asyncio.gather(*(make(c) for c in users))
        out: list[float] = []
        errors = 0
        t0 = time.perf_counter() + 0.1
        end = t0 + duration

        async def user(c: httpx.AsyncClient, first: float) -> None:
            nonlocal errors
            due = t0 + first
            while due < end:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                errors += await _timed(make, c, due, out)
                due += rng.uniform(0.5, 1.5) / rate

        await asyncio.gather(*(user(c, rng.uniform(0, 1 / rate)) for c in users))
        return Result(out, max(time.perf_counter(), end) - t0, errors)
    finally:
        await _close(users)


def submit_to_running(url: str, headers: dict, gap: float) -> tuple[float, float]:
    """Seconds from POST to the `running` event of a job, with an idle worker; and, from the
    job row, from created to claimed by the worker (the server-side part). Then wait for the
    job to end (it fails: no such model) and `gap` more seconds."""
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
        t = time.perf_counter()
        job = c.post("/v1/jobs", json={**SPEC, "priority": "high"}).json()
        with c.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:]).get("state") == "running":
                    dt = time.perf_counter() - t
                    break
        while (row := c.get(f"/v1/jobs/{job['id']}").json())["state"] != "failed":
            time.sleep(0.05)
        time.sleep(gap)
        created = datetime.fromisoformat(row["created_at"])
        return dt, (datetime.fromisoformat(row["started_at"]) - created).total_seconds()


@contextmanager
def service(api_workers: int) -> Iterator[tuple[str, dict, Callable[[], None]]]:
    """The service as processes on a fresh database: (base URL, auth headers, a function
    that has PostgreSQL ANALYZE the database)."""
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
    procs: list[subprocess.Popen] = []

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
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        spawn("serve", "--port", str(port), "--workers", str(api_workers))
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
        time.sleep(5)  # the worker connects and forks its child
        db = create_engine(env["QF_DATABASE_URL"], isolation_level="AUTOCOMMIT")

        def analyze() -> None:
            # Fresh planner statistics after a burst of inserts, as autovacuum would have
            # within a minute: with the stale ones (a table of a few rows) PostgreSQL may read
            # and sort every job of the team for a page instead of walking the index.
            with db.connect() as c:
                c.execute(text("ANALYZE"))

        try:
            yield url, {"Authorization": f"Bearer {token}"}, analyze
        finally:
            db.dispose()
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
        shutil.rmtree(home, ignore_errors=True)


def goals(closed: list, opened: list, runs: list[float], n: int) -> list[str]:
    """Issue 6's goals against what was measured, each load said plainly."""

    def listing(rows: list) -> Result:
        return next(r for what, clients, r in rows if what.startswith("list") and clients == n)

    def verdict(ok: bool) -> str:
        return "meets it" if ok else "MISSES it"

    lines = [f"goal: list p99 < 50 ms at {n} clients"]
    r = listing(opened)
    p99 = pct(r.latencies_ms, 99)
    lines.append(
        f"  open loop ({r.rate:.0f} requests/s offered and served): p99 {p99:.1f} ms, "
        f"{verdict(p99 < 50)}"
    )
    r = listing(closed)
    p99 = pct(r.latencies_ms, 99)
    lines.append(
        f"  closed loop (saturated, {r.rate:.0f} requests/s): p99 {p99:.1f} ms, "
        f"{verdict(p99 < 50)}; with {n} requests always in flight the mean latency is "
        f"{n} / throughput = "
        f"{1000 * n / r.rate:.0f} ms, so only above {n * 1000 / 50:.0f} requests/s could "
        "it meet the goal"
    )
    lines.append(f"goal: submit -> running < 1 s: max {max(runs):.2f} s, {verdict(max(runs) < 1)}")
    return lines


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by live processes: this benchmark's (this process and its
    children, PostgreSQL, Redis) and everyone else's, to tell how much the run had to share
    the cores."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        procs[int(entry)] = (int(fields[1]), comm, (int(fields[11]) + int(fields[12])) / tick)
    ours = {os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in procs.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                grew = True
    out = {"ours": 0.0, "others": 0.0}
    for pid, (_, comm, cpu) in procs.items():
        mine = pid in ours or comm.startswith(("postgres", "redis-server"))
        out["ours" if mine else "others"] += cpu
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--api-workers", type=int, default=2, help="quantfoundry serve --workers")
    ap.add_argument("--clients", default="10,100")
    ap.add_argument("--requests-per-client", type=int, default=10, help="closed loop")
    ap.add_argument("--rate", type=float, default=1.0, help="open loop: requests/s per client")
    ap.add_argument("--duration", type=float, default=30.0, help="open loop: seconds per row")
    ap.add_argument("--runs", type=int, default=5, help="submit -> running repetitions")
    ap.add_argument("--gap", type=float, default=1.0, help="seconds between those runs")
    ap.add_argument("--save", type=Path, default=None)
    args = ap.parse_args()
    counts = [int(x) for x in args.clients.split(",")]
    low = {**SPEC, "priority": "low"}

    def create(c: httpx.AsyncClient) -> Awaitable[httpx.Response]:
        return c.post("/v1/jobs", json=low)

    def listing(c: httpx.AsyncClient) -> Awaitable[httpx.Response]:
        return c.get("/v1/jobs", params={"limit": 50})

    load_before = os.getloadavg()
    cpu_before, t_start = cpu_seconds(), time.monotonic()
    closed, opened = [], []
    with service(args.api_workers) as (url, headers, analyze):
        for n in counts:
            for what, make in (("create", create), ("list (50 jobs)", listing)):
                with gc_paused():
                    r = asyncio.run(closed_loop(url, headers, n, args.requests_per_client, make))
                closed.append((what, n, r))
                analyze()
        for n in counts:
            for what, make in (("create", create), ("list (50 jobs)", listing)):
                with gc_paused():
                    r = asyncio.run(open_loop(url, headers, n, args.rate, args.duration, make))
                opened.append((what, n, r))
                analyze()
        pairs = [submit_to_running(url, headers, args.gap) for _ in range(args.runs)]
    runs, claimed = [p[0] for p in pairs], [p[1] for p in pairs]
    cpu_after, wall = cpu_seconds(), time.monotonic() - t_start
    others = max(0.0, cpu_after["others"] - cpu_before["others"])

    def row(what: str, n: int, r: Result, rate: str) -> str:
        lat = r.latencies_ms
        return (
            f"{what:<16}{n:>8}{len(lat):>10}{rate:>10}{pct(lat, 50):>9.1f}{pct(lat, 99):>9.1f}"
            f"{max(lat):>9.1f}{r.errors:>7}"
        )

    def head(rate: str) -> str:
        return (
            f"{'request':<16}{'clients':>8}{'requests':>10}{rate:>10}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'max ms':>9}{'errors':>7}"
        )

    cmd = "python bench/service.py " + " ".join(sys.argv[1:])
    lines = [
        f"quantfoundry service on {os.cpu_count()} CPU cores: uvicorn ({args.api_workers} "
        "processes), PostgreSQL, Redis, one idle Celery worker, and the load generator",
        f"command: {cmd.strip()}",
        "load average before the run (1, 5, 15 min): "
        + ", ".join(f"{x:.2f}" for x in load_before)
        + f"; other processes used {others:.0f} CPU-seconds during the {wall:.0f} s run "
        f"({100 * others / wall:.0f}% of one core)",
        "",
        f"closed loop (no think time, {args.requests_per_client} requests per client): "
        "saturation, latency ~ clients / throughput",
        head("req/s"),
        "-" * 78,
        *(row(w, n, r, f"{r.rate:.0f}") for w, n, r in closed),
        "",
        f"open loop ({args.rate:g} request/s per client on average, {args.duration:g} s): "
        "latency from the scheduled send",
        head("offered/s"),
        "-" * 78,
        *(row(w, n, r, f"{n * args.rate:.0f}") for w, n, r in opened),
        "",
        f"submit -> running with an idle worker ({len(runs)} runs, {args.gap:g} s apart): "
        f"median {statistics.median(runs):.2f} s, max {max(runs):.2f} s "
        f"(created -> claimed by the worker: median {statistics.median(claimed):.2f} s)",
        "  each run (s): " + ", ".join(f"{x:.2f}" for x in runs),
        "",
        *goals(closed, opened, runs, max(counts)),
    ]
    print("\n".join(lines))
    report.save(lines, args.save)


if __name__ == "__main__":
    main()
