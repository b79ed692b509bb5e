"""Calibration files uploaded through the API (.txt or .jsonl), checked and kept in the
database; a worker on any machine writes one back to a local file to calibrate with."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path, PurePath

from sqlalchemy.orm import Session

from jobs.models import CalibrationUpload

FORMATS = {".txt": "txt", ".jsonl": "jsonl"}


class UploadRejected(ValueError):
    """The message says what is wrong with the file."""


def inspect_upload(filename: str, data: bytes, max_bytes: int) -> tuple[str, int]:
    """The file's format and line count, or UploadRejected naming the problem."""
    fmt = FORMATS.get(PurePath(filename).suffix.lower())
    if fmt is None:
        raise UploadRejected(f"file: {filename!r} must end in .txt or .jsonl")
    if not data:
        raise UploadRejected(f"file: {filename!r} is empty")
    if len(data) > max_bytes:
        raise UploadRejected(f"file: {filename!r} is larger than the limit of {max_bytes} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UploadRejected(f"file: not UTF-8 text (byte {e.start}: {e.reason})") from None
    lines = text.splitlines()
    if fmt == "jsonl":
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UploadRejected(f"file: line {i} is not JSON: {e.msg}") from None
            if not isinstance(row, dict) or not any(isinstance(v, str) for v in row.values()):
                raise UploadRejected(f"file: line {i} is not a JSON object with a text field")
    if not any(line.strip() for line in lines):
        raise UploadRejected(f"file: {filename!r} holds no text")
    return fmt, len(lines)


def store_upload(
    session: Session, team: str, owner: str | None, filename: str, data: bytes, max_bytes: int
) -> CalibrationUpload:
    fmt, lines = inspect_upload(filename, data, max_bytes)
    row = CalibrationUpload(
        team=team,
        owner=owner,
        filename=PurePath(filename).name[:255],
        format=fmt,
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        lines=lines,
        content=data,
    )
    session.add(row)
    session.flush()
    return row


def materialize(session: Session, upload_id: str, directory: Path | None = None) -> Path:
    """The upload as a local file named by its digest (the same path on every attempt, so a
    resumed run's checkpoints still match its request)."""
    upload = session.get(CalibrationUpload, upload_id)
    if upload is None:
        raise LookupError(f"calibration upload {upload_id!r} no longer exists")
    directory = directory or Path(tempfile.gettempdir()) / "quantfoundry-uploads"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{upload.sha256}.{upload.format}"
    if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != upload.sha256:
        tmp = path.with_suffix(".part")
        tmp.write_bytes(upload.content)
        tmp.replace(path)
    return path
