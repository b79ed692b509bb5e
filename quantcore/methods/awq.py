"""AWQ's math (pure functions): activation-aware per-input-channel scales and weight clipping
(Lin et al., 2023).

A Linear computes X W^T = (X / s) (W * s)^T for any positive per-input-channel vector s, so
scaling W's columns by s and folding 1/s into whatever produced X leaves the float model
unchanged. Rounding W * s instead of W protects the channels that see large activations
(their weights are scaled up, so their relative rounding error shrinks). The scales are
s = mean|x|^alpha, with alpha chosen on a grid by the output error it gives after rounding.
Clipping then shrinks each group's range where that lowers the group's output error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from quantcore.methods.base import QuantScheme
from quantcore.methods.rtn import group_params, quantize_rtn, round_trip


def accumulate_abs_mean(
    total: torch.Tensor | None, n: int, x: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Fold a batch of inputs `x` [..., in] into a running per-channel sum of |x| (fp32);
    the mean is total / n."""
    x = x.reshape(-1, x.shape[-1]).float()
    batch = x.abs().sum(dim=0)
    return (batch if total is None else total + batch), n + x.shape[0]


def awq_scales(
    x_mean: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None
) -> torch.Tensor:
    """s = mean|x|^alpha per input channel, normalised so that sqrt(max(s) * min(s)) = 1.
    With `w_mean` (weight_means: "duo" scaling, as AutoAWQ and llm-compressor do),
    s = mean|x|^alpha / w_mean^(1 - alpha): channels whose weights are small relative to
    their groups are scaled up even where their inputs are not large.

    Channels that never fire (or whose weights are all zero) are treated as 1e-6 of the
    largest so that s stays positive and finite.
    """
    x_mean = x_mean.float()
    floor = max(float(x_mean.max()) * 1e-6, 1e-12)
    s = x_mean.clamp_min(floor).pow(alpha)
    if w_mean is not None:
        w_mean = w_mean.float().to(s.device)
        w_floor = max(float(w_mean.max()) * 1e-6, 1e-12)
        s = s / w_mean.clamp_min(w_floor).pow(1 - alpha)
    return s / torch.sqrt(s.max() * s.min())


def weight_means(
    weights: Sequence[torch.Tensor], schemes: Sequence[QuantScheme | None]
) -> torch.Tensor:
    """Per input channel, the mean over every quantized row of |w| relative to the largest
    |w| of its quantization group: how large a channel's weights are where rounding sees
    them (the weight half of duo scaling). Weights with scheme None do not count."""
    total, rows = None, 0
    for w, scheme in zip(weights, schemes, strict=True):
        if scheme is None:
            continue
        a = w.float().abs()
        for cols in _group_slices(w.shape[1], scheme.group_size):
            part = a[:, cols]
            part.div_(part.amax(dim=1, keepdim=True).clamp_min(1e-12))
        col = a.sum(dim=0)
        total = col if total is None else total + col
        rows += w.shape[0]
    if total is None:
        raise ValueError("weight_means needs at least one weight with a scheme")
    return total / rows


