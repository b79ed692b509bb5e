"""The format writers as pure functions: GPTQ's bit stream against the textbook 3-bit loop,
GPTQ and pack-quantized round trips, and mixed-precision configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantcore.formats import WeightScheme, gptq, pack_quantized, scheme_of
from quantcore.methods.rtn import quantize_rtn


def autogptq_pack_3bit(codes: np.ndarray) -> np.ndarray:
    """AutoGPTQ's 3-bit packing of one column of 32 codes into 3 words, written out as its
    loop does (10 codes, one straddling, 10, one straddling, 10)."""
    q = np.zeros(3, dtype=np.uint64)
    i = row = 0
    for j in range(i, i + 10):
        q[row] |= int(codes[j]) << (3 * (j - i))
    i += 10
    q[row] |= int(codes[i]) << 30
    row += 1
    q[row] |= (int(codes[i]) >> 2) & 1
    i += 1
    for j in range(i, i + 10):
        q[row] |= int(codes[j]) << (3 * (j - i) + 1)
    i += 10
    q[row] |= int(codes[i]) << 31
    row += 1
    q[row] |= (int(codes[i]) >> 1) & 0x3
    i += 1
    for j in range(i, i + 10):
        q[row] |= int(codes[j]) << (3 * (j - i) + 2)
    return (q & 0xFFFFFFFF).astype(np.uint32)


def test_3bit_bitstream_matches_autogptq_layout():
    gen = np.random.default_rng(0)
    for _ in range(20):
        codes = gen.integers(0, 8, 32)
        ours = gptq.pack_bitstream(torch.tensor(codes).unsqueeze(0), 3)[0]
        assert (ours.numpy().astype(np.uint32) == autogptq_pack_3bit(codes)).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bitstream_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (7, 96), dtype=torch.uint8)
    words = gptq.pack_bitstream(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (7, 96 * bits // 32)
    assert torch.equal(gptq.unpack_bitstream(words, bits, 96), codes)


def _qw(bits, gs, sym, shape=(64, 96), g_idx=False):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(bits * 100 + gs))
    qw = quantize_rtn(w, bits, gs, sym)
    if g_idx:  # a real permutation-style group index
        perm = torch.randperm(shape[1], generator=torch.Generator().manual_seed(1))
        qw = type(qw)(
            qw.codes, qw.scales, qw.zeros, bits, qw.group_size, sym, (perm // qw.group_size).int()
        )
    return qw


def _same(a, b):
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.scales, b.scales)
    assert torch.equal(a.zeros, b.zeros)
    assert torch.equal(a.group_index(), b.group_index())
    assert (a.g_idx is None) == (b.g_idx is None)


@pytest.mark.parametrize(
    ("bits", "gs", "sym", "g_idx"),
    [
        (4, 32, True, False),
        (4, 64, False, False),
        (3, 64, True, True),
        (8, -1, True, False),
        (2, 32, False, True),
    ],
)
def test_gptq_round_trip_is_bit_exact(bits, gs, sym, g_idx):
    """96 columns with group 64: a partial last group; g_idx: act-order with a group index."""
    qw = _qw(bits, gs, sym, g_idx=g_idx)
    v2 = not sym
    t = gptq.linear_tensors("m", qw, v2)
    assert t["m.qweight"].shape == (96 * bits // 32, 64) and t["m.g_idx"].shape == (96,)
    assert t["m.scales"].shape == (qw.scales.shape[1], 64)
    back = gptq.read_linear("m", t, scheme_of(qw), v2)
    _same(qw, back)
    if sym and bits == 4:  # v1 stores zero - 1: the well-known 0x77777777
        assert (t["m.qzeros"] == 0x77777777).all()


def test_gptq_v1_refuses_asymmetric_and_odd_shapes():
    with pytest.raises(ValueError, match="gptq_v2"):
        gptq.linear_tensors("m", _qw(4, 32, False), v2=False)
    with pytest.raises(ValueError, match="out_features=36.*pack-quantized"):
        gptq.linear_tensors("m", _qw(3, 32, True, shape=(36, 96)), v2=True)


def test_mixed_precision_pack_quantized_config_has_a_group_per_scheme():
    w4 = WeightScheme(4, 64, False, None)
    w8 = WeightScheme(8, -1, True, None)
    schemes = {"a.q": w4, "a.k": w4, "a.down": w8}
    qc = pack_quantized.quantization_config(schemes, ["lm_head"])
    groups = list(qc["config_groups"].values())
    assert len(groups) == 2
    assert sorted(g["targets"] for g in groups) == [["a.down"], ["a.k", "a.q"]]
    by_bits = {g["weights"]["num_bits"]: g["weights"] for g in groups}
    assert by_bits[8]["strategy"] == "channel" and by_bits[8]["group_size"] is None
    assert by_bits[4]["strategy"] == "group" and by_bits[4]["group_size"] == 64
    assert qc["ignore"] == ["lm_head"]
    assert pack_quantized.schemes_from_config(qc, list(schemes)) == schemes
    # One scheme targets every Linear by class.
    one = pack_quantized.quantization_config({"a.q": w4}, [])
    assert one["config_groups"]["group_0"]["targets"] == ["Linear"]


def test_mixed_precision_gptq_config_uses_dynamic_overrides():
    w4 = WeightScheme(4, 64, True, None)
    w8 = WeightScheme(8, 64, False, None)
    schemes = {"l.0.q": w4, "l.0.k": w4, "l.0.down": w8}
    qc = gptq.quantize_config(schemes, ["lm_head"])
    assert qc["bits"] == 4 and qc["checkpoint_format"] == "gptq_v2"
    assert qc["dynamic"]["+:^l\\.0\\.down$"]["bits"] == 8
    assert qc["dynamic"]["-:^lm_head$"] == {}
    assert gptq.schemes_from_config(qc, list(schemes)) == schemes
