"""The worker-side Celery app, configured from settings (see jobs.queue.celery_config: late
ack, reject on worker lost, prefetch 1, one job per child process, time limits below the
broker's visibility timeout)."""

from __future__ import annotations

import gc
import logging

from celery import Celery
from celery.signals import worker_init, worker_process_init

from jobs.db import connect_ahead, forget_inherited_connections
from jobs.queue import configure
from jobs.settings import get_settings

log = logging.getLogger(__name__)
app = Celery("quantfoundry", include=["workers.tasks"])
configure(app, get_settings())
# `--pool prefork` means this subclass: it replaces a finished job's child at once.
app.conf.worker_pool = "workers.pool:TaskPool"


@worker_init.connect
def _import_before_forking(**_kwargs) -> None:
    """In the worker's main process, before the pool forks: import what a job runs (torch,
    quantcore, transformers' model code: seconds of imports) once, so each job's fresh child
    process starts with it.
    Importing runs no tensor operation, so the parent starts no OpenMP thread pool and no
    CUDA context for its children to inherit (both break in a forked child); each child
    still gets fresh GPU memory. gc.freeze: the parent's collection before every fork (and
    the children's) skips these objects, and their memory pages stay shared."""
    import quantcore.pipeline  # noqa: F401
    import workers.runner  # noqa: F401
    from quantcore.models.loading import warm_imports

    warm_imports()  # transformers' model code: seconds more per job otherwise

    gc.freeze()


@worker_process_init.connect
def _own_connections(**_kwargs) -> None:
    forget_inherited_connections()
    # Connect while idle: the next job's claim then does not wait for a new connection.
    try:
        connect_ahead(get_settings().database_url)
    except Exception:  # the claim connects (and reports) on its own
        log.warning("could not connect to the database ahead of the next job", exc_info=True)
