"""Pure-torch reference: unpack, dequantize, matmul with fp32 accumulation.

It is the oracle the Triton kernels are tested against and the CPU path of QuantLinear, so it
fixes the semantics the kernels must reproduce: the dequantized weight is rounded to the
activation dtype (the weight a model "with dequantized weights" would hold), then multiplied in
fp32, and the result is rounded once to the output dtype.
"""

from __future__ import annotations

import torch

from qfkernels.packed_weight import PackedWeight


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Codes [N, K] (int32) from int32 words [N, ceil(K / (32 // bits))].

    Works in int32 (an arithmetic shift then a mask is exact for every shift < 32), which needs
    half the memory of the int64 route in qfkernels.packing on a large layer.
    """
    f = 32 // bits
    shifts = torch.arange(f, dtype=torch.int32, device=qweight.device) * bits
    codes = (qweight.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(qweight.shape[0], -1)[:, :in_features]


def group_index(w: PackedWeight) -> torch.Tensor:
    """Group of every input column, int64 [K]."""
    if w.g_idx is not None:
        return w.g_idx.long()
    return torch.arange(w.in_features, device=w.device) // w.group_size


def dequantize(w: PackedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight [N, K], computed in fp32 and rounded once to `dtype` (scales' dtype)."""
    g = group_index(w)
    codes = unpack_codes(w.qweight, w.bits, w.in_features).float()
    scales = w.scales.float().index_select(1, g)
    if w.zeros is None:
        dense = (codes - float(1 << (w.bits - 1))) * scales
    else:
        dense = (codes - w.zeros.float().index_select(1, g)) * scales
    return dense.to(dtype or w.scales.dtype)


def reference_linear(
    x: torch.Tensor,
    w: PackedWeight,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    dense: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ W.T (+ bias) for x [..., K]; fp32 math, output in `out_dtype` (x's dtype).

    `dense` is `dequantize(w, x.dtype).float()` when the caller already has it (a cache).
    """
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {w.in_features}")
    if dense is None:
        dense = dequantize(w, x.dtype).float()
    y = x.float() @ dense.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)
