"""The torch reference and PackedWeight: unpacking, dequantization, artifact round trips."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qfkernels.packed_weight import PackedWeight, packed_weights_from_artifact
from qfkernels.packing import pack_int32, unpack_int32
from qfkernels.reference import dequantize, reference_linear, unpack_codes
from quantcore.artifact import pack_quantized_tensors
from quantcore.methods.rtn import quantize_rtn
from tests.kernels.factory import random_input, random_weight


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    rows=st.integers(1, 6),
    cols=st.integers(1, 150),
    seed=st.integers(0, 2**31 - 1),
)
def test_unpack_codes_matches_packing(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.uint8)
    packed = pack_int32(codes, bits)
    assert torch.equal(unpack_codes(packed, bits, cols).to(torch.uint8), codes)
    assert torch.equal(unpack_int32(packed, bits, cols), codes)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantize_is_the_formula(symmetric, act_order):
    # Element by element: w[n, k] = (code - zero[n, g(k)]) * scale[n, g(k)], K=100 with
    # group 32 leaves a partial last group of 4 columns.
    n, k, bits, gs = 5, 100, 4, 32
    w = random_weight(n, k, bits, gs, symmetric, act_order, torch.float32, seed=3)
    codes = unpack_int32(w.qweight, bits, k)
    g = w.g_idx.tolist() if act_order else [c // gs for c in range(k)]
    dense = dequantize(w)
    for r in range(n):
        for c in range(k):
            zero = 8 if symmetric else int(w.zeros[r, g[c]])
            expect = (int(codes[r, c]) - zero) * float(w.scales[r, g[c]])
            assert dense[r, c].item() == pytest.approx(expect, rel=1e-6, abs=1e-7)


def test_reference_linear_is_a_dense_linear():
    w = random_weight(24, 576, 4, 128, False, scale_dtype=torch.float32)
    x = random_input(7, 576, torch.float32).reshape(7, 576)
    bias = torch.randn(24)
    y = reference_linear(x, w, bias)
    dense = torch.nn.functional.linear(x.double(), dequantize(w).double(), bias.double())
    assert torch.allclose(y.double(), dense, rtol=1e-5, atol=1e-5)
    # Any leading shape; fp16 activations use the weight rounded to fp16, fp32 math.
    x3 = random_input(6, 576, torch.float16).reshape(2, 3, 576)
    y3 = reference_linear(x3, w)
    assert y3.shape == (2, 3, 24) and y3.dtype == torch.float16
    w16 = dequantize(w, torch.float16).float()
    assert torch.allclose(y3.float(), (x3.float() @ w16.t()).half().float())


@pytest.mark.parametrize(
    "bits,group_size,symmetric", [(4, 64, False), (3, 128, True), (8, -1, False), (2, 32, False)]
)
def test_artifact_tensors_round_trip(bits, group_size, symmetric):
    # quantcore's RTN + pack-quantized tensors -> PackedWeight dequantizes to the same weight
    # as quantcore's own QuantizedWeight (zero points come packed along dim 0 there).
    weight = torch.randn(40, 576, generator=torch.Generator().manual_seed(bits))
    qw = quantize_rtn(weight, bits, group_size, symmetric)
    tensors = pack_quantized_tensors("layer", qw)
    tensors["other.weight"] = torch.zeros(3)
    packed = packed_weights_from_artifact(tensors, bits, group_size, symmetric)
    assert list(packed) == ["layer"]
    w = packed["layer"]
    assert w.symmetric == symmetric and w.n_groups == qw.scales.shape[1]
    assert torch.equal(dequantize(w), qw.dequantize())
    zero_bytes = 0 if symmetric else 40 * w.n_groups
    assert w.nbytes() == w.qweight.numel() * 4 + w.scales.numel() * 4 + zero_bytes


def test_packed_weight_validates_shapes():
    w = random_weight(8, 64, 4, 32, False)
    with pytest.raises(ValueError, match="does not hold"):
        PackedWeight(w.qweight[:, :-1], w.scales, w.zeros, None, 4, 32, 64)
    with pytest.raises(ValueError, match="scale groups"):
        PackedWeight(w.qweight, w.scales, w.zeros, None, 4, 16, 64)
    with pytest.raises(ValueError, match="zeros must be uint8"):
        PackedWeight(w.qweight, w.scales, w.zeros.int(), None, 4, 32, 64)
    with pytest.raises(ValueError, match="g_idx must have shape"):
        PackedWeight(w.qweight, w.scales, w.zeros, torch.zeros(63, dtype=torch.int32), 4, 32, 64)
    with pytest.raises(ValueError, match="scales dtype"):
        PackedWeight(w.qweight, w.scales.double(), w.zeros, None, 4, 32, 64)
