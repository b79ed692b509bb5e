"""What every bench script does with its table: print it, and keep it where `--save` says."""

from __future__ import annotations

from pathlib import Path


def save(lines: list[str], path: Path | None) -> None:
    """Write `lines` to `path` (its folder made if needed); nothing when `path` is None."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
