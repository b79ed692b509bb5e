"""The CLI's client side without a service: event parsing, config precedence, spec building,
exit codes, and the local `quantize` / `eval` commands on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from quantfoundry.cli import app
from quantfoundry.client import load_config, parse_sse
from quantfoundry.client_cli import FAILURE_CODES, job_exit_code
from tests.support.services import free_port

runner = CliRunner()


def test_sse_parser_reads_ids_kinds_and_multiline_data():
    stream = [
        ": keep-alive",
        "",
        "id: 7",
        "event: state",
        'data: {"state": "running",',
        'data:  "attempt": 1}',
        "",
        "id: 8",
        "event: progress",
        'data: {"phase": "quantize", "done": 1, "total": 2}',
        "",
    ]
    events = list(parse_sse(iter(stream)))
    assert [(e.id, e.kind) for e in events] == [(7, "state"), (8, "progress")]
    assert events[0].data == {"state": "running", "attempt": 1}
    assert events[1].data["done"] == 1


def test_config_precedence_flags_env_file(tmp_path, monkeypatch):
    cfg = tmp_path / "cli.toml"
    cfg.write_text('api_url = "http://file:1"\ntoken = "from-file"\n')
    monkeypatch.setenv("QF_CONFIG", str(cfg))
    monkeypatch.delenv("QF_API_URL", raising=False)
    monkeypatch.delenv("QF_API_TOKEN", raising=False)
    assert load_config() == load_config(None, None)
    assert load_config().url == "http://file:1" and load_config().token == "from-file"
    monkeypatch.setenv("QF_API_URL", "http://env:2/")
    assert load_config().url == "http://env:2"  # trailing slash dropped
    assert load_config("http://flag:3", "t").token == "t"
    cfg.write_text("api_url = [")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config()


def test_exit_codes_name_the_outcome():
    assert job_exit_code({"state": "succeeded"}) == 0
    assert job_exit_code({"state": "cancelled"}) == 3
    gate = {"state": "failed", "failure": {"reason": "quality_gate", "message": "m"}}
    assert job_exit_code(gate) == FAILURE_CODES["quality_gate"] == 15
    assert len(set(FAILURE_CODES.values())) == len(FAILURE_CODES)


def test_submit_without_model_is_bad_input_and_sends_nothing(tmp_path):
    r = runner.invoke(app, ["submit", "--api-url", "http://127.0.0.1:9", "--bits", "4"])
    assert r.exit_code == 2
    assert "no model" in r.output
    bad = tmp_path / "spec.json"
    bad.write_text("[1, 2]")
    r = runner.invoke(app, ["submit", str(bad), "--api-url", "http://127.0.0.1:9"])
    assert r.exit_code == 2 and "JSON object" in r.output
    r = runner.invoke(
        app, ["submit", "--model", "a/b", "--label", "novalue", "--api-url", "http://127.0.0.1:9"]
    )
    assert r.exit_code == 2 and "key=value" in r.output


def test_unreachable_api_exits_6_with_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    r = runner.invoke(app, ["list", "--api-url", url])
    assert r.exit_code == 6
    assert "cannot reach the API" in r.output and url in r.output


def test_local_quantize_then_eval_the_artifact(tmp_path, tiny_model_dir):
    out = tmp_path / "art"
    cmd = [sys.executable, "-m", "quantfoundry"]
    common = ["--samples", "4", "--seq-len", "64", "--eval-windows", "4", "--json"]
    r = subprocess.run(
        [*cmd, "quantize", str(tiny_model_dir), "--out", str(out), "--method", "rtn"]
        + ["--bits", "4", "--group-size", "32", "--override", "down_proj=8", *common],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["ppl_quant"] > 1.0 and (out / "manifest.json").exists()
    # The progress bars went to stderr, one per phase.
    assert "quantize" in r.stderr
    # Mixed precision came through: one config group of 8-bit weights (down_proj), one of 4.
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["num_bits"] for g in groups.values()) == [4, 8]

    r = subprocess.run(
        [*cmd, "eval", str(out), "--base", str(tiny_model_dir), "--seq-len", "64"]
        + ["--windows", "4", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    figures = json.loads(r.stdout)
    assert figures["ppl"] == pytest.approx(result["ppl_quant"], rel=1e-3)
    assert 0.0 < figures["top1"] <= 1.0 and figures["kl"] > 0

    r = subprocess.run(
        [*cmd, "quantize", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "missing" in r.stderr
