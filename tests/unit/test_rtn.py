"""RTN against a plain per-element reference, and the QuantizedWeight artifact round trip."""

from __future__ import annotations

import pytest
import torch

from quantcore.artifact import pack_quantized_tensors, unpack_quantized_tensors
from quantcore.methods.rtn import quantize_rtn


def reference_rtn(w: torch.Tensor, bits: int, gs: int, sym: bool) -> torch.Tensor:
    """Textbook fake-quantization, one group at a time, written without vectorized tricks."""
    maxq = 2**bits - 1
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], gs):
            x = w[r, start : start + gs]
            if sym:
                scale = 2 * x.abs().max() / maxq
                zero = 2 ** (bits - 1)
            else:
                lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
                scale = (hi - lo) / maxq
                zero = torch.round(-lo / scale).clamp(0, maxq) if scale > 0 else 0
            scale = scale if scale > 0 else torch.tensor(1.0)
            q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
            out[r, start : start + gs] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize(("cols", "gs"), [(128, 32), (96, 64), (100, -1), (576, 128)])
def test_matches_reference(bits, sym, cols, gs):
    w = torch.randn(12, cols, generator=torch.Generator().manual_seed(bits * cols))
    qw = quantize_rtn(w, bits, gs, sym, scale_dtype=torch.float32)
    g = cols if gs == -1 else gs
    assert qw.scales.shape == (12, -(-cols // g))
    assert int(qw.codes.max()) < 2**bits
    ref = reference_rtn(w, bits, g, sym)
    torch.testing.assert_close(qw.dequantize(torch.float32), ref, rtol=0, atol=1e-6)
    # Round to nearest: no element is off by more than half a step of its group.
    step = qw.scales.float()[:, qw.group_index()]
    inside = (ref - w).abs() <= step / 2 + 1e-6
    assert inside.float().mean() > 0.95  # only the clamped extremes of sym may exceed it


def test_partial_last_group_has_its_own_scale():
    w = torch.ones(2, 100)
    w[:, 96:] = 100.0  # only the last, partial group (4 columns) holds large values
    qw = quantize_rtn(w, 4, 32, False, scale_dtype=torch.float32)
    assert qw.scales.shape == (2, 4)
    assert qw.scales[0, 3] > 10 * qw.scales[0, 0]
    torch.testing.assert_close(qw.dequantize(torch.float32)[:, :96], w[:, :96])


def test_zero_rows_stay_zero():
    w = torch.zeros(3, 64)
    for sym in (False, True):
        qw = quantize_rtn(w, 4, 32, sym)
        assert torch.equal(qw.dequantize(), w)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_pack_quantized_round_trip_is_exact(bits, sym):
    w = torch.randn(37, 200, dtype=torch.float16)
    qw = quantize_rtn(w, bits, 64, sym)
    tensors = pack_quantized_tensors("m", qw)
    assert ("m.weight_zero_point" in tensors) is (not sym)
    back = unpack_quantized_tensors("m", tensors, bits, 64, sym)
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.dequantize(), qw.dequantize())
