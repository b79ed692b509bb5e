"""The demo: the whole service on one machine, one real job through the REST API."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from jobs.settings import get_settings

console = Console()
TERMINAL = {"succeeded", "failed", "cancelled"}


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    fh = open(log, "w")  # noqa: SIM115 - the child owns it until it exits
    return subprocess.Popen(
        [sys.executable, "-m", "quantfoundry", *args],
        stdout=fh,
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
    )


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited early; see {log}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the API did not become healthy in {timeout}s; see {log}")


def run_demo(bits: int, group_size: int, symmetric: bool, port: int) -> int:
    from huggingface_hub import constants

    from jobs.auth import create_token, pepper
    from jobs.db import session_scope, upgrade
    from quantcore.models import smollm2

    settings = get_settings()
    settings.ensure_dirs()
    console.rule("quantfoundry demo (embedded: SQLite, SQLAlchemy broker, local artifacts)")
    console.print("API, dispatcher and one worker run as separate processes; logs in home/logs")
    console.print(f"home: {settings.home}")
    with console.status("preparing SmolLM2-135M-Instruct in the local Hub cache"):
        smollm2.prepare(Path(constants.HF_HUB_CACHE))
    upgrade(settings.database_url)
    # The API wants a token: the demo makes its own (as `quantfoundry token create` would).
    with session_scope(settings.database_url) as session:
        _row, token = create_token(
            session, pepper(settings), "demo", "submit,read", name="demo", created_by="demo"
        )
    auth = {"Authorization": f"Bearer {token}"}

    logs = settings.home / "logs"
    logs.mkdir(exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    api = _spawn(["serve", "--port", str(port)], logs / "api.log")
    worker = _spawn(["worker"], logs / "worker.log")
    dispatcher = _spawn(["dispatcher"], logs / "dispatcher.log")
    try:
        _wait_healthy(url, api, logs / "api.log")
        spec = {
            "model_id": smollm2.REPO_ID,
            "revision": "main",
            "method": "rtn",
            "bits": bits,
            "group_size": group_size,
            "symmetric": symmetric,
            "calibration": {"dataset": "wiki-excerpt", "n_samples": 16, "seq_len": 512, "seed": 0},
            "evaluation": {"seq_len": 512, "max_windows": 16},
        }
        r = httpx.post(f"{url}/v1/jobs", json=spec, headers=auth, timeout=30)
        if r.status_code != 201:
            console.print(f"[red]submit failed ({r.status_code}):[/red] {r.text}")
            return 1
        job = r.json()
        console.print(
            f"submitted job {job['id']}: rtn w{bits} g{group_size} "
            f"{'sym' if symmetric else 'asym'} on {smollm2.REPO_ID}"
        )
        job = _watch(url, job["id"], auth, worker, logs / "worker.log")
        return _report(job)
    finally:
        for p in (api, worker, dispatcher):
            p.terminate()
        for p in (api, worker, dispatcher):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        console.print("API, dispatcher and worker stopped")


def _watch(
    url: str,
    job_id: str,
    auth: dict[str, str],
    worker: subprocess.Popen,
    log: Path,
    timeout: float = 900,
) -> dict:
    columns = (
        TextColumn("{task.description:<13}"),
        BarColumn(bar_width=20),
        TextColumn("{task.completed:>3.0f}/{task.total:<3.0f}"),
        TextColumn("{task.fields[message]}"),
    )
    with Progress(*columns, console=console) as bars:
        tasks: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = httpx.get(f"{url}/v1/jobs/{job_id}", headers=auth, timeout=10).json()
            p = job["progress"]
            if p["phase"] and p["total"] and job["state"] == "running":
                if p["phase"] not in tasks:
                    for t in tasks.values():
                        bars.update(t, completed=bars.tasks[t].total)
                    tasks[p["phase"]] = bars.add_task(p["phase"], total=p["total"], message="")
                bars.update(
                    tasks[p["phase"]],
                    completed=p["done"],
                    total=p["total"],
                    message=(p["message"] or "")[:44],
                )
            if job["state"] in TERMINAL:
                for t in tasks.values():
                    if job["state"] == "succeeded":
                        bars.update(t, completed=bars.tasks[t].total)
                return job
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited; see {log}")
            time.sleep(0.5)
    raise RuntimeError(f"job {job_id} did not finish in {timeout:.0f}s; see {log}")


def _report(job: dict) -> int:
    if job["state"] != "succeeded":
        f = job["failure"] or {}
        console.print(f"[red]job {job['state']}[/red]: {f.get('reason')}: {f.get('message')}")
        return 1
    r = job["results"]
    t = Table(title=f"job {job['id']} succeeded")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("perplexity, base model", f"{r['ppl_base']:.3f}")
    t.add_row("perplexity, quantized", f"{r['ppl_quant']:.3f}")
    t.add_row("change", f"{r['ppl_change_pct']:+.2f}%")
    t.add_row("held-out tokens", f"{r['eval_tokens']} ({r['eval_windows']} x {r['eval_seq_len']})")
    t.add_row("artifact size", f"{r['artifact_bytes'] / 1e6:.1f} MB")
    t.add_row("quantized Linears", f"{r['quantized_modules']} in {r['num_layers']} layers")
    console.print(t)
    console.print(f"artifact: {r['artifact_path']}", soft_wrap=True)
    return 0
