"""Bits per weight of a quantization scheme, from the spec alone.

A group of `g` weights stores `g` codes of `bits` bits, one scale (fp16: 16 bits) and, when
asymmetric, one zero point of `bits` bits:

    bpw = bits + scale_bits / g            (symmetric)
    bpw = bits + (scale_bits + bits) / g   (asymmetric)

Per-channel (group_size -1) spreads one scale (and zero) over a whole input row, thousands of
weights in any real model, so its overhead rounds to nothing and bpw ~ bits. Modules left in
floating point (`ignore`, embeddings) and per-module overrides are not counted: the figure
describes the main scheme; the artifact's size on disk is the exact measure.
"""

from __future__ import annotations

SCALE_BITS = 16  # scales are stored as float16


def bits_per_weight(
    bits: int, group_size: int, symmetric: bool, scale_bits: int = SCALE_BITS
) -> float:
    if bits <= 0:
        raise ValueError(f"bits must be positive, got {bits}")
    if group_size == -1:
        return float(bits)
    if group_size <= 0:
        raise ValueError(f"group_size must be positive or -1 (per-channel), got {group_size}")
    overhead = scale_bits + (0 if symmetric else bits)
    return bits + overhead / group_size
