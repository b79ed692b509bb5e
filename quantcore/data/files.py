"""Calibration text from a local file: `.txt` (documents separated by blank lines) or `.jsonl`
(one JSON object per line, its text under a named field)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from quantcore.errors import BadRequestError

SUFFIXES = (".txt", ".jsonl")


def check_file(path: str | None) -> Path:
    """The calibration file `path` names, or a BadRequestError saying what is wrong."""
    if not path:
        raise BadRequestError("calibration dataset 'file' needs `path`: a .txt or .jsonl file")
    p = Path(path).expanduser()
    if p.suffix.lower() not in SUFFIXES:
        raise BadRequestError(
            f"calibration file {p.name}: unsupported type {p.suffix or '(none)'}; use .txt "
            "(documents separated by blank lines) or .jsonl (one JSON object per line)"
        )
    if not p.is_file():
        raise BadRequestError(f"calibration file {p} does not exist")
    return p


def read_documents(path: str | None, text_field: str = "text") -> list[str]:
    """The file's documents, in file order; empty ones are dropped."""
    p = check_file(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadRequestError(f"calibration file {p.name} is not UTF-8 text: {e}") from e
    docs = _jsonl(p.name, raw, text_field) if p.suffix.lower() == ".jsonl" else _txt(raw)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise BadRequestError(f"calibration file {p.name} is empty (no text in it)")
    return docs


def _txt(raw: str) -> list[str]:
    return [d.strip() for d in re.split(r"\n\s*\n", raw)]


def _jsonl(name: str, raw: str, field: str) -> list[str]:
    docs = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadRequestError(f"calibration file {name}, line {n}: not valid JSON ({e})") from e
        if not isinstance(obj, dict):
            raise BadRequestError(
                f"calibration file {name}, line {n}: expected a JSON object, got "
                f"{type(obj).__name__}"
            )
        if field not in obj:
            keys = ", ".join(sorted(obj)) or "none"
            raise BadRequestError(
                f"calibration file {name}, line {n}: no field {field!r} (its fields: {keys}); "
                "set text_field to the field that holds the text"
            )
        if not isinstance(obj[field], str):
            raise BadRequestError(
                f"calibration file {name}, line {n}: field {field!r} is "
                f"{type(obj[field]).__name__}, not a string"
            )
        docs.append(obj[field])
    return docs
