"""The CLI as a client of a running service (API, dispatcher and worker processes, embedded
backend): its output, `--json` and its exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.support.stack import Stack, base_env
from tests.support.tiny_model import REPO_ID

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def stack(tmp_path_factory, hub_cache):
    root = tmp_path_factory.mktemp("cli-stack")
    s = Stack(env=base_env(root / "home", hub_cache), logs=root / "logs")
    try:
        yield s.start()
    finally:
        s.stop()


def qf(stack: Stack, *args: str, token: str | None = None, timeout: float = 300):
    env = {k: v for k, v in os.environ.items() if not k.startswith("QF_")}
    env.update(QF_API_URL=stack.url, QF_API_TOKEN=token if token is not None else stack.token)
    env["QF_CONFIG"] = os.devnull  # no developer's config file leaks in
    return subprocess.run(
        [sys.executable, "-m", "quantfoundry", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


SPEC = [
    "--model",
    REPO_ID,
    "--method",
    "rtn",
    "--bits",
    "4",
    "--group-size",
    "-1",
    "--samples",
    "4",
    "--seq-len",
    "64",
]


def test_submit_wait_json_then_list_show_artifacts(stack):
    key = f"ci-{uuid.uuid4().hex[:8]}"
    r = qf(stack, "submit", *SPEC, "--label", "release=v1", "--idempotency-key", key)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()

    w = qf(stack, "watch", job_id, "--json")
    assert w.returncode == 0, w.stderr
    events = [json.loads(line) for line in w.stdout.splitlines() if line.startswith('{"id"')]
    states = [e["data"]["state"] for e in events if e["event"] == "state"]
    assert states[0] == "queued" and states[-1] == "succeeded"
    assert any(e["event"] == "progress" and e["data"]["phase"] == "quantize" for e in events)

    # The same idempotency key maps a re-run (as CI does) to the same job.
    again = qf(stack, "submit", *SPEC, "--label", "release=v1", "--idempotency-key", key)
    assert again.returncode == 0 and again.stdout.strip() == job_id

    listed = json.loads(qf(stack, "list", "--label", "release=v1", "--json").stdout)
    assert [j["id"] for j in listed["items"]] == [job_id]
    table = qf(stack, "list").stdout
    assert job_id in table and "succeeded" in table

    shown = qf(stack, "show", job_id)
    assert shown.returncode == 0 and "succeeded" in shown.stdout and "ppl_quant" in shown.stdout

    arts = json.loads(qf(stack, "artifacts", job_id, "--json").stdout)
    names = {f["path"] for f in arts["files"]}
    assert {"config.json", "README.md"} <= names
    assert all(len(f["sha256"]) == 64 for f in arts["files"])


def test_exit_codes_for_bad_input_auth_missing_and_failure(stack):
    bad = qf(stack, "submit", *SPEC[:-2], "--bits", "5")
    assert bad.returncode == 2 and "bits" in bad.stderr and "5-bit" in bad.stderr

    assert qf(stack, "list", token="").returncode == 4  # no token
    reader = stack.make_token("test", "read", "reader")
    denied = qf(stack, "submit", *SPEC, token=reader)
    assert denied.returncode == 4

    assert qf(stack, "show", "0" * 32).returncode == 5

    # A job that fails exits with its reason's code when waited for: model_not_found is 11.
    failed = qf(stack, "submit", "--model", "nobody-here/no-such-model", "--wait")
    assert failed.returncode == 11, failed.stderr
    assert "model_not_found" in failed.stdout


def test_cancel_from_the_cli_and_watch_exits_3(stack):
    # Many short verification windows keep the job running long enough to cancel it.
    spec = stack.env["QF_HOME"] + "/long.json"
    with open(spec, "w") as f:
        json.dump(
            {
                "model_id": REPO_ID,
                "method": "rtn",
                "bits": 4,
                "group_size": -1,
                "calibration": {"n_samples": 4, "seq_len": 64},
                "evaluation": {"seq_len": 32, "max_windows": 5000},
            },
            f,
        )
    job_id = qf(stack, "submit", spec).stdout.strip()
    c = qf(stack, "cancel", job_id)
    assert c.returncode == 0 and job_id in c.stdout
    w = qf(stack, "watch", job_id)
    assert w.returncode == 3, (w.stdout, w.stderr)
    assert "cancelled" in w.stdout
    r = qf(stack, "retry", job_id, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "queued"
    assert qf(stack, "cancel", job_id).returncode == 0
