"""The CLI's client commands: submit, list, show, watch, cancel, retry, artifacts.

Exit codes (documented in the README, relied on by CI pipelines):
0 succeeded / done; 2 bad input (the API's 422, a bad flag or spec file); 3 cancelled;
4 not authenticated or not allowed; 5 no such job; 6 the API is unreachable or failed;
10 + n when a waited-for job failed, n the failure reason's position in FAILURE_CODES.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from quantfoundry.client import TERMINAL, ApiError, Client, ConfigError, Event, load_config

# Piped output (scripts, CI logs) gets wide tables instead of rich's 80-column default.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)

EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_AUTH, EXIT_NOT_FOUND, EXIT_API = 2, 3, 4, 5, 6
FAILURE_CODES = {
    reason: 10 + i
    for i, reason in enumerate(
        [
            "bad_input",
            "model_not_found",
            "oom",
            "timeout",
            "worker_lost",
            "quality_gate",
            "publish_failed",
            "internal",
        ]
    )
}

UrlOpt = Annotated[
    str | None, typer.Option("--api-url", envvar="QF_API_URL", help="The API's base URL.")
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="QF_API_TOKEN", help="API token.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _client(url: str | None, token: str | None) -> Client:
    try:
        return Client(load_config(url, token))
    except ConfigError as e:
        err.print(f"[red]config:[/red] {e}")
        raise typer.Exit(EXIT_BAD_INPUT) from e


def _api_exit(e: ApiError) -> typer.Exit:
    err.print(f"[red]error:[/red] {e.message}")
    if e.status == 422 or e.status == 409:
        return typer.Exit(EXIT_BAD_INPUT)
    if e.status in (401, 403):
        return typer.Exit(EXIT_AUTH)
    if e.status == 404:
        return typer.Exit(EXIT_NOT_FOUND)
    return typer.Exit(EXIT_API)


def job_exit_code(job: dict[str, Any]) -> int:
    if job["state"] == "succeeded":
        return 0
    if job["state"] == "cancelled":
        return EXIT_CANCELLED
    reason = (job.get("failure") or {}).get("reason", "internal")
    return FAILURE_CODES.get(reason, FAILURE_CODES["internal"])


def _print_json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str))


def _scheme(spec: dict[str, Any]) -> str:
    g = spec["group_size"]
    return f"{spec['method']} w{spec['bits']} {'g' + str(g) if g > 0 else 'per-ch'} " + (
        "sym" if spec["symmetric"] else "asym"
    )


def _progress_text(job: dict[str, Any]) -> str:
    p = job["progress"]
    if job["state"] in TERMINAL or not p["total"]:
        return p["phase"] or ""
    return f"{p['phase']} {p['done']}/{p['total']}"


def _summary(job: dict[str, Any]) -> Table:
    t = Table(show_header=False, box=None)
    spec = job["spec"]
    t.add_row("job", job["id"])
    t.add_row("state", job["state"] + (f" (attempt {job['attempt']})" if job["attempt"] else ""))
    t.add_row("model", f"{spec['model_id']}@{spec['revision']}")
    t.add_row("scheme", _scheme(spec))
    if job["state"] not in TERMINAL:
        t.add_row("progress", f"{_progress_text(job)} {job['progress']['message'] or ''}")
    if job.get("failure"):
        t.add_row("failure", f"{job['failure']['reason']}: {job['failure']['message']}")
    for key, value in (job.get("results") or {}).items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        if not isinstance(value, dict | list):
            t.add_row(key, str(value))
    return t


def _spec_from(
    spec_file: Path | None, overrides: dict[str, Any], labels: list[str]
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if spec_file is not None:
        try:
            spec = json.loads(spec_file.read_text())
        except (OSError, ValueError) as e:
            err.print(f"[red]spec file {spec_file}:[/red] {e}")
            raise typer.Exit(EXIT_BAD_INPUT) from e
        if not isinstance(spec, dict):
            err.print(f"[red]spec file {spec_file}:[/red] must hold a JSON object")
            raise typer.Exit(EXIT_BAD_INPUT)
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, leaf = key.partition(".")
        if leaf:
            spec.setdefault(section, {})[leaf] = value
        else:
            spec[key] = value
    for label in labels:
        k, sep, v = label.partition("=")
        if not sep or not k:
            err.print(f"[red]--label {label!r}:[/red] use key=value")
            raise typer.Exit(EXIT_BAD_INPUT)
        spec.setdefault("labels", {})[k] = v
    if "model_id" not in spec:
        err.print("[red]no model:[/red] give --model or a spec file with model_id")
        raise typer.Exit(EXIT_BAD_INPUT)
    return spec


class _Watcher:
    """Renders a job's events: one progress bar per phase, state changes as lines."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, e: Event) -> None:
        if e.kind == "progress":
            phase = e.data.get("phase") or "?"
            total = max(int(e.data.get("total") or 0), 1)
            done = int(e.data.get("done") or 0)
            eta = e.data.get("eta_s")
            msg = (e.data.get("message") or "")[:60]
            desc = f"{phase:<14} {msg}" + (f" (eta {eta:.0f}s)" if eta else "")
            if phase not in self.tasks:
                self.tasks[phase] = self.progress.add_task(desc, total=total)
            self.progress.update(self.tasks[phase], completed=done, total=total, description=desc)
        elif e.kind == "state":
            state = e.data.get("state")
            extra = ""
            if "reason" in e.data:
                extra = f" {e.data['reason']}: {e.data.get('message', '')}"
            self.progress.console.print(f"state: {state} (attempt {e.data.get('attempt')}){extra}")
        elif e.kind == "log":
            self.progress.console.print(str(e.data.get("line", e.data)))


