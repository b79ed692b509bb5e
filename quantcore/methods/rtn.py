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
    w = w.float()
    return range_params(w.amin(dim=1), w.amax(dim=1), bits, symmetric, scale_dtype)


def range_params(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """`group_params` from each row's minimum and maximum ([rows] each)."""
    maxq = (1 << bits) - 1
    if symmetric:
        scale = 2 * torch.maximum(lo.abs(), hi.abs()) / maxq
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        lo = lo.clamp(max=0)
        scale = (hi.clamp(min=0) - lo) / maxq
        zero = None
    scale = scale.to(scale_dtype).float()
    # An all-zero row: any positive scale reproduces it.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if zero is None:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def round_trip(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    maxq: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """RTN then dequantize: (clamp(round(w / scale) + zero, 0, maxq) - zero) * scale, with
    `scale`/`zero` broadcast against `w`. Written to `out` (which may be `w` itself) or a new
    tensor; no other temporary."""
    q = torch.div(w, scale) if out is None else torch.div(w, scale, out=out)
    return q.round_().add_(zero).clamp_(0, maxq).sub_(zero).mul_(scale)


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype | None = None,
    rows_per_chunk: int = 4096,
) -> QuantizedWeight:
    """Quantize `weight` [out, in]; `group_size=-1` means one group per output channel.

    A group size that does not divide `in_features` leaves a partial last group. All groups of
    a chunk of rows are rounded at once (the chunk bounds the float temporaries).
    """
    out_f, in_f = weight.shape
    gs = in_f if group_size == -1 else group_size
    if gs <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    scale_dtype = scale_dtype or weight.dtype
    maxq = (1 << bits) - 1
    n_groups = (in_f + gs - 1) // gs
    pad = n_groups * gs - in_f
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(out_f, n_groups, dtype=torch.float32, device=weight.device)
    zeros = torch.empty(out_f, n_groups, dtype=torch.float32, device=weight.device)
    for r0 in range(0, out_f, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, out_f)
        w = weight[r0:r1].float()
        # Zero padding of a partial last group changes nothing: every range includes 0.
        if pad:
            w = torch.nn.functional.pad(w, (0, pad))
        w = w.view(r1 - r0, n_groups, gs)
        scale, zero = group_params(w.reshape(-1, gs), bits, symmetric, scale_dtype)
        scale, zero = scale.view(r1 - r0, n_groups, 1), zero.view(r1 - r0, n_groups, 1)
        q = torch.round(w / scale).add_(zero).clamp_(0, maxq).to(torch.uint8)
        codes[r0:r1] = q.view(r1 - r0, -1)[:, :in_f]
        scales[r0:r1] = scale[..., 0]
        zeros[r0:r1] = zero[..., 0]
    return QuantizedWeight(
        codes=codes,
        scales=scales.to(scale_dtype),
        zeros=zeros.to(torch.uint8),
        bits=bits,
        group_size=gs,
        symmetric=symmetric,
    )
