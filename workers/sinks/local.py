"""The local-directory sink (the embedded default): publishing is an atomic rename of a
complete artifact into `QF_ARTIFACT_DIR/<job id>`; the commit is the manifest's sha256."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

from jobs.settings import Settings
from workers.sinks import Published, PublishError, PublishProgress


def _published(target: Path) -> Published:
    digest = hashlib.sha256((target / "manifest.json").read_bytes()).hexdigest()
    return Published(commit=digest, url=target.resolve().as_uri(), location=str(target))


def _target(job_id: str, settings: Settings) -> Path:
    assert settings.artifact_dir is not None
    return settings.artifact_dir / job_id


def find_existing_local(job_id: str, settings: Settings) -> Published | None:
    target = _target(job_id, settings)
    # Only a complete directory is ever renamed into place, so a manifest means published.
    return _published(target) if (target / "manifest.json").is_file() else None


def publish_local(
    artifact_dir: Path, job_id: str, settings: Settings, on_progress: PublishProgress | None
) -> Published:
    existing = find_existing_local(job_id, settings)
    if existing is not None:  # an earlier attempt got here first: its artifact stands
        shutil.rmtree(artifact_dir, ignore_errors=True)
        return existing
    if not (artifact_dir / "manifest.json").is_file():
        raise PublishError(f"{artifact_dir} is not a complete artifact (no manifest.json)")
    target = _target(job_id, settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    if on_progress is not None:
        on_progress(0, 1, f"moving the artifact to {target}")
    try:
        os.replace(artifact_dir, target)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise PublishError(f"cannot move the artifact into {target}: {e.strerror}") from e
        # Another filesystem: copy next to the target, then rename (still atomic there).
        partial = target.with_name(f".{job_id}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(artifact_dir, partial)
        os.replace(partial, target)
        shutil.rmtree(artifact_dir, ignore_errors=True)
    if on_progress is not None:
        on_progress(1, 1, f"published {target}")
    return _published(target)
