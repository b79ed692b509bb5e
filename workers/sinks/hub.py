"""The Hugging Face Hub sink: one commit with every file of the artifact on the chosen branch.

The commit's description carries the job id, so a retry after a crash (the commit landed,
the worker died before recording it) finds its own commit with `list_repo_commits` and
records that instead of committing again. The token comes from a named secret and is
scrubbed from every message this module raises.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from workers.secrets import SecretNotFoundError, resolve_secret
from workers.sinks import Published, PublishError, PublishProgress

log = logging.getLogger(__name__)


def job_marker(job_id: str) -> str:
    """The line in a commit's description that names the job that made it."""
    return f"quantfoundry-job: {job_id}"


class _Hub:
    """An HfApi for one destination, with errors turned into messages a person can act on."""

    def __init__(self, destination: dict) -> None:
        from huggingface_hub import HfApi, constants

        self.secret = destination.get("token_secret") or "hub-token"
        self.repo_id: str = destination["repo_id"]
        self.branch: str = destination.get("branch") or "main"
        self.private: bool = bool(destination.get("private", True))
        try:
            self.token = resolve_secret(self.secret)
        except SecretNotFoundError as e:
            raise PublishError(f"cannot publish to the Hub: {e}") from None
        if constants.HF_HUB_OFFLINE:
            raise PublishError(
                "cannot publish to the Hub: HF_HUB_OFFLINE is set on this worker; unset it on "
                "workers that publish (models are still read from the local cache first)"
            )
        # Read at call time (not import time), so the worker's HF_ENDPOINT always applies.
        self.endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        self.api = HfApi(endpoint=self.endpoint, token=self.token)

    def scrub(self, text: str) -> str:
        return text.replace(self.token, "***")

    def error(self, step: str, exc: Exception) -> PublishError:
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

        where = f"{self.repo_id} (branch {self.branch})"
        response = getattr(exc, "response", None)
        if isinstance(exc, HfHubHTTPError) and response is not None:
            status = response.status_code
            if status == 401 and not isinstance(exc, RepositoryNotFoundError):
                msg = (
                    f"the Hub rejected the token in secret {self.secret!r} (401) while {step}: "
                    "it is invalid or expired; store a valid write token in the secret"
                )
            elif status == 403:
                owner = self.repo_id.split("/")[0]
                msg = (
                    f"the token in secret {self.secret!r} has no write access to {where} (the "
                    f"Hub answered 403 while {step}): give it write access to {owner!r}, or "
                    "choose a repo_id in a namespace it can write"
                )
            elif isinstance(exc, RepositoryNotFoundError) or status == 404:
                msg = (
                    f"the Hub says {self.repo_id} does not exist or is not visible to the token "
                    f"in secret {self.secret!r} ({status} while {step}); check the repo_id and "
                    "the token's access"
                )
            else:
                msg = (
                    f"the Hub answered {status} while {step} for {where}: "
                    f"{exc.server_message or exc}; retry the job later"
                )
        elif isinstance(exc, httpx2.HTTPError | OSError):
            msg = (
                f"cannot reach the Hub at {self.endpoint} while {step}: {exc}; check the "
                "worker's network and HF_ENDPOINT, then retry the job"
            )
        else:
            msg = f"publishing to {where} failed while {step}: {type(exc).__name__}: {exc}"
        return PublishError(self.scrub(msg))

    def find(self, job_id: str) -> Published | None:
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        try:
            commits = self.api.list_repo_commits(self.repo_id, revision=self.branch)
        except (RepositoryNotFoundError, RevisionNotFoundError):
            return None
        except Exception as e:
            raise self.error("looking for an earlier commit of this job", e) from None
        marker = job_marker(job_id)
        for c in commits:
            if marker in (c.message or "") or marker in (c.title or ""):
                return self.published(c.commit_id)
        return None

    def published(self, commit: str) -> Published:
        return Published(
            commit=commit,
            url=f"{self.endpoint}/{self.repo_id}/commit/{commit}",
            location=f"{self.repo_id}@{self.branch}",
        )


def find_existing_hub(destination: dict, job_id: str) -> Published | None:
    return _Hub(destination).find(job_id)


def publish_hub(
    destination: dict,
    artifact_dir: Path,
    job_id: str,
    spec_summary: str,
    spec_json: str = "",
    on_progress: PublishProgress | None = None,
) -> Published:
    """Create the repo (private by default) and the branch if missing, then commit every file
    of `artifact_dir` in one commit, unless an earlier attempt of this job already did."""
    from huggingface_hub import CommitOperationAdd

    hub = _Hub(destination)
    existing = hub.find(job_id)
    if existing is not None:
        log.info("job %s: found its earlier commit %s; not committing again", job_id, existing)
        return existing
    files = sorted(f for f in artifact_dir.rglob("*") if f.is_file())
    size = sum(f.stat().st_size for f in files)

    def progress(done: int, message: str) -> None:
        if on_progress is not None:
            on_progress(done, 3, message)

    progress(0, f"creating {hub.repo_id} (private: {hub.private})")
    try:
        hub.api.create_repo(hub.repo_id, private=hub.private, exist_ok=True)
    except Exception as e:
        raise hub.error("creating the repository", e) from None
    if hub.branch != "main":
        progress(1, f"creating branch {hub.branch}")
        try:
            hub.api.create_branch(hub.repo_id, branch=hub.branch, exist_ok=True)
        except Exception as e:
            raise hub.error(f"creating branch {hub.branch}", e) from None
    progress(2, f"committing {len(files)} files ({size / 1e6:.1f} MB) to {hub.repo_id}")
    operations = [
        CommitOperationAdd(path_in_repo=f.relative_to(artifact_dir).as_posix(), path_or_fileobj=f)
        for f in files
    ]
    description = f"{job_marker(job_id)}\n\nSpec:\n\n```json\n{spec_json}\n```\n"
    try:
        info = hub.api.create_commit(
            hub.repo_id,
            operations,
            commit_message=f"quantfoundry job {job_id}: {spec_summary}",
            commit_description=description,
            revision=hub.branch,
        )
    except Exception as e:
        raise hub.error("committing the artifact", e) from None
    progress(3, f"committed {info.oid[:12]} to {hub.repo_id}@{hub.branch}")
    return hub.published(info.oid)
