"""The code base stays ruff clean, and the dependency arrows of ARCHITECTURE.md hold."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    p = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_dependency_arrows():
    forbidden = {
        "qfkernels": ("quantcore", "jobs", "workers", "api"),
        "quantcore": ("jobs", "workers", "api"),
        "jobs": ("workers", "api", "quantcore", "qfkernels", "torch"),
        "api": ("workers", "quantcore", "qfkernels", "torch"),
    }
    bad = []
    for pkg, banned in forbidden.items():
        for f in (ROOT / pkg).rglob("*.py"):
            for line in f.read_text().splitlines():
                m = re.match(r"\s*(?:from|import)\s+([A-Za-z_]\w*)", line)
                if m and m.group(1) in banned:
                    bad.append(f"{f.relative_to(ROOT)}: {line.strip()}")
    assert not bad, "imports against the arrows:\n" + "\n".join(bad)
