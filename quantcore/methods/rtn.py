"""Round-to-nearest quantization with groups and zero points (pure functions)."""

from __future__ import annotations

import torch

from quantcore.qtensor import QuantizedWeight


def group_params(
    w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and unsigned zero point per row of `w` ([rows, cols] -> [rows], [rows]).

    The range always includes 0 so that zero weights stay exact. Scales are rounded to the
    storage dtype before codes are computed, so dequantizing with the stored scale is exact.
    """
    maxq = (1 << bits) - 1
    w = w.float()
    if symmetric:
        absmax = w.abs().amax(dim=1)
        scale = 2 * absmax / maxq
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
        scale = (hi - lo) / maxq
        zero = None
    scale = scale.to(scale_dtype).float()
    # An all-zero row: any positive scale reproduces it.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if zero is None:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """Quantize `weight` [out, in]; `group_size=-1` means one group per output channel.

    A group size that does not divide `in_features` leaves a partial last group.
    """
    out_f, in_f = weight.shape
    gs = in_f if group_size == -1 else group_size
    if gs <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    scale_dtype = scale_dtype or weight.dtype
    maxq = (1 << bits) - 1
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=weight.device)
    n_groups = (in_f + gs - 1) // gs
    scales = torch.empty(out_f, n_groups, dtype=torch.float32, device=weight.device)
    zeros = torch.empty(out_f, n_groups, dtype=torch.float32, device=weight.device)
    for g in range(n_groups):
        cols = slice(g * gs, min((g + 1) * gs, in_f))
        block = weight[:, cols].float()
        scale, zero = group_params(block, bits, symmetric, scale_dtype)
        q = torch.round(block / scale[:, None]) + zero[:, None]
        codes[:, cols] = q.clamp(0, maxq).to(torch.uint8)
        scales[:, g] = scale
        zeros[:, g] = zero
    return QuantizedWeight(
        codes=codes,
        scales=scales.to(scale_dtype),
        zeros=zeros.to(torch.uint8),
        bits=bits,
        group_size=gs,
        symmetric=symmetric,
    )