def fake_quantize(
    w: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Round `w` [out, in] with RTN under `scheme` and dequantize it (fp32): the values of
    quantize_rtn(...).dequantize(), computed for all groups at once when they are whole."""
    return fake_quantize_(w.float().clone(), scheme, scale_dtype or w.dtype)


def fake_quantize_(
    w: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`fake_quantize` in place on a contiguous fp32 `w`, which it returns (the scale search
    rounds a weight some 13 times per group: no temporaries the size of the weight)."""
    out_f, in_f = w.shape
    gs = in_f if scheme.group_size == -1 else scheme.group_size
    if gs <= 0 or in_f % gs:
        qw = quantize_rtn(w, scheme.bits, scheme.group_size, scheme.symmetric, scale_dtype)
        return w.copy_(qw.dequantize(torch.float32))
    rows = w.view(out_f * (in_f // gs), gs)
    _round_trip(rows, scheme.bits, scheme.symmetric, scale_dtype or w.dtype)
    return w


@dataclass(frozen=True)
class ScaleSearch:
    alpha: float
    scales: torch.Tensor  # [in], fp32
    losses: tuple[float, ...]  # one per grid point, in grid order
    alphas: tuple[float, ...]
    duo: bool = False  # the scales divide by the weights' means (awq_scales' w_mean)


DUO_MODES = ("off", "on", "both")


def alpha_grid(n: int) -> tuple[float, ...]:
    """`n` evenly spaced alphas from 0 (plain RTN) to 1."""
    if n < 2:
        raise ValueError(f"an alpha grid needs at least 2 points, got {n}")
    return tuple(i / (n - 1) for i in range(n))


def search_scales(
    x_mean: torch.Tensor,
    weights: Sequence[torch.Tensor],
    schemes: Sequence[QuantScheme | None],
    loss: Callable[[list[torch.Tensor]], float],
    grid: int = 20,
    scale_dtype: torch.dtype | None = None,
    stride: int = 1,
    duo: str = "off",
    reads: torch.Tensor | None = None,
    fit: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> ScaleSearch:
    """Choose alpha for a group of weights [out_i, in] that read one input with per-channel
    mean |x| `x_mean` [in].

    For each alpha, every weight with a scheme becomes Q(W * s) / s (the effective weight seen
    by the unscaled input X once 1/s is folded into X's producer); weights with scheme None
    stay as they are. `loss(effective_weights)` measures the output error of whatever module
    the caller inspects. alpha = 0 (s = 1) is plain RTN; the first minimum wins.

    `stride` > 1 tries every stride-th grid point (and the last), then refines around the
    best with halving steps (strided_argmin): 9 tries instead of 20 at stride 5.
    Points not tried have loss NaN.

    `duo` "on" searches s = mean|x|^alpha / w_mean^(1 - alpha) (awq_scales with
    weight_means) instead, plus alpha 0 of the plain family (plain rounding); "both" searches
    both families and keeps the better (twice the tries). The losses are the chosen family's.

    `reads` (input channel -> the producer channel it reads, where several read one) ties the
    scales: each is the mean over the channels reading one producer channel (tie_scales), so
    that one 1/s per producer channel folds them all.

    `fit(i, w_scaled, s)`, where given, rounds weight i's scaled candidate W * s [out, in]
    (fp32, a buffer it may overwrite) and returns it dequantized, in place of plain RTN: the
    search then judges each alpha by the rounding the weights will really get.
    """
    if duo not in DUO_MODES:
        raise ValueError(f"duo must be one of {', '.join(DUO_MODES)}, got {duo!r}")
    alphas = alpha_grid(grid)
    w_mean = weight_means(weights, schemes) if duo != "off" else None
    # One fp32 buffer per rounded weight, reused by every exponent tried.
    buffers = [
        None if scheme is None else torch.empty(w.shape, device=w.device)
        for w, scheme in zip(weights, schemes, strict=True)
    ]

    def scales_at(alpha: float, wm: torch.Tensor | None) -> torch.Tensor:
        s = awq_scales(x_mean, alpha, wm)
        return s if reads is None else tie_scales(s, reads)

    def evaluate(s: torch.Tensor) -> float:
        s = s.to(weights[0].device)
        candidates = []
        for i, (w, scheme, buf) in enumerate(zip(weights, schemes, buffers, strict=True)):
            if buf is None:
                candidates.append(w.float())
                continue
            torch.mul(w, s, out=buf)
            rounded = (
                fake_quantize_(buf, scheme, scale_dtype or w.dtype)
                if fit is None
                else fit(i, buf, s)
            )
            candidates.append(rounded.div_(s))
        return float(loss(candidates))

    results = []  # (loss, alpha index, family's w_mean, every loss tried)
    families = {"off": [None], "on": [w_mean], "both": [None, w_mean]}[duo]
    for wm in families:
        best, tried = strided_argmin(
            grid, lambda i, wm=wm: evaluate(scales_at(alphas[i], wm)), stride
        )
        results.append((tried[best], best, wm, tried))
    if duo == "on":  # plain rounding (s = 1) is always a candidate
        plain = evaluate(torch.ones_like(x_mean, dtype=torch.float32))
        results.insert(0, (plain, 0, None, {0: plain}))
    _, best, wm, tried = min(results, key=lambda r: r[0])  # the first on ties
    losses = tuple(tried.get(i, float("nan")) for i in range(grid))
    scales = scales_at(alphas[best], wm)
    return ScaleSearch(alphas[best], scales, losses, alphas, wm is not None)


def tie_scales(s: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
    """s [in] with each entry replaced by the mean over the entries whose `reads` (a producer
    channel index per input channel) is the same."""
    reads = reads.to(s.device)
    n = int(reads.max()) + 1
    sums = torch.zeros(n, device=s.device).index_add_(0, reads, s.float())
    counts = torch.zeros(n, device=s.device).index_add_(0, reads, torch.ones_like(s.float()))
    return (sums / counts.clamp_min(1))[reads]


def strided_argmin(
    n: int, value: Callable[[int], float], stride: int = 1
) -> tuple[int, dict[int, float]]:
    """The index in range(n) of the lowest `value` (the first on ties) among those tried, and
    every value tried. Tries every stride-th index and the last, then refines around the best
    so far with steps of half the stride, halved again down to 1 (stride 5: 5 coarse tries,
    then 2 at distance 2, then 2 at distance 1). Index 0 is always tried; stride 1 tries all.
    """
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    tried: dict[int, float] = {}

    def at(i: int) -> float:
        if i not in tried:
            tried[i] = value(i)
        return tried[i]

    def best() -> int:
        return min(tried, key=lambda i: (tried[i], i))

    for i in sorted({*range(0, n, stride), n - 1}):
        at(i)
    step = stride // 2
    while step >= 1:
        centre = best()
        for i in (centre - step, centre + step):
            if 0 <= i < n:
                at(i)
        step //= 2
    return best(), tried


def _group_slices(in_features: int, group_size: int) -> list[slice]:
    gs = in_features if group_size == -1 else group_size
    if gs <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    return [slice(a, min(a + gs, in_features)) for a in range(0, in_features, gs)]


def _round_trip(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype) -> torch.Tensor:
    """RTN of each row of fp32 `w` as one group, dequantized in place (returns `w`)."""
    scale, zero = group_params(w, bits, symmetric, scale_dtype)
    return round_trip(w, scale[:, None], zero[:, None], (1 << bits) - 1, out=w)


def clip_ranges(
    w: torch.Tensor,
    x: torch.Tensor,
    scheme: QuantScheme,
    grid: int = 20,
    max_shrink: float = 0.5,
    scale_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The clipping bound m [out, n_groups] for each output channel and group of `w`
    [out, in], given inputs `x` [tokens, in].

    Candidates are m = max|w_group| * (1 - i / grid) for i < max_shrink * grid (i = 0: no
    clipping). The group is clamped to [-m, m] and rounded, and the candidate minimising the
    group's share of the output error, sum_t (x_t,g . (w_g - Q(clamp(w_g)))^2, wins (the first
    on ties). Groups are chosen independently: cross terms between groups are ignored.
    """
    scale_dtype = scale_dtype or w.dtype
    w = w.float()
    x = x.reshape(-1, x.shape[-1]).float()
    slices = _group_slices(w.shape[1], scheme.group_size)
    bounds = torch.empty(w.shape[0], len(slices), device=w.device)
    steps = max(int(max_shrink * grid), 1)
    for g, cols in enumerate(slices):
        wg, xg = w[:, cols], x[:, cols]
        absmax = wg.abs().amax(dim=1)
        best_err = torch.full_like(absmax, float("inf"))
        best_m = absmax.clone()
        for i in range(steps):
            m = absmax * (1 - i / grid)
            clipped = torch.maximum(torch.minimum(wg, m[:, None]), -m[:, None])
            q = _round_trip(clipped, scheme.bits, scheme.symmetric, scale_dtype)
            err = ((wg - q) @ xg.t()).pow(2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_m = torch.where(better, m, best_m)
        bounds[:, g] = best_m
    return bounds


def clip_weight(w: torch.Tensor, bounds: torch.Tensor, group_size: int) -> torch.Tensor:
    """Clamp each group of `w` [out, in] to [-m, m] with m = `bounds` [out, n_groups]; the
    result, rounded with quantize_rtn, gets its scales from the clipped range."""
    out = w.clone()
    for g, cols in enumerate(_group_slices(w.shape[1], group_size)):
        m = bounds[:, g : g + 1].to(w.dtype)
        out[:, cols] = torch.maximum(torch.minimum(w[:, cols], m), -m)
    return out
