"""Place a local model directory into the Hub cache layout, so it loads by Hub id offline.

The layout is the one `huggingface_hub` writes: blobs named by content hash, a snapshot
directory of relative symlinks, and `refs/<revision>` naming the snapshot's commit.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def install_snapshot(src: Path, repo_id: str, cache_dir: Path, revision: str = "main") -> Path:
    """Copy the files of `src` into `cache_dir` as `repo_id`@`revision`; return the snapshot.

    The commit id is derived from the files' hashes, so installing the same files twice gives
    the same snapshot.
    """
    files = sorted(p for p in src.rglob("*") if p.is_file())
    hashes = {p.relative_to(src).as_posix(): _file_hash(p) for p in files}
    commit = hashlib.sha1("".join(f"{k}:{v}\n" for k, v in hashes.items()).encode()).hexdigest()
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, digest in hashes.items():
        blob = repo / "blobs" / digest
        if not blob.exists():
            tmp = blob.with_suffix(".incomplete")
            shutil.copyfile(src / rel, tmp)
            tmp.replace(blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot
