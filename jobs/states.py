"""Job states, failure reasons, and the transitions allowed between states."""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelling = "cancelling"
    cancelled = "cancelled"
    retrying = "retrying"


class FailureReason(StrEnum):
    bad_input = "bad_input"
    model_not_found = "model_not_found"
    oom = "oom"
    timeout = "timeout"
    worker_lost = "worker_lost"
    quality_gate = "quality_gate"
    publish_failed = "publish_failed"
    internal = "internal"


TERMINAL = frozenset({State.succeeded, State.failed, State.cancelled})

TRANSITIONS: dict[State, frozenset[State]] = {
    State.queued: frozenset({State.running, State.cancelled, State.failed}),
    State.running: frozenset({State.succeeded, State.failed, State.cancelling, State.retrying}),
    State.cancelling: frozenset({State.cancelled, State.failed, State.succeeded}),
    State.retrying: frozenset({State.queued, State.failed}),
    # A person may retry a failed or cancelled job: a new attempt of the same job.
    State.succeeded: frozenset(),
    State.failed: frozenset({State.queued}),
    State.cancelled: frozenset({State.queued}),
}


class TransitionError(ValueError):
    pass


def check_transition(src: State, dst: State) -> None:
    if dst not in TRANSITIONS[src]:
        raise TransitionError(f"a job cannot go from {src.value} to {dst.value}")
