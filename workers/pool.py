"""Celery's prefork pool, with a finished job's child process replaced at once.

With one job per child process (worker_max_tasks_per_child = 1) every job ends with its
child exiting, and the next job runs in the replacement. Celery notices the exit when the
child's sentinel pipe closes, but the pipe closes a moment before the child can be reaped;
the pool then finds nothing to replace and leaves it to its maintenance timer, every 5 s. A
job sent to an idle worker right after another one waited up to 5 s (2.5 s on average) for
a process to run in. Here the pool looks again a few times just after an exit, and the timer
runs every second as a safety net (a waitpid per child: nothing to speak of)."""

from __future__ import annotations

from typing import Any

from celery.concurrency import asynpool, prefork

# After a child's sentinel closes: when to look again for it to be reaped (seconds).
RECHECK_S = (0.01, 0.05, 0.2)
MAINTAIN_S = 1.0


class PromptPool(asynpool.AsynPool):
    @property
    def timers(self) -> dict:
        return {self.maintain_pool: MAINTAIN_S}

    def _event_process_exit(self, hub: Any, proc: Any) -> None:
        super()._event_process_exit(hub, proc)
        for delay in RECHECK_S:
            hub.call_later(delay, self.maintain_pool)


class TaskPool(prefork.TaskPool):
    """`--pool prefork` of `quantfoundry worker` (the app's worker_pool setting)."""

    Pool = PromptPool
