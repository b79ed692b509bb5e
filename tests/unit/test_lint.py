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


def test_no_package_of_ours_shadows_an_installed_one():
    """Our top-level packages share no name with another installed distribution's: transformers
    5.25 began importing Hugging Face's `kernels`, and our former `kernels/` package, first on
    sys.path, broke every model load ("cannot import name 'CUDAProperties' from 'kernels'")."""
    import tomllib
    from importlib.metadata import packages_distributions

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    ours = [p.rstrip("*") for p in setup["packages"]["find"]["include"]]
    assert ours and all((ROOT / name / "__init__.py").exists() for name in ours), ours
    owners = packages_distributions()
    clashes = {n: owners[n] for n in ours if set(owners.get(n, [])) - {"quantfoundry"}}
    assert not clashes, f"these names are also installed by other distributions: {clashes}"