def _watch(client: Client, job_id: str, as_json: bool) -> dict[str, Any]:
    """Follow the job to its final state; returns the final job."""
    if as_json:
        for e in client.events(job_id):
            sys.stdout.write(json.dumps({"id": e.id, "event": e.kind, "data": e.data}) + "\n")
            sys.stdout.flush()
        return client.get(job_id)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(bar_width=30),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        render = _Watcher(progress)
        for e in client.events(job_id):
            render(e)
    return client.get(job_id)


def register(app: typer.Typer) -> None:
    """Add the client commands to the `quantfoundry` app."""

    @app.command()
    def submit(
        spec_file: Annotated[
            Path | None, typer.Argument(help="A JSON job spec; flags override its fields.")
        ] = None,
        model: Annotated[str | None, typer.Option(help="Hub id (owner/name).")] = None,
        revision: Annotated[str | None, typer.Option()] = None,
        method: Annotated[str | None, typer.Option(help="rtn, gptq or awq.")] = None,
        bits: Annotated[int | None, typer.Option()] = None,
        group_size: Annotated[int | None, typer.Option(help="-1: per-channel.")] = None,
        symmetric: Annotated[bool | None, typer.Option("--sym/--asym")] = None,
        samples: Annotated[int | None, typer.Option(help="Calibration samples.")] = None,
        seq_len: Annotated[int | None, typer.Option(help="Calibration sequence length.")] = None,
        forward_dtype: Annotated[
            str | None,
            typer.Option(help="Calibration matmuls: auto, float32 or bfloat16."),
        ] = None,
        priority: Annotated[str | None, typer.Option(help="high, default or low.")] = None,
        max_ppl_increase: Annotated[
            float | None, typer.Option(help="Quality gate: most perplexity rise, percent.")
        ] = None,
        label: Annotated[list[str], typer.Option(help="key=value, repeatable.")] = [],  # noqa: B006
        idempotency_key: Annotated[
            str | None, typer.Option(help="Re-running with the same key returns the same job.")
        ] = None,
        dedupe: Annotated[
            str | None,
            typer.Option(help="natural: reuse the team's job with the same recipe, if any."),
        ] = None,
        wait: Annotated[bool, typer.Option(help="Watch the job to its end.")] = False,
        api_url: UrlOpt = None,
        token: TokenOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Submit a job; with --wait, follow it and exit with its outcome."""
        spec = _spec_from(
            spec_file,
            {
                "model_id": model,
                "revision": revision,
                "method": method,
                "bits": bits,
                "group_size": group_size,
                "symmetric": symmetric,
                "priority": priority,
                "calibration.n_samples": samples,
                "calibration.seq_len": seq_len,
                "calibration.forward_dtype": forward_dtype,
                "quality_gate.max_ppl_increase_pct": max_ppl_increase,
            },
            label,
        )
        with _client(api_url, token) as c:
            try:
                job = c.submit(spec, idempotency_key, dedupe)
                if not wait:
                    _print_json(job) if as_json else out.print(job["id"])
                    return
                if not as_json:
                    err.print(f"job {job['id']} submitted")
                job = _watch(c, job["id"], as_json)
            except ApiError as e:
                raise _api_exit(e) from e
        if as_json:
            _print_json(job)
        else:
            out.print(_summary(job))
        raise typer.Exit(job_exit_code(job))

    @app.command("list")
    def list_cmd(
        state: Annotated[str | None, typer.Option()] = None,
        model: Annotated[str | None, typer.Option()] = None,
        method: Annotated[str | None, typer.Option()] = None,
        label: Annotated[str | None, typer.Option(help="key=value")] = None,
        limit: Annotated[int, typer.Option(min=1, max=200)] = 50,
        cursor: Annotated[str | None, typer.Option(help="next_cursor of a previous page")] = None,
        api_url: UrlOpt = None,
        token: TokenOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Jobs, newest first."""
        with _client(api_url, token) as c:
            try:
                page = c.list_jobs(
                    state=state, model=model, method=method, label=label, limit=limit, cursor=cursor
                )
            except ApiError as e:
                raise _api_exit(e) from e
        if as_json:
            _print_json(page)
            return
        t = Table("state", "model", "scheme", "progress", "created")
        # Full ids, never wrapped: people copy them into the next command.
        t.columns.insert(0, Column("id", no_wrap=True, min_width=32))
        for j in page["items"]:
            t.add_row(
                j["id"],
                j["state"],
                j["spec"]["model_id"],
                _scheme(j["spec"]),
                _progress_text(j),
                str(j["created_at"])[:19],
            )
        out.print(t)
        if page.get("next_cursor"):
            err.print(f"more: --cursor {page['next_cursor']}")

    @app.command()
    def show(
        job_id: str, api_url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
    ) -> None:
        """One job: state, progress, failure, results."""
        with _client(api_url, token) as c:
            try:
                job = c.get(job_id)
            except ApiError as e:
                raise _api_exit(e) from e
        _print_json(job) if as_json else out.print(_summary(job))

    @app.command()
    def watch(
        job_id: str, api_url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
    ) -> None:
        """Follow a job's progress live; exits with its outcome (see the exit codes)."""
        with _client(api_url, token) as c:
            try:
                job = _watch(c, job_id, as_json)
            except ApiError as e:
                raise _api_exit(e) from e
        if not as_json:
            out.print(_summary(job))
        raise typer.Exit(job_exit_code(job))

    def _act(verb: str, job_id: str, api_url, token, as_json: bool) -> None:
        with _client(api_url, token) as c:
            try:
                job = getattr(c, verb)(job_id)
            except ApiError as e:
                raise _api_exit(e) from e
        _print_json(job) if as_json else out.print(f"{job['id']}: {job['state']}")

    @app.command()
    def cancel(
        job_id: str, api_url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
    ) -> None:
        """Cancel a job (a running one stops before its next layer)."""
        _act("cancel", job_id, api_url, token, as_json)

    @app.command()
    def retry(
        job_id: str, api_url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
    ) -> None:
        """Give a failed or cancelled job a new attempt."""
        _act("retry", job_id, api_url, token, as_json)

    @app.command()
    def artifacts(
        job_id: str, api_url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
    ) -> None:
        """A finished job's files (size, sha256) and where they were published."""
        with _client(api_url, token) as c:
            try:
                arts = c.artifacts(job_id)
            except ApiError as e:
                raise _api_exit(e) from e
        if as_json:
            _print_json(arts)
            return
        t = Table("file", "bytes", "sha256")
        for f in arts.get("files", []):
            t.add_row(f["path"], str(f["size"]), f["sha256"][:16])
        out.print(t)
        for key in ("commit", "url", "location"):
            if arts.get(key):
                out.print(f"{key}: {arts[key]}")
