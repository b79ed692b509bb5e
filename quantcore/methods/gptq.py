"""GPTQ's math (pure functions): quantize a weight column by column, spreading each column's
rounding error over the columns not yet quantized through the inverse Hessian of the layer
input (Frantar et al., 2022), with lazy block updates."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantcore.methods.rtn import group_params
from quantcore.qtensor import QuantizedWeight


@dataclass(frozen=True)
class GPTQConfig:
    bits: int
    group_size: int  # -1: per output channel
    symmetric: bool
    block_size: int = 128
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to the diagonal
    act_order: bool = False  # quantize columns by descending Hessian diagonal
    mse: bool = False  # search a shrunken range per group instead of min/max


def accumulate_hessian(h: torch.Tensor, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold a batch of inputs `x` [..., in] into the running mean H = 2/n sum x x^T (fp32)."""
    x = x.reshape(-1, x.shape[-1]).float()
    b = x.shape[0]
    h *= n / (n + b)
    x = x * math.sqrt(2 / (n + b))
    h += x.t() @ x
    return h, n + b


def inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + d I)^-1, with d = damp * mean(diag H). When H is too
    ill-conditioned, the damping grows tenfold until the factorization succeeds."""
    mean_diag = float(torch.mean(torch.diag(h)))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(6):
        try:
            lower = torch.linalg.cholesky(h + damp * mean_diag * eye)
            inv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inv, upper=True), damp
        except torch.linalg.LinAlgError:
            damp *= 10
    raise ValueError(f"Hessian is not positive definite even with damping {damp}")


def _mse_params(w, bits, symmetric, scale_dtype, grid=80, max_shrink=0.8, norm=2.4):
    """Per-row scale/zero minimising the rounding error over shrunken ranges."""
    maxq = (1 << bits) - 1
    best_scale, best_zero = group_params(w, bits, symmetric, scale_dtype)
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    for i in range(int(max_shrink * grid) + 1):
        p = 1 - i / grid
        scale, zero = group_params(w * p, bits, symmetric, scale_dtype)
        q = (
            torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq) - zero[:, None]
        ) * scale[:, None]
        err = (q - w).abs().pow(norm).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _params(w, cfg: GPTQConfig, scale_dtype):
    if cfg.mse:
        return _mse_params(w.float(), cfg.bits, cfg.symmetric, scale_dtype)
    return group_params(w, cfg.bits, cfg.symmetric, scale_dtype)


def _static_params(
    w: torch.Tensor, gs: int, cfg: GPTQConfig, scale_dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [out, n_groups] of every group of `w` [out, in] at once: the groups
    become rows (the range search works row by row), so it runs once, not once per group.
    A partial last group goes on its own."""
    out_f, in_f = w.shape
    whole = in_f // gs
    parts = []
    if whole:
        rows = w[:, : whole * gs].reshape(out_f * whole, gs)
        scale, zero = _params(rows, cfg, scale_dtype)
        parts.append((scale.reshape(out_f, whole), zero.reshape(out_f, whole)))
    if whole * gs < in_f:
        scale, zero = _params(w[:, whole * gs :], cfg, scale_dtype)
        parts.append((scale[:, None], zero[:, None]))
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    cfg: GPTQConfig,
    scale_dtype: torch.dtype | None = None,
) -> tuple[QuantizedWeight, float]:
    """Quantize `weight` [out, in] given the input Hessian [in, in].

    Returns the quantized weight and GPTQ's loss estimate sum (w - q)^2 / [H^-1]_ii / 2.
    With act-order, groups stay static: their scales come from the unquantized weight and
    group membership stays contiguous in the original column order (no g_idx needed).
    """
    scale_dtype = scale_dtype or weight.dtype
    out_f, in_f = weight.shape
    gs = in_f if cfg.group_size == -1 else cfg.group_size
    n_groups = (in_f + gs - 1) // gs
    maxq = (1 << cfg.bits) - 1
    w = weight.float().clone()
    h = hessian.float().clone()

    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    scales = torch.empty(out_f, n_groups, device=w.device)
    zeros = torch.empty(out_f, n_groups, device=w.device)
    static = cfg.act_order
    if static:
        scales[:], zeros[:] = _static_params(w, gs, cfg, scale_dtype)
    if cfg.act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(in_f, device=w.device)
    w = w[:, perm]
    h = h[perm][:, perm]
    hinv, _ = inverse_hessian_cholesky(h, cfg.damp)

    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=w.device)
    losses = torch.zeros(out_f, device=w.device)
    group_of = perm // gs  # group (original order) of each permuted column
    for i1 in range(0, in_f, cfg.block_size):
        i2 = min(i1 + cfg.block_size, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(group_of[col])
            if not static and col % gs == 0:
                # Scales of a group come from its columns as updated so far; columns past
                # this block still owe it the block's pending (lazy) update.
                upto = min(col + gs, in_f)
                beyond = w[:, i2:upto] - err1[:, :i] @ hinv[i1 : i1 + i, i2:upto]
                cols = torch.cat([w1[:, i:], beyond], dim=1)[:, : upto - col]
                scales[:, g], zeros[:, g] = _params(cols, cfg, scale_dtype)
            x = w1[:, i]
            d = hinv1[i, i]
            q = torch.clamp(torch.round(x / scales[:, g]) + zeros[:, g], 0, maxq)
            codes[:, perm[col]] = q.to(torch.uint8)
            deq = (q - zeros[:, g]) * scales[:, g]
            losses += (x - deq) ** 2 / d**2 / 2
            e = (x - deq) / d
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        # Lazy batch update: the columns after the block get the whole block's error at once.
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    qw = QuantizedWeight(
        codes=codes,
        scales=scales.to(scale_dtype),
        zeros=zeros.to(torch.uint8),
        bits=cfg.bits,
        group_size=gs,
        symmetric=cfg.symmetric,
    )
    return qw, float(losses.sum())
