"""Pure packing helpers: unsigned integer codes <-> int32 words.

Codes are packed along the last dimension (the input dimension of a Linear weight), lowest
bits first, `32 // bits` codes per word; a tail that does not fill a word is zero-padded.
This is the byte layout of compressed-tensors `pack-quantized` `weight_packed`.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def pack_factor(bits: int) -> int:
    """How many codes of `bits` bits one int32 word holds."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"no packed layout for {bits}-bit codes; supported: {SUPPORTED_BITS}")
    return 32 // bits


def packed_width(n: int, bits: int) -> int:
    """Number of int32 words holding `n` codes."""
    f = pack_factor(bits)
    return (n + f - 1) // f


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (any integer dtype, values in [0, 2**bits)) along the last dim."""
    f = pack_factor(bits)
    n = codes.shape[-1]
    words = packed_width(n, bits)
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    pad = words * f - n
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*codes.shape[:-1], words, f)
    shifts = torch.arange(f, dtype=torch.int64, device=codes.device) * bits
    packed = (c << shifts).sum(dim=-1)
    # Reinterpret the low 32 bits as a signed int32 (two's complement).
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)
    return packed.to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_int32`: the first `n` codes of the last dim, as uint8."""
    f = pack_factor(bits)
    if packed.shape[-1] != packed_width(n, bits):
        raise ValueError(f"packed width {packed.shape[-1]} does not hold {n} {bits}-bit codes")
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(f, dtype=torch.int64, device=packed.device) * bits
    codes = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(*packed.shape[:-1], packed.shape[-1] * f)[..., :n]
    return codes.to(torch.uint8)
