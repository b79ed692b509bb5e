"""Calibration forwards in bfloat16 (quantcore.precision): what "auto" resolves to, that only
module runs autocast (never the methods' math), and that a bfloat16-forward walk stays close
to the float32 one on the tiny Llama."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantcore import precision
from quantcore.data.datasets import calibration_samples
from quantcore.errors import BadRequestError
from quantcore.methods import gptq_method
from quantcore.methods.base import QuantScheme, SchemeMap
from quantcore.methods.gptq_method import GPTQ
from quantcore.pipeline import Calibration, QuantizeRequest, quantize, request_key
from quantcore.walker import quantize_model


def _cpu_bf16(monkeypatch, avx512_bf16: bool, amx: bool = False) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, None)],
)
def test_auto_is_bfloat16_only_where_the_cpu_multiplies_it_natively(
    monkeypatch, avx512_bf16, amx, expected
):
    _cpu_bf16(monkeypatch, avx512_bf16, amx)
    assert precision.resolve("auto", "cpu") is expected
    # Explicit choices do not depend on the machine.
    assert precision.resolve("float32", "cpu") is None
    assert precision.resolve("bfloat16", "cpu") is torch.bfloat16


def test_auto_keeps_a_method_that_declines_bfloat16_in_float32(monkeypatch):
    _cpu_bf16(monkeypatch, True)
    assert precision.resolve("auto", "cpu", auto_bfloat16=False) is None
    assert precision.resolve("bfloat16", "cpu", auto_bfloat16=False) is torch.bfloat16
    # AWQ declines (its clipping and refit read the recorded inputs), GPTQ takes it: only
    # GPTQ's checkpoints depend on the machine's bfloat16.
    awq, gptq = QuantizeRequest("m", method="awq"), QuantizeRequest("m", method="gptq")
    keys = request_key(awq), request_key(gptq)
    _cpu_bf16(monkeypatch, False)
    assert request_key(awq) == keys[0]
    assert request_key(gptq) != keys[1]


def test_an_unknown_forward_dtype_is_refused_by_name():
    with pytest.raises(BadRequestError, match=r"forward_dtype.*auto, float32, bfloat16.*'fp8'"):
        precision.resolve("fp8", "cpu")


def test_only_module_runs_inside_a_forward_dtype_autocast():
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with precision.module_runs("cpu", torch.float32):
        assert lin(x).dtype == torch.float32  # no forward dtype set
    with precision.forward_dtype(torch.bfloat16):
        assert precision.active() is torch.bfloat16
        assert (x @ lin.weight.t()).dtype == torch.float32  # math outside module runs
        with precision.module_runs("cpu", torch.float32):
            assert lin(x).dtype == torch.bfloat16
        # A bfloat16 or float16 model already runs in its own dtype.
        with precision.module_runs("cpu", torch.float16):
            assert not torch.is_autocast_enabled("cpu")
    assert precision.active() is None


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_bfloat16_forwards_feed_float32_gptq(tiny_model_dir, tokenizer, monkeypatch):
    """The block passes run under autocast (down_proj reads bfloat16 inputs), GPTQ's
    math does not, and the codes differ from a float32-forward walk's only where bfloat16's
    rounding tips a weight over a rounding boundary."""
    samples = calibration_samples(tokenizer, "wiki-excerpt", 4, 64, seed=0)
    schemes = SchemeMap(QuantScheme(4, 32, False))
    seen_inputs: set[torch.dtype] = set()
    in_math: list[bool] = []
    real = gptq_method.gptq_quantize

    def watched(*args, **kwargs):
        in_math.append(torch.is_autocast_enabled("cpu"))
        return real(*args, **kwargs)

    monkeypatch.setattr(gptq_method, "gptq_quantize", watched)

    def run(forward_dtype):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
            lambda _m, args: seen_inputs.add(args[0].dtype)
        )
        q = quantize_model(model, samples, GPTQ(awq_grid=5), schemes, forward_dtype=forward_dtype)
        handle.remove()
        return q

    f32 = run(None)
    assert seen_inputs == {torch.float32}
    seen_inputs.clear()
    bf16 = run(torch.bfloat16)
    # bfloat16 in the passes; float32 only in the check that AWQ's folds are exact.
    assert torch.bfloat16 in seen_inputs
    assert in_math and not any(in_math)
    assert f32.keys() == bf16.keys()
    same = sum(int((f32[n].codes == bf16[n].codes).sum()) for n in f32)
    total = sum(f32[n].codes.numel() for n in f32)
    assert 0.8 < same / total < 1.0
    for n in f32:
        assert bf16[n].scales.dtype == f32[n].scales.dtype == torch.float32


def test_checkpoints_are_not_shared_across_forward_dtypes(monkeypatch):
    """The "auto" dtype resolves per machine: a checkpoint from a machine where it meant bfloat16 is
    not resumed where it means float32 (the results would not be bit-identical)."""
    req = QuantizeRequest("m", method="gptq", calibration=Calibration(forward_dtype="auto"))
    _cpu_bf16(monkeypatch, True)
    with_bf16 = request_key(req)
    assert request_key(req) == with_bf16
    _cpu_bf16(monkeypatch, False)
    assert request_key(req) != with_bf16


def test_a_request_with_a_bad_forward_dtype_fails_before_loading(monkeypatch):
    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("quantcore.pipeline.load_lazy", no_load)
    req = QuantizeRequest("m", method="gptq", calibration=Calibration(forward_dtype="half"))
    with pytest.raises(BadRequestError, match="forward_dtype"):
        quantize(req, device="cpu")
