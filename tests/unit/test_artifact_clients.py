"""The real client: transformers with compressed-tensors loads our pack-quantized artifact and
computes the same logits as our QuantLinear model over the same bytes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from quantcore.artifact import load_quantized, read_tensors
from quantcore.pipeline import Calibration, Evaluation, QuantizeRequest, run


@pytest.mark.parametrize(
    ("method", "bits", "group", "sym"),
    [
        ("rtn", 4, 32, False),
        ("rtn", 4, 32, True),
        ("rtn", 8, -1, True),
        ("gptq", 4, 32, True),
        ("awq", 4, 32, False),
    ],
)
def test_transformers_loads_our_artifact(tiny_model_dir, tmp_path, method, bits, group, sym):
    # AWQ also rescales norms: the artifact must carry them, or the logits would differ.
    req = QuantizeRequest(
        model_id=str(tiny_model_dir),
        method=method,
        bits=bits,
        group_size=group,
        symmetric=sym,
        calibration=Calibration(n_samples=2, seq_len=64),
        evaluation=Evaluation(seq_len=64, max_windows=2),
    )
    out = tmp_path / "artifact"
    run(req, out)
    x = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    ours = load_quantized(out, backend="reference")
    # Dequantize on load: works for every scheme compressed-tensors 0.20 reads.
    theirs = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    with torch.no_grad():
        a, b = ours(x).logits, theirs(x).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    if sym:
        # The default, compressed mode too. (compressed-tensors 0.20 builds asymmetric modules
        # with unpacked zero-point shapes on the meta device, so it rejects packed zero points
        # there; its own pack-quantized compressor writes them packed, as we do.)
        compressed = AutoModelForCausalLM.from_pretrained(out)
        with torch.no_grad():
            torch.testing.assert_close(compressed(x).logits, a, rtol=1e-5, atol=1e-5)
    assert read_tensors(out)["model.layers.0.mlp.down_proj.weight_packed"].dtype == torch.int32
