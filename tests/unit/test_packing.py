"""Pack/unpack round trips of integer codes into int32 words, over shapes and bit widths."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qfkernels.packing import SUPPORTED_BITS, pack_int32, packed_width, unpack_int32


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(SUPPORTED_BITS),
    rows=st.integers(1, 9),
    cols=st.integers(1, 200),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.uint8)
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (rows, packed_width(cols, bits))
    assert torch.equal(unpack_int32(packed, bits, cols), codes)


def test_layout_is_low_bits_first():
    # 4-bit codes 1..8 in one word: 0x87654321; the top nibble makes it negative as int32.
    codes = torch.arange(1, 9, dtype=torch.uint8).unsqueeze(0)
    assert pack_int32(codes, 4).item() == 0x87654321 - (1 << 32)
    # 3-bit: ten codes per word, the top two bits unused.
    codes = torch.full((1, 10), 7, dtype=torch.uint8)
    assert pack_int32(codes, 3).item() == (1 << 30) - 1


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="no packed layout for 5-bit"):
        pack_int32(torch.zeros(1, 4, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="out of range"):
        pack_int32(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="does not hold"):
        unpack_int32(torch.zeros(1, 3, dtype=torch.int32), 4, 8)
