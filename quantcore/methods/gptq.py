"""GPTQ's math (pure functions): quantize a weight column by column, spreading each column's
rounding error over the columns not yet quantized through the inverse Hessian of the layer
input (Frantar et al., 2022), with lazy block updates."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from quantcore.methods.rtn import group_params, range_params, round_trip
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
    refit: bool = False  # re-fit each row's group scales to its codes by least squares on H
    # With refit: rounds of (GPTQ's codes under the scales, the scales re-fitted to the codes)
    refit_rounds: int = 1
    # Passes of coordinate descent on the codes after GPTQ (descend_codes), each followed by
    # a refit when `refit` is on
    descent_passes: int = 0


_SYRK_BLOCK = 384  # inputs at least twice this wide get H's upper blocks only


def accumulate_hessian(h: torch.Tensor, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold a batch of inputs `x` [..., in] into the running mean H = 2/n sum x x^T (fp32)."""
    x = x.reshape(-1, x.shape[-1]).float()
    b = x.shape[0]
    beta, alpha = n / (n + b), 2 / (n + b)
    width = x.shape[1]
    if width < 2 * _SYRK_BLOCK:
        # One fused update: no scaled copy of x, no [in, in] temporary.
        h.addmm_(x.t(), x, beta=beta, alpha=alpha)
        return h, n + b
    # H is symmetric: the blocks on and above the diagonal, then mirrored (a down_proj's
    # 1536 wide in blocks of 384: 10 of 16 blocks' work, about 0.6x the time here).
    edges = [width * i // (width // _SYRK_BLOCK) for i in range(width // _SYRK_BLOCK + 1)]
    spans = [slice(a, e) for a, e in zip(edges, edges[1:], strict=False)]
    for i, rows in enumerate(spans):
        for cols in spans[i:]:
            h[rows, cols].addmm_(x[:, rows].t(), x[:, cols], beta=beta, alpha=alpha)
    for i, rows in enumerate(spans):
        for cols in spans[i + 1 :]:
            h[cols, rows] = h[rows, cols].t()
    return h, n + b


def data_damp(floor: float, per_feature: float, in_features: int, tokens: int) -> float:
    """GPTQ's damping (a fraction of the mean Hessian diagonal) for a Hessian estimated from
    `tokens` inputs of width `in_features`: at least `floor`, and `per_feature * in / tokens`.
    An estimate from few tokens per dimension has its small eigenvalues too small (the sample
    spectrum spreads with in / tokens), and GPTQ then fits the calibration text's own
    directions; the damping pulls those back toward plain rounding, more where data is thin."""
    if tokens <= 0:
        raise ValueError(f"a Hessian needs at least one token, got {tokens}")
    return max(floor, per_feature * in_features / tokens)


def _revive_dead_inputs_(h: torch.Tensor) -> torch.Tensor | None:
    """Inputs that never fire (zero on H's diagonal) get 1 there, in place, so H can be
    factorized; returns their mask, or None when there are none (a masked write scans the
    whole tensor: skipped when nothing needs it)."""
    dead = torch.diag(h) == 0
    if not bool(dead.any()):
        return None
    h.diagonal()[dead] = 1
    return dead


def damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """An fp32 copy of H as GPTQ conditions it: inputs that never fire (zero diagonal) get 1
    there, then damp * mean(diag) is added to the diagonal."""
    h = hessian.float().clone()
    _revive_dead_inputs_(h)
    h.diagonal().add_(damp * float(torch.mean(torch.diag(h))))
    return h


def divide_by_scales_(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """M / (s s^T) in place: a second moment of inputs X (H, C) once they become X / s."""
    s = s.to(m.device, torch.float32)
    return m.div_(s[:, None]).div_(s[None, :])


def accumulate_cross(c: torch.Tensor, n: int, dx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Fold a batch into the running mean C = 2/n sum dx x^T, normalised as
    `accumulate_hessian`'s H (call it with H's count before that batch)."""
    dx = dx.reshape(-1, dx.shape[-1]).float()
    x = x.reshape(-1, x.shape[-1]).float()
    b = x.shape[0]
    return c.addmm_(dx.t(), x, beta=n / (n + b), alpha=2 / (n + b))


def propagation_target(
    weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, alpha: float, damp: float
) -> torch.Tensor:
    """The weight GPTQ should approach when its inputs X~ (what the quantized model feeds the
    Linear) differ from the float model's X: argmin_V ||W X - V X~||^2 = W + W C H^-1, with
    H = X~ X~^T and C = (X - X~) X~^T (Li et al. 2025, GPTAQ; Arai and Ichikawa 2025, QEP).
    `alpha` in [0, 1] takes part of that step: the full one fits the calibration tokens'
    errors, and what generalises is the systematic part. H is damped as GPTQ damps it."""
    h = damped(hessian, damp)
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info):
        return weight  # no correction rather than a wrong one; GPTQ damps harder itself
    del h
    w = weight.float()
    step = torch.cholesky_solve((w @ cross).t(), lower).t()  # W C H^-1 (H symmetric)
    return step.mul_(alpha).add_(w)


def inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + d I)^-1 = U^T U, with d = damp * mean(diag H). When H is
    too ill-conditioned, the damping grows tenfold until the factorization succeeds.

    With J the order-reversing permutation, J H J = M M^T (M lower) gives H = R R^T with
    R = J M J upper, so H^-1 = R^-T R^-1 and U = R^-1: one factorization and one triangular
    inverse, instead of factorizing, inverting and factorizing again."""
    mean_diag = float(torch.mean(torch.diag(h)))
    for _ in range(6):
        damped = h.flip(0, 1)  # a copy; its diagonal is H's, reversed
        damped.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            upper = lower.flip(0, 1)
            del lower
            return upper_triangular_inverse(upper), damp
        damp *= 10
    raise ValueError(f"Hessian is not positive definite even with damping {damp}")


_TRI_BLOCK = 256  # below this, one triangular solve; above, halves joined by matmuls


def upper_triangular_inverse(r: torch.Tensor) -> torch.Tensor:
    """R^-1 of an upper triangular R, by halves: [A B; 0 D]^-1 = [A^-1, -A^-1 B D^-1; 0, D^-1].
    A triangular solve against the identity does n^3 work (it does not know the right-hand
    side is triangular); this does about n^3/3, mostly in matmuls: 1536 wide (a down_proj's
    Hessian), 12.7 ms against 26.8 ms on 2 CPU cores; 576 wide, 1.1 ms against 2.1 ms."""
    n = r.shape[0]
    if n <= _TRI_BLOCK:
        eye = torch.eye(n, dtype=r.dtype, device=r.device)
        return torch.linalg.solve_triangular(r, eye, upper=True)
    k = n // 2
    a_inv = upper_triangular_inverse(r[:k, :k])
    d_inv = upper_triangular_inverse(r[k:, k:])
    out = torch.zeros_like(r)
    out[:k, :k] = a_inv
    out[k:, k:] = d_inv
    out[:k, k:] = (a_inv @ r[:k, k:]).neg_() @ d_inv
    return out


_MSE_STRIDE = 4  # the coarse step of the range search (bench/mse_search.py)
# Rows searched at once on a CPU: a chunk's ~15 error passes (a dozen elementwise steps each)
# then stay in cache. 512k values: 3072 x 576 weights in groups of 64, 34 ms against 97 ms.
_MSE_CHUNK = 1 << 19


def _mse_params(w, bits, symmetric, scale_dtype, grid=80, max_shrink=0.4):
    """Per-row scale/zero minimising the rounding error (|error|^2.5) over ranges shrunk by
    1 - i/grid, i = 0 .. max_shrink * grid: every 4th shrink first, then the 3 on either side
    of each row's best. On SmolLM2's weights (bench/mse_search.py) that finds the exhaustive
    choice for about 98-99% of groups and costs 15 error passes instead of 33. No group there
    is best shrunk past 1 - 22/80 (w3 g64; w4: 12/80), so the range stops at 0.6 of the
    full one (llm-compressor's MSE observer stops at 0.8)."""
    rows = max(1, _MSE_CHUNK // max(w.shape[1], 1))
    if w.device.type == "cpu" and w.shape[0] > rows:
        parts = [
            _mse_params(w[a : a + rows], bits, symmetric, scale_dtype, grid, max_shrink)
            for a in range(0, w.shape[0], rows)
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    n = int(max_shrink * grid) + 1
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    best_i = torch.zeros(w.shape[0], dtype=torch.long, device=w.device)
    best_scale, best_zero = range_params(lo, hi, bits, symmetric, scale_dtype)

    def attempt(i: torch.Tensor) -> None:
        # Shrinking the range by p scales its ends by p exactly: no pass over `w` for them.
        p = 1 - i.float() / grid
        scale, zero = range_params(lo * p, hi * p, bits, symmetric, scale_dtype)
        err = _rounding_error(w, scale, zero, (1 << bits) - 1)
        better = err < best_err
        best_err.copy_(torch.where(better, err, best_err))
        best_i.copy_(torch.where(better, i, best_i))
        best_scale.copy_(torch.where(better, scale, best_scale))
        best_zero.copy_(torch.where(better, zero, best_zero))

    rows = torch.zeros_like(best_i)
    for i in range(0, n, _MSE_STRIDE):
        attempt(rows + i)
    coarse = best_i.clone()
    for k in range(-_MSE_STRIDE + 1, _MSE_STRIDE):
        if k:
            attempt((coarse + k).clamp(0, n - 1))
    return best_scale, best_zero


def _rounding_error(w, scale, zero, maxq: int) -> torch.Tensor:
    """sum |dequantize(quantize(w)) - w|^2.5 per row, with two temporaries.

    GPTQ's reference search uses the power 2.4; |e|^2.5 = e^2 sqrt|e| needs no pow, which
    cost three quarters of the search. On SmolLM2's groups (w3/w4 g64) it picks the same
    shrink for 85-90% of them, and its choices' |e|^2.4 error is on average 0.04-0.08%
    above the 2.4 choices' (bench/results/mse-search-cpu.txt)."""
    e = round_trip(w, scale[:, None], zero[:, None], maxq).sub_(w).abs_()
    root = e.sqrt()
    return e.square_().mul_(root).sum(dim=1)


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


_RUN = 32  # columns whose errors are applied one by one before a matmul catches up the rest


def _group_start_params(wt, hinv, err1, neg_inv_d, i1, i2, col, gs, cfg: GPTQConfig, scale_dtype):
    """Scale and zero of the group starting at permuted column `col` (dynamic groups), from
    its columns as updated so far. Columns inside the block are current (a group starts a run);
    those past the block still owe it the block's pending (lazy) update. `err1` holds the
    block's raw errors (dequantized - x), `neg_inv_d` -1 / [H^-1]_ii for its columns."""
    upto = min(col + gs, wt.shape[0])
    cols = wt[col : min(upto, i2)]
    if upto > i2:
        done = col - i1
        err = err1[:done] * neg_inv_d[:done, None]
        beyond = wt[i2:upto] - hinv[i1:col, i2:upto].t() @ err
        cols = torch.cat([cols, beyond])
    return _params(cols.t(), cfg, scale_dtype)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    cfg: GPTQConfig,
    scale_dtype: torch.dtype | None = None,
    params: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[QuantizedWeight, float]:
    """Quantize `weight` [out, in] given the input Hessian [in, in].

    Returns the quantized weight and GPTQ's loss estimate sum (w - q)^2 / [H^-1]_ii / 2.
    With act-order, groups stay static: their scales come from the unquantized weight and
    group membership stays contiguous in the original column order (no g_idx needed).
    `params` (scales, zero points [out, n_groups]) fixes every group's parameters (static).
    """
    scale_dtype = scale_dtype or weight.dtype
    out_f, in_f = weight.shape
    gs = in_f if cfg.group_size == -1 else cfg.group_size
    n_groups = (in_f + gs - 1) // gs
    w = weight.float().clone()
    h = hessian.float().clone()

    dead = _revive_dead_inputs_(h)
    if dead is not None:
        w[:, dead] = 0

    scales = torch.empty(out_f, n_groups, device=w.device)
    zeros = torch.empty(out_f, n_groups, device=w.device)
    static = cfg.act_order or params is not None
    if params is not None:
        scales[:], zeros[:] = params[0].float(), params[1].float()
    elif static:
        scales[:], zeros[:] = _static_params(w, gs, cfg, scale_dtype)
    if cfg.act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(in_f, device=w.device)
    h = h.index_select(0, perm).index_select(1, perm)
    hinv, _ = inverse_hessian_cholesky(h, cfg.damp)
    del h
    # Columns as rows: each step reads and updates contiguous memory. Transposed first, then
    # whole rows gathered (2.5 ms for 3072 x 576, against 5.9 gathering columns first).
    wt = w.t().contiguous()[perm]
    del w

    # Later refit rounds start again from the weight as it is here (a pass updates it).
    start = wt.clone() if cfg.refit and cfg.refit_rounds > 1 else None
    codes, losses = _column_pass(wt, hinv, perm, scales, zeros, static, gs, cfg, scale_dtype)
    qw = QuantizedWeight(
        codes=codes,
        scales=scales.to(scale_dtype),
        zeros=zeros.to(torch.uint8),
        bits=cfg.bits,
        group_size=gs,
        symmetric=cfg.symmetric,
    )
    loss = float(losses.sum())
    if cfg.refit:
        qw = refit_scales(weight, hessian, qw, cfg.damp)
        fitted = qw
        errors = row_errors(weight, hessian, qw) if start is not None else None
        for _ in range(cfg.refit_rounds - 1):
            # GPTQ again (same order, same H^-1) under the last round's re-fitted scales, whose
            # codes may then fit them better. It is greedy, so not always: each row keeps the
            # round with its lowest output error (rows are independent given H; the zero
            # points are the same in every round).
            scales[:], zeros[:] = fitted.scales.float(), fitted.zeros.float()
            codes, _ = _column_pass(
                start.clone(), hinv, perm, scales, zeros, True, gs, cfg, scale_dtype
            )
            fitted = refit_scales(weight, hessian, replace(fitted, codes=codes), cfg.damp)
            new_errors = row_errors(weight, hessian, fitted)
            better = new_errors < errors
            qw = replace(
                qw,
                codes=torch.where(better[:, None], fitted.codes, qw.codes),
                scales=torch.where(better[:, None], fitted.scales, qw.scales),
            )
            errors = torch.where(better, new_errors, errors)
    if cfg.descent_passes:
        qw = descend_codes(weight, hessian, qw, cfg.damp, cfg.descent_passes)
        if cfg.refit:
            qw = refit_scales(weight, hessian, qw, cfg.damp)
    return qw, loss


def _column_pass(
    wt: torch.Tensor,
    hinv: torch.Tensor,
    perm: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    static: bool,
    gs: int,
    cfg: GPTQConfig,
    scale_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's pass over the columns of `wt` [in, out] (permuted columns as rows, updated in
    place) with the upper Cholesky factor `hinv` of the permuted H^-1: the codes [out, in] in
    the original column order, and each row's loss. Static groups read `scales`/`zeros`
    [out, n_groups]; dynamic ones write them as each group starts."""
    in_f, out_f = wt.shape
    maxq = (1 << cfg.bits) - 1
    # Codes in the pass's order, columns as rows (each block writes whole rows); put back in
    # the original column order at the end, in one gather.
    codes_t = torch.empty(in_f, out_f, dtype=torch.uint8, device=wt.device)
    losses = torch.zeros(out_f, device=wt.device)
    if static:  # groups as rows: a block's columns gather whole rows
        group_of = perm // gs  # group (original order) of each permuted column
        scales_t, zeros_t = scales.t().contiguous(), zeros.t().contiguous()
        nzs_t = -zeros_t * scales_t
    for i1 in range(0, in_f, cfg.block_size):
        i2 = min(i1 + cfg.block_size, in_f)
        nb = i2 - i1
        w1 = wt[i1:i2]  # a view: updated in place
        hinv1 = hinv[i1:i2, i1:i2]
        neg_inv_d = -1 / hinv1.diagonal()
        # Inside the block a column's raw error e = dequantized - x is spread with the rows of
        # H^-1 divided by their diagonal: w += (h_i / d_i) e, the textbook w -= h_i (x - q) / d_i
        # with no division (nor Python scalar) per column. The block's errors become
        # (x - q) / d in one step at its end, for the lazy update and the loss.
        hd1 = hinv1 / hinv1.diagonal()[:, None]
        err1 = torch.empty(nb, out_f, device=wt.device)
        q1 = torch.empty(nb, out_f, device=wt.device)
        # Views of each row, made once: indexing a row per column costs as much as the math.
        xs, qs, es, hds = w1.unbind(0), q1.unbind(0), err1.unbind(0), hd1.unbind(0)
        if static:
            cols = group_of[i1:i2]
            ss = scales_t.index_select(0, cols).unbind(0)
            zs = zeros_t.index_select(0, cols).unbind(0)
            nzss = nzs_t.index_select(0, cols).unbind(0)
        j1 = 0
        while j1 < nb:
            # Two levels of lazy updates: a column's error reaches the next few columns at
            # once (rank 1), the rest of the block after each short run (one matmul).
            je = min(j1 + _RUN, nb)
            if not static:
                col = i1 + j1
                je = min(je, (col // gs + 1) * gs - i1)  # a group starts a run
                if col % gs == 0:
                    s, z = _group_start_params(
                        wt, hinv, err1, neg_inv_d, i1, i2, col, gs, cfg, scale_dtype
                    )
                    scales[:, col // gs], zeros[:, col // gs] = s, z
                    nzs = -z * s
            for i in range(j1, je):
                if static:
                    s, z, nzs = ss[i], zs[i], nzss[i]
                x, q, e = xs[i], qs[i], es[i]
                torch.div(x, s, out=q).round_().add_(z).clamp_(0, maxq)
                torch.addcmul(nzs, q, s, out=e).sub_(x)  # (q - z) s - x
                if i + 1 < je:
                    w1[i + 1 : je].addr_(hds[i][i + 1 : je], e)
            if je < nb:
                w1[je:].addmm_(hd1[j1:je, je:].t(), err1[j1:je])
            j1 = je
        err1.mul_(neg_inv_d[:, None])
        # Lazy batch update: the columns after the block get the whole block's error at once.
        if i2 < in_f:
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1)
        codes_t[i1:i2] = q1
        losses += err1.pow(2).sum(dim=0) / 2
    return codes_t[torch.argsort(perm)].t().contiguous(), losses


def row_errors(weight: torch.Tensor, hessian: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """(w - q)^T H (w - q) for each row: the output error of the row's quantization on the
    inputs H was accumulated from."""
    d = qw.dequantize(torch.float32).sub_(weight.float())
    return (d @ hessian.float()).mul_(d).sum(dim=1)


def _group_sum(x: torch.Tensor, gs: int, n_groups: int) -> torch.Tensor:
    """Sums of the contiguous groups of `gs` columns of x [rows, in] (the last may be
    partial): [rows, n_groups]."""
    pad = n_groups * gs - x.shape[1]
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(x.shape[0], n_groups, gs).sum(dim=2)


@torch.no_grad()
def refit_scales(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    qw: QuantizedWeight,
    damp: float,
    weight_h: torch.Tensor | None = None,
) -> QuantizedWeight:
    """The group scales that, with `qw`'s codes and zero points kept, minimise GPTQ's own
    objective (w - q)^T H (w - q) for each row: q is linear in the row's scales, so they solve
    a small least-squares system [n_groups, n_groups] per row. GPTQ chose its codes with
    scales fitted to the weights alone (min/max or the MSE search); this makes them fit the
    inputs too. A row keeps its scales unless the new ones are all positive and lower its
    loss once rounded to the scale dtype. `weight_h`, where the caller has it, is
    weight @ hessian (AWQ's scale search refits one weight under many scales and derives
    it from one product)."""
    out_f, in_f = qw.codes.shape
    gs, n_groups = qw.group_size, qw.scales.shape[1]
    if qw.g_idx is not None:
        raise ValueError("refit_scales needs contiguous groups (no g_idx)")
    w = weight.float()
    h = damped(hessian, damp)
    group = torch.arange(in_f, device=w.device) // gs
    d = qw.codes.float().sub_(qw.zeros.float()[:, group])  # q = d * scale (per group)
    if weight_h is None:
        wh = w @ h
    else:  # damping changed only the diagonal
        wh = weight_h.float().addcmul(w, h.diagonal() - hessian.diagonal().float())
    rhs = _group_sum(d * wh, gs, n_groups)  # [out, G]
    del wh
    gram = torch.empty(out_f, n_groups, n_groups, device=w.device)
    for g in range(n_groups):
        # Each row's Gram matrix is symmetric: the blocks from group g on, mirrored (half
        # the matmul work of the full rows).
        start, end = g * gs, min((g + 1) * gs, in_f)
        part = (d[:, start:end] @ h[start:end, start:]).mul_(d[:, start:])
        gram[:, g, g:] = _group_sum(part, gs, n_groups - g)
        gram[:, g + 1 :, g] = gram[:, g, g + 1 :]
    del d
    ridge = 1e-6 * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)
    gram.diagonal(dim1=1, dim2=2).add_(ridge[:, None])
    new = torch.linalg.solve(gram, rhs).to(qw.scales.dtype)

    def loss(s: torch.Tensor) -> torch.Tensor:  # up to the row's constant w^T H w
        s = s.float()
        return torch.einsum("og,ogk,ok->o", s, gram, s) - 2 * (s * rhs).sum(dim=1)

    better = (new > 0).all(dim=1) & (loss(new) < loss(qw.scales))
    scales = torch.where(better[:, None], new, qw.scales)
    return replace(qw, scales=scales)


@torch.no_grad()
def descend_codes(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    qw: QuantizedWeight,
    damp: float,
    passes: int = 1,
    block_size: int = 128,
) -> QuantizedWeight:
    """Cyclic coordinate descent on the codes of `qw`, its scales and zero points kept: each
    column in turn moves every row's code to the grid point nearest the minimum of the row's
    loss (w - q)^T H (w - q) (H damped as GPTQ damps it) with the other codes held (Behdin
    et al. 2023, QuantEase). The loss is a convex parabola in one code, so the nearest grid
    point to its vertex is the best one and no step raises the loss. GPTQ's pass only looks
    forward (a column's rounding error moves to the columns not yet rounded); this lets a
    column answer the ones rounded after it.

    In blocks of columns, as GPTQ's lazy updates: G = (W - Q) H for a block's columns is one
    matmul at the block's start; inside the block a column's change reaches the next few
    columns at once (rank 1) and the rest of the block after each short run (one matmul)."""
    if qw.g_idx is not None:
        raise ValueError("descend_codes needs contiguous groups (no g_idx)")
    out_f, in_f = qw.codes.shape
    maxq = (1 << qw.bits) - 1
    h = damped(hessian, damp)
    group = qw.group_index()
    # Columns as rows (contiguous per column), as in the column pass.
    st = qw.scales.float()[:, group].t().contiguous()  # [in, out]
    ct = qw.codes.t().float()  # [in, out], a copy
    dt = weight.float().t() - (ct - qw.zeros.float()[:, group].t()) * st  # W - Q
    # The step to a column's vertex in code units: G / (H_jj s).
    step = st.reciprocal().mul_(h.diagonal()[:, None].reciprocal())
    cs, ss, steps = ct.unbind(0), st.unbind(0), step.unbind(0)
    for _ in range(passes):
        for i1 in range(0, in_f, block_size):
            i2 = min(i1 + block_size, in_f)
            nb = i2 - i1
            g = h[i1:i2] @ dt  # [nb, out]: rows of (W - Q) H for the block's columns
            hb = h[i1:i2, i1:i2]
            new = torch.empty(nb, out_f, device=dt.device)  # the block's new codes
            delta = torch.empty(nb, out_f, device=dt.device)  # and the changes of q
            gs, news, deltas, hbs = g.unbind(0), new.unbind(0), delta.unbind(0), hb.unbind(1)
            for j1 in range(0, nb, _RUN):
                je = min(j1 + _RUN, nb)
                for j in range(j1, je):
                    col = i1 + j
                    c = torch.addcmul(cs[col], gs[j], steps[col], out=news[j])
                    c.round_().clamp_(0, maxq)
                    torch.sub(c, cs[col], out=deltas[j]).mul_(ss[col])
                    if j + 1 < je:
                        g[j + 1 : je].addr_(hbs[j][j + 1 : je], deltas[j], alpha=-1)
                if je < nb:
                    g[je:].addmm_(hb[je:, j1:je], delta[j1:je], alpha=-1)
            ct[i1:i2] = new
            dt[i1:i2] -= delta
    codes = ct.t().to(torch.uint8)
    return replace(qw, codes=codes)
