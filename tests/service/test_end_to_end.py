"""Submit over HTTP, a worker process quantizes, the result is recorded and reloads."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from quantcore.artifact import load_dequantized, read_tensors
from quantcore.data.datasets import evaluation_tokens
from quantcore.eval.perplexity import perplexity
from tests.support.tiny_model import REPO_ID

pytestmark = pytest.mark.service


def spec(**overrides) -> dict:
    s = {
        "model_id": REPO_ID,
        "revision": "main",
        "method": "rtn",
        "bits": 3,
        "group_size": -1,
        "symmetric": False,
        "calibration": {"dataset": "wiki-excerpt", "n_samples": 8, "seq_len": 128, "seed": 0},
        "evaluation": {"seq_len": 128, "max_windows": 16},
    }
    s.update(overrides)
    return s


def test_job_runs_end_to_end(stack, tiny_model_dir):
    created = stack.submit(spec())
    assert created["state"] == "queued"
    job = stack.wait(created["id"])
    assert job["state"] == "succeeded", (job["failure"], stack.log("worker"))
    assert job["attempt"] == 1

    # Progress went through the phases, per layer, and ended complete.
    assert "quantize" in job["_phases_seen"] or job["progress"]["total"] > 0
    r = job["results"]
    assert r["num_layers"] == 2 and r["quantized_modules"] == 14
    assert r["ppl_quant"] > r["ppl_base"] > 1.0
    assert r["eval_windows"] == 16

    # The artifact exists, its packed tensors are there, and it reloads to the recorded figure.
    art = Path(r["artifact_path"])
    tensors = read_tensors(art)
    assert tensors["model.layers.0.self_attn.q_proj.weight_packed"].dtype == torch.int32
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors
    from transformers import AutoTokenizer

    model = load_dequantized(art)
    tokens = evaluation_tokens(AutoTokenizer.from_pretrained(art))
    again = perplexity(model, tokens, 128, 16)
    assert again.ppl == pytest.approx(r["ppl_quant"], rel=1e-4)

    # The job is listed, newest first.
    page = httpx.get(f"{stack.url}/v1/jobs", timeout=10).json()
    assert page["items"][0]["id"] == created["id"]


def test_unknown_model_fails_with_actionable_reason(stack):
    created = stack.submit(spec(model_id="nobody-here/no-such-model"))
    job = stack.wait(created["id"], timeout=120)
    assert job["state"] == "failed"
    assert job["failure"]["reason"] == "model_not_found"
    msg = job["failure"]["message"]
    assert "nobody-here/no-such-model" in msg and "cache" in msg and "hf download" in msg
