"""The real client on the real model: transformers (with compressed-tensors) loads our
pack-quantized SmolLM2 artifact on CPU and its logits match our QuantLinear model; our own
loader reads the GPTQ artifact back bit-exactly; verification figures of the artifact.

SmolLM2 ties lm_head to the embeddings (its checkpoint stores only embed_tokens), which the
artifact must keep. RTN from the snapshot's tensors stands in for any method here: the
formats see only QuantizedWeight."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

from quantcore.artifact import load_quantized, read_quantized, read_tensors, write_artifact
from quantcore.data.datasets import evaluation_tokens
from quantcore.eval.verify import verify
from quantcore.methods.rtn import quantize_rtn
from quantcore.models import smollm2
from quantcore.models.hub import resolve_snapshot

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def snapshot() -> Path:
    smollm2.prepare(Path(constants.HF_HUB_CACHE))
    return resolve_snapshot(smollm2.REPO_ID, "main")


@functools.cache
def rtn(snapshot: Path, sym: bool) -> dict:
    return {
        key.removesuffix(".weight"): quantize_rtn(w, 4, 64, sym)
        for key, w in load_file(snapshot / "model.safetensors").items()
        if key.startswith("model.layers.") and key.endswith("_proj.weight")
    }


@pytest.fixture(scope="module")
def tokens(snapshot):
    return evaluation_tokens(AutoTokenizer.from_pretrained(snapshot))


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("sym", [True, False])
def test_transformers_loads_our_smollm2_artifact(snapshot, tokens, tmp_path, sym):
    out = tmp_path / "art"
    write_artifact(out, snapshot, rtn(snapshot, sym), {}, ignore=["lm_head"], recipe={})
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in read_tensors(out)
    x = tokens[:, :96]
    ours = _logits(load_quantized(out, "reference"), x)
    # Symmetric loads in compressed-tensors' compressed mode; asymmetric (packed zero
    # points, which its 0.20 compressed mode rejects) dequantized on load.
    qc = None if sym else CompressedTensorsConfig(dequantize=True)
    kwargs = {} if qc is None else {"quantization_config": qc}
    theirs = AutoModelForCausalLM.from_pretrained(out, **kwargs)
    torch.testing.assert_close(_logits(theirs, x), ours, rtol=1e-4, atol=1e-4)


def test_gptq_artifact_reads_back_bit_exact(snapshot, tmp_path):
    q = rtn(snapshot, sym=False)
    out = tmp_path / "gptq"
    write_artifact(out, snapshot, q, {}, fmt="gptq", ignore=["lm_head"], recipe={})
    assert json.loads((out / "quantize_config.json").read_text())["checkpoint_format"] == "gptq_v2"
    back = read_quantized(out)
    assert set(back) == set(q) and len(q) == 30 * 7
    for name, qw in q.items():
        b = back[name]
        assert torch.equal(b.codes, qw.codes), name
        assert torch.equal(b.scales, qw.scales) and torch.equal(b.zeros, qw.zeros)
        assert torch.equal(b.group_index(), qw.group_index())


def test_verify_smollm2_artifact(snapshot, tokens, tmp_path):
    out = tmp_path / "art"
    write_artifact(out, snapshot, rtn(snapshot, sym=False), {}, ignore=["lm_head"], recipe={})
    v = verify(snapshot, out, tokens, 256, 4, "cpu", decode_tokens=8)
    print(f"\nSmolLM2 RTN w4 g64 asym artifact: {v}")
    assert 5 < v.ppl_base < 40 and 2 < v.ppl_change_pct < 60
    assert 0 < v.kl < 1 and 0.6 < v.top1 < 1
    # 4-bit codes plus scales: well under half of the float32 checkpoint.
    assert v.size_bytes < 0.5 * (snapshot / "model.safetensors").stat().st_size
