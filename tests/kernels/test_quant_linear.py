"""QuantLinear on its own and swapped into a tiny Llama, against dequantized dense weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qfkernels.packed_weight import PackedWeight
from qfkernels.quant_linear import QuantLinear, quant_matmul, replace_linears, resolve_backend
from qfkernels.reference import dequantize, reference_linear
from quantcore.artifact import pack_quantized_tensors, unpack_quantized_tensors
from quantcore.methods.rtn import quantize_rtn
from tests.kernels.factory import TOLERANCE, random_input, random_weight, rel_error


def _triton_backend_device() -> torch.device:
    # "triton" on CPU tensors runs under the interpreter (set by conftest without a GPU).
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_quant_linear_matches_dense_linear(backend, m):
    device = _triton_backend_device()
    w = random_weight(48, 192, 4, 64, False, scale_dtype=torch.float32)
    bias = torch.randn(48)
    dense = nn.Linear(192, 48).to(device)
    with torch.no_grad():
        dense.weight.copy_(dequantize(w))
        dense.bias.copy_(bias)
    q = QuantLinear(w, bias, backend=backend).to(device)
    x = random_input(m, 192, torch.float32).reshape(1, m, 192).to(device)
    y = q(x)
    assert y.shape == (1, m, 48)
    assert rel_error(y, dense(x).detach()) < TOLERANCE[torch.float32]


def test_quant_linear_buffers_follow_the_module():
    w = random_weight(16, 64, 4, 32, False, act_order=True, scale_dtype=torch.float32)
    q = QuantLinear(w, torch.randn(16))
    names = {n for n, _ in q.named_buffers()}
    assert names == {"qweight", "scales", "zeros", "g_idx", "bias"}
    assert "bits=4" in repr(q) and "act_order=True" in repr(q)
    h = q.half()
    assert h.scales.dtype == torch.float16 and h.qweight.dtype == torch.int32
    assert h.packed().scales.dtype == torch.float16
    sym = QuantLinear(random_weight(16, 64, 4, 32, True))
    assert "zeros" not in dict(sym.named_buffers())
    with pytest.raises(ValueError, match="backend must be one of"):
        QuantLinear(w, backend="cuda")


def test_auto_backend_uses_reference_off_cuda():
    x = torch.zeros(2, 8)
    assert resolve_backend("auto", x) == "reference"
    assert resolve_backend("triton", x) == "triton"
    # quant_matmul with "auto" on the CPU is exactly the reference.
    w = random_weight(8, 64, 2, 32, False)
    x = random_input(3, 64, torch.float32)
    assert torch.equal(quant_matmul(x, w), reference_linear(x, w))


def test_from_artifact_tensors():
    weight = torch.randn(32, 96, generator=torch.Generator().manual_seed(0))
    qw = quantize_rtn(weight, 4, 32, symmetric=False)
    tensors = pack_quantized_tensors("proj", qw)
    tensors["proj.bias"] = torch.randn(32)
    q = QuantLinear.from_artifact("proj", tensors, 4, 32, symmetric=False, backend="triton")
    x = random_input(4, 96, torch.float32).to(_triton_backend_device())
    q = q.to(x.device)
    expect = x @ qw.dequantize().to(x.device).t() + tensors["proj.bias"].to(x.device)
    assert rel_error(q(x), expect) < TOLERANCE[torch.float32]
    # The same layer from quantcore's unpacked form (codes, scales, zeros), repacked.
    uq = unpack_quantized_tensors("proj", tensors, 4, 32, symmetric=False)
    w = PackedWeight.from_codes(uq.codes, uq.scales, uq.zeros, uq.bits, uq.group_size, uq.g_idx)
    assert torch.equal(w.qweight, tensors["proj.weight_packed"])
    q2 = QuantLinear(w, tensors["proj.bias"], backend="triton").to(x.device)
    assert torch.equal(q2(x), q(x))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_quant_linear_in_llama_matches_dequantized_model(backend):
    device = _triton_backend_device()
    model = _tiny_llama()
    dense = copy.deepcopy(model)
    packed: dict[str, PackedWeight] = {}
    schemes = [(4, 32, False), (8, -1, True), (3, 64, False), (2, 32, False)]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    linears = [(n, m) for n, m in linears if n != "lm_head"]
    assert len(linears) == 14
    for i, (name, module) in enumerate(linears):
        bits, gs, sym = schemes[i % len(schemes)]
        qw = quantize_rtn(module.weight.detach(), bits, gs, sym)
        # The very tensors an artifact publishes, read back as the kernels' PackedWeight.
        tensors = pack_quantized_tensors(name, qw)
        packed[name] = PackedWeight.from_artifact(name, tensors, bits, gs, sym)
        with torch.no_grad():
            dense.get_submodule(name).weight.copy_(qw.dequantize())
    replaced = replace_linears(model, packed, backend=backend)
    assert replaced == [n for n, _ in linears]
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    model.to(device)
    dense.to(device)

    gen = torch.Generator().manual_seed(1)
    # 1 x 8 tokens runs the GEMV (M=8), 2 x 20 the GEMM (M=40).
    for shape in ((1, 8), (2, 20)):
        ids = torch.randint(0, 128, shape, generator=gen).to(device)
        with torch.no_grad():
            got = model(ids).logits
            want = dense(ids).logits
        assert torch.isfinite(got).all()
        assert rel_error(got, want) < TOLERANCE[torch.float32]
    # The quantization is not a no-op: the dequantized model differs from the original.
    with torch.no_grad():
        original = _tiny_llama().to(device)(ids).logits
    assert rel_error(original, want) > 1e-3


def test_replace_linears_rejects_mismatches():
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU())
    with pytest.raises(ValueError, match="is not an nn.Linear"):
        replace_linears(model, {"1": random_weight(16, 64, 4, 32, False)})
    with pytest.raises(ValueError, match="packed weight is"):
        replace_linears(model, {"0": random_weight(8, 64, 4, 32, False)})
    bias = model[0].bias.detach().clone()
    replace_linears(model, {"0": random_weight(16, 64, 4, 32, False)})
    assert isinstance(model[0], QuantLinear) and torch.equal(model[0].bias, bias)
