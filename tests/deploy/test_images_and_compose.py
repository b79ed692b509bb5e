"""The container images' Dockerfiles (hadolint, and what they must do) and the one-machine
compose file (the Compose Specification's JSON schema, and a compose-spec parser)."""

from __future__ import annotations

import ast
import json
import re
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from tests.deploy.conftest import ROOT, run, venv_bin

DEPLOY = ROOT / "deploy"
DOCKERFILES = ["Dockerfile.api", "Dockerfile.worker"]


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, args = line.partition(" ")
            out.append((op.upper(), args.strip()))
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_is_clean(name):
    p = run(
        [
            venv_bin("hadolint"),
            "--format",
            "json",
            "--failure-threshold",
            "style",
            str(DEPLOY / name),
        ]
    )
    assert json.loads(p.stdout or "[]") == [], p.stdout
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_multi_stage_and_runs_as_non_root(name):
    ins = instructions(name)
    froms = [a for op, a in ins if op == "FROM"]
    assert len(froms) >= 2 and all(" AS " in f.upper() for f in froms), froms
    final = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    users = [a for op, a in ins[final:] if op == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) >= 10000
    # The runtime stage takes the built environment from the build stage, not a new install.
    assert any(op == "COPY" and "--from=build" in a for op, a in ins[final:])
    assert not any(op == "RUN" and "pip install" in a for op, a in ins[final:])
    # Exec form: the process is PID 1 and receives SIGTERM itself.
    (entry,) = [a for op, a in ins if op == "ENTRYPOINT"]
    assert json.loads(entry) == ["quantfoundry"]


def requirement_closure(reqs: list[str], extras: tuple[str, ...] = ()) -> set[str]:
    """Names of the distributions `reqs` pull in, transitively, from installed metadata."""
    seen: set[str] = set()
    visited: set[tuple[str, frozenset[str]]] = set()  # a package again with new extras counts
    todo = [(r, extras) for r in reqs]
    while todo:
        spec, wanted = todo.pop()
        req = Requirement(spec)
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (*wanted, "")):
            continue
        name = req.name.lower().replace("_", "-")
        if (name, frozenset(req.extras)) in visited:
            continue
        visited.add((name, frozenset(req.extras)))
        seen.add(name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        todo += [(r, tuple(req.extras)) for r in dist.requires or []]
    return seen


def test_api_image_installs_no_torch():
    ins = instructions("Dockerfile.api")
    installs = [a for op, a in ins if op == "RUN" and "pip install" in a]
    assert installs and not any("[worker]" in a or "torch" in a.split("&&")[0] for a in installs)
    copied = {a.split()[0] for op, a in ins if op == "COPY" and not a.startswith("--")}
    assert not copied & {"quantcore", "qfkernels", "workers"}

    # What the API image installs is the project's base requirements: torch is not among
    # them, nor among anything they pull in (read from the installed packages' metadata).
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = requirement_closure(project["dependencies"])
    assert "fastapi" in deps and "celery" in deps
    assert not deps & {"torch", "triton", "transformers", "nvidia-cudnn-cu12"}, deps


def test_api_image_has_every_package_its_code_imports_at_load_time():
    """The API image copies a few source folders only; the modules in them may import, at
    module level, nothing first-party that is left out (function-level imports are lazy)."""
    ins = instructions("Dockerfile.api")
    copied = {a.split()[0] for op, a in ins if op == "COPY" and not a.startswith("--")}
    packages = {p for p in copied if (ROOT / p / "__init__.py").exists()}
    first_party = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    missing = []
    for pkg in packages:
        for path in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in tree.body:  # module level only
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for n in names:
                    top = n.split(".")[0]
                    if top in first_party and top not in packages:
                        missing.append(f"{path.relative_to(ROOT)} imports {n}")
    assert packages >= {"api", "jobs", "migrations", "quantfoundry"}
    assert not missing, missing


def test_worker_base_image_carries_the_pinned_torch():
    ins = instructions("Dockerfile.worker")
    (tag,) = [a.split("=", 1)[1] for op, a in ins if op == "ARG" and a.startswith("PYTORCH_TAG=")]
    pin = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert tag.split("-")[0] == pin, (tag, pin)
    assert "cuda" in tag
    (install,) = [a for op, a in ins if op == "RUN" and "pip install" in a]
    assert "-c constraints.txt" in install and '".[worker]"' in install


# --- compose ------------------------------------------------------------------------------

COMPOSE = DEPLOY / "compose.yaml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # merge keys (<<) resolved, as compose does


def test_compose_matches_the_compose_specification_schema():
    p = run([venv_bin("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert p.returncode == 0, p.stdout + p.stderr


def test_compose_parses_with_a_compose_spec_implementation():
    from compose_spec import PyCompose

    parsed = PyCompose.from_json(json.dumps(compose()))
    parsed.validate()
    assert parsed.service_names() == ["postgres", "redis", "migrate", "api", "dispatcher", "worker"]


def test_compose_services_are_healthchecked_and_ordered():
    services = compose()["services"]
    for name in ("postgres", "redis", "api", "dispatcher", "worker"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, (name, dep)
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], (name, dep)
    # Nothing touches the database before the migrations have run.
    for name in ("api", "dispatcher", "worker"):
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }
    assert services["migrate"]["command"] == ["db", "upgrade"]


def test_compose_runs_the_app_hardened_with_one_gpu_worker():
    doc = compose()
    services = doc["services"]
    for name in ("migrate", "api", "dispatcher", "worker"):
        svc = services[name]
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
        assert int(svc["user"].split(":")[0]) >= 10000, name
        assert "no-new-privileges:true" in svc["security_opt"], name
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            assert source in doc["volumes"], (name, volume)
    for name in ("migrate", "worker"):
        dockerfile = services[name]["build"]["dockerfile"]
        assert (COMPOSE.parent / services[name]["build"]["context"] / dockerfile).exists()
    (device,) = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    # The worker's warm shutdown gets time to finish its job.
    assert services["worker"]["stop_grace_period"] == "1h"


def test_compose_holds_no_credentials():
    """Every credential is interpolated from the environment, and the required ones fail
    loudly (${VAR:?...}) when unset."""
    services = compose()["services"]
    seen = set()
    for name, svc in services.items():
        for key, value in (svc.get("environment") or {}).items():
            value = str(value)
            if re.search(r"PASSWORD|TOKEN|PEPPER", key) or "@" in value:
                assert "${" in value, (name, key)
                seen.add(key)
    assert {"POSTGRES_PASSWORD", "QF_TOKEN_PEPPER", "QF_DATABASE_URL"} <= seen
    text = COMPOSE.read_text()
    assert "${POSTGRES_PASSWORD:?" in text and "${QF_TOKEN_PEPPER:?" in text


def test_compose_file_schema_check_is_not_vacuous(tmp_path: Path):
    broken = compose()
    broken["services"]["api"]["healthcheck"]["intervall"] = "5s"
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    p = run([venv_bin("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)])
    assert p.returncode != 0 and "intervall" in p.stdout
