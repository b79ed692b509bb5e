"""Publishing sinks: where a verified artifact goes (a local directory or the Hugging Face
Hub), exactly once per job. Each sink can find what an earlier attempt of the same job
published, so a retry after a crash records that instead of publishing again."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jobs.settings import Settings

# (done, total, message) while publishing.
PublishProgress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Published:
    commit: str  # Hub commit id, or the local artifact's manifest digest
    url: str  # the commit's URL, or the local directory as a file:// URL
    location: str = ""  # repo_id@branch, or the local directory


class PublishError(Exception):
    """Publishing failed; the message says what to do (and never holds a secret's value)."""


def resolve_destination(destination: dict, spec: dict) -> dict:
    """The destination with its defaults filled in: a Hub repo id defaults to
    `{namespace}/{model}-{method}-w{bits}g{group}` (model: the base repo's name part)."""
    d = {"kind": "local", "branch": "main", "private": True, "token_secret": "hub-token"}
    d.update({k: v for k, v in destination.items() if v is not None})
    if d["kind"] == "hub" and not d.get("repo_id"):
        model = spec["model_id"].rstrip("/").rsplit("/", 1)[-1]
        group = "c" if spec["group_size"] == -1 else spec["group_size"]
        d["repo_id"] = f"{d['namespace']}/{model}-{spec['method']}-w{spec['bits']}g{group}"
    return d


def spec_summary(spec: dict) -> str:
    sym = "sym" if spec.get("symmetric") else "asym"
    return (
        f"{spec['model_id']}@{spec.get('revision', 'main')} {spec['method']} "
        f"w{spec['bits']} g{spec['group_size']} {sym}"
    )


def publish(
    destination: dict,
    artifact_dir: Path,
    job_id: str,
    spec_summary: str,
    settings: Settings,
    on_progress: PublishProgress | None = None,
    spec_json: str = "",
) -> Published:
    """Publish `artifact_dir` (a complete artifact) for `job_id`; returns where it went."""
    if destination.get("kind", "local") == "hub":
        from workers.sinks.hub import publish_hub

        return publish_hub(destination, artifact_dir, job_id, spec_summary, spec_json, on_progress)
    from workers.sinks.local import publish_local

    return publish_local(artifact_dir, job_id, settings, on_progress)


def find_existing(destination: dict, job_id: str, settings: Settings) -> Published | None:
    """What an earlier attempt of `job_id` already published there, if anything."""
    if destination.get("kind", "local") == "hub":
        from workers.sinks.hub import find_existing_hub

        return find_existing_hub(destination, job_id)
    from workers.sinks.local import find_existing_local

    return find_existing_local(job_id, settings)
