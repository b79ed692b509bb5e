"""GPTQ against the textbook column-by-column algorithm, and its effect on real inputs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from quantcore.methods.gptq import (
    GPTQConfig,
    accumulate_hessian,
    data_damp,
    descend_codes,
    gptq_quantize,
    inverse_hessian_cholesky,
    propagation_target,
    refit_scales,
    upper_triangular_inverse,
)
from quantcore.methods.rtn import group_params, quantize_rtn


def textbook_gptq(w, h, bits, gs, sym, damp):
    """Optimal Brain Quantization one column at a time, in float64, with the explicit
    inverse Hessian updated after each column (no Cholesky, no blocks)."""
    maxq = 2**bits - 1
    w = w.double().clone()
    h = h.double().clone()
    n = w.shape[1]
    h += damp * torch.diag(h).mean() * torch.eye(n, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    codes = torch.empty(w.shape, dtype=torch.long)
    for q in range(n):
        if q % gs == 0:
            scale, zero = group_params(w[:, q : q + gs], bits, sym, torch.float32)
            scale, zero = scale.double(), zero.double()
        code = torch.clamp(torch.round(w[:, q] / scale) + zero, 0, maxq)
        codes[:, q] = code.long()
        err = (w[:, q] - (code - zero) * scale) / hinv[q, q]
        w[:, q + 1 :] -= err[:, None] * hinv[q, q + 1 :][None, :]
        hinv -= torch.outer(hinv[:, q], hinv[q, :]) / hinv[q, q]
    return codes


def _problem(out_f=16, in_f=96, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Correlated inputs with uneven channel scales, as in real activations.
    x = torch.randn(tokens, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g) * 0.3
    x *= torch.rand(in_f, generator=g) * 3 + 0.1
    w = torch.randn(out_f, in_f, generator=g)
    h, _ = accumulate_hessian(torch.zeros(in_f, in_f), 0, x)
    return w, h, x


@pytest.mark.parametrize(
    ("bits", "gs", "sym", "block", "in_f"),
    [
        (4, 32, False, 128, 96),
        (3, 32, True, 16, 96),
        (4, 96, False, 32, 96),
        (2, 48, False, 7, 96),
        # Groups that start inside a run of columns and straddle a block; a partial last group.
        (4, 40, False, 128, 200),
        (4, 64, True, 128, 256),
    ],
)
def test_matches_textbook(bits, gs, sym, block, in_f):
    w, h, _ = _problem(in_f=in_f)
    qw, _ = gptq_quantize(
        w, h, GPTQConfig(bits, gs, sym, block_size=block, damp=0.01), scale_dtype=torch.float32
    )
    ref = textbook_gptq(w, h, bits, gs, sym, 0.01)
    agree = (qw.codes.long() == ref).float().mean()
    assert agree > 0.995, f"only {agree:.3f} of codes agree"


def _output_error(w, deq, x):
    return float(((x @ w.t() - x @ deq.t()) ** 2).sum())


@pytest.mark.parametrize("act_order", [False, True])
def test_beats_rtn_on_its_inputs(act_order):
    w, h, x = _problem(seed=3)
    qw, _ = gptq_quantize(
        w, h, GPTQConfig(4, 32, False, act_order=act_order), scale_dtype=torch.float32
    )
    rtn = quantize_rtn(w, 4, 32, False, scale_dtype=torch.float32)
    assert qw.g_idx is None  # static groups: contiguous in original order
    assert _output_error(w, qw.dequantize(), x) < 0.7 * _output_error(w, rtn.dequantize(), x)


def test_mse_scale_search_lowers_weight_error():
    w, h, _ = _problem(seed=5)
    eye = torch.eye(w.shape[1])  # identity Hessian: GPTQ reduces to plain rounding
    plain, _ = gptq_quantize(w, eye, GPTQConfig(3, 32, False), scale_dtype=torch.float32)
    mse, _ = gptq_quantize(w, eye, GPTQConfig(3, 32, False, mse=True), scale_dtype=torch.float32)
    err = lambda q: float((q.dequantize() - w).pow(2).sum())  # noqa: E731
    assert err(mse) < err(plain)


def test_dead_inputs_are_zeroed():
    w, h, _ = _problem()
    h[5, :] = 0
    h[:, 5] = 0
    qw, _ = gptq_quantize(w, h, GPTQConfig(4, 32, False), scale_dtype=torch.float32)
    assert torch.all(qw.dequantize()[:, 5] == 0)


def test_damping_grows_until_cholesky_succeeds():
    h = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # indefinite until the damping reaches 10
    u, damp = inverse_hessian_cholesky(h, 0.01)
    assert damp == pytest.approx(10.0)
    torch.testing.assert_close(u.t() @ u, torch.linalg.inv(h + 10 * torch.eye(2)))


@pytest.mark.parametrize("n", [5, 256, 257, 700])  # 257 and 700: inverted by halves
def test_upper_triangular_inverse_is_the_inverse(n):
    g = torch.Generator().manual_seed(n)
    r = torch.randn(n, n, generator=g).triu() * 0.1 + torch.eye(n) * (torch.rand(n) + 1)
    inv = upper_triangular_inverse(r)
    assert torch.equal(inv, inv.triu())
    torch.testing.assert_close(inv.double(), torch.linalg.inv(r.double()), rtol=1e-5, atol=1e-5)


def test_inverse_hessian_factor_of_a_wide_hessian():
    w, h, _ = _problem(in_f=600, tokens=2400)
    u, damp = inverse_hessian_cholesky(h, 0.01)
    assert damp == 0.01 and torch.equal(u, u.triu())
    ref = torch.linalg.inv(h.double() + 0.01 * h.diagonal().double().mean() * torch.eye(600))
    torch.testing.assert_close(u.t().double() @ u.double(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("width", [8, 1000])  # 1000: in upper blocks, mirrored
def test_hessian_accumulates_as_one_batch(width):
    x = torch.randn(3, 50, width)
    h, n = torch.zeros(width, width), 0
    for batch in x:
        h, n = accumulate_hessian(h, n, batch)
    flat = x.reshape(-1, width).double()
    assert n == 150
    torch.testing.assert_close(h, h.t(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.double(), 2 / 150 * flat.t() @ flat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mse", [False, True])
@pytest.mark.parametrize(("in_f", "gs"), [(96, 32), (80, 32), (64, -1)])
def test_static_group_params_are_each_groups_own(mse, in_f, gs):
    """Act-order's static scales, computed for all groups at once (groups as rows), are
    exactly what each group's columns alone give, a partial last group included."""
    from quantcore.methods.gptq import _params, _static_params

    w = torch.randn(12, in_f, generator=torch.Generator().manual_seed(3))
    cfg = GPTQConfig(3, gs, False, act_order=True, mse=mse)
    size = in_f if gs == -1 else gs
    scales, zeros = _static_params(w, size, cfg, torch.float16)
    assert scales.shape == zeros.shape == (12, -(-in_f // size))
    for g, start in enumerate(range(0, in_f, size)):
        s, z = _params(w[:, start : start + size], cfg, torch.float16)
        assert torch.equal(scales[:, g], s) and torch.equal(zeros[:, g], z)


@pytest.mark.parametrize("sym", [False, True])
def test_the_range_search_in_chunks_of_rows_is_the_search_on_all(monkeypatch, sym):
    """On a CPU the MSE range search runs over chunks of rows (so that its passes stay in
    cache); each row's choice is its own, so the chunks change nothing."""
    from quantcore.methods import gptq

    w = torch.randn(50, 32, generator=torch.Generator().manual_seed(5))
    whole = gptq._mse_params(w, 3, sym, torch.float16)
    monkeypatch.setattr(gptq, "_MSE_CHUNK", 7 * 32)  # 7 rows a chunk, a short last one
    chunked = gptq._mse_params(w, 3, sym, torch.float16)
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])
    assert chunked[0].shape == (50,)


@pytest.mark.parametrize(("act_order", "mse"), [(True, False), (False, True)])
def test_linears_sharing_a_hessian_are_quantized_as_one_weight(act_order, mse):
    """q/k/v stacked into one GPTQ run give each Linear what its own run gives: rows are
    independent given H. Each part owns its storage (a checkpoint saves only its rows)."""
    from quantcore.methods.gptq_method import quantize_together

    w, h, _ = _problem(out_f=40, in_f=96)
    parts = [w[:24] * 3, w[24:32], w[32:]]
    cfg = GPTQConfig(4, 32, False, block_size=64, act_order=act_order, mse=mse)
    together = quantize_together(parts, h, cfg)
    for part, qw in zip(parts, together, strict=True):
        alone, _ = gptq_quantize(part, h, cfg)
        assert qw.shape == part.shape
        assert (qw.codes == alone.codes).float().mean() > 0.999
        # Dynamic groups take their ranges from updated columns: float-rounding close.
        torch.testing.assert_close(qw.scales, alone.scales, rtol=1e-4, atol=0)
        assert (qw.zeros == alone.zeros).float().mean() > 0.99
        assert qw.codes.untyped_storage().nbytes() == qw.codes.numel()


def _plain_refit(w, h, qw, damp):
    """Each row's least-squares scales written out: q = A s with A's column g holding the
    row's (code - zero) on group g's columns, minimising (w - A s)^T H (w - A s), float64."""
    h = h.double() + damp * torch.diag(h).double().mean() * torch.eye(
        h.shape[0], dtype=torch.double
    )
    out_f, in_f = w.shape
    n_groups = qw.scales.shape[1]
    out = torch.empty(out_f, n_groups, dtype=torch.double)
    for r in range(out_f):
        a = torch.zeros(in_f, n_groups, dtype=torch.double)
        for c in range(in_f):
            g = c // qw.group_size
            a[c, g] = float(qw.codes[r, c]) - float(qw.zeros[r, g])
        out[r] = torch.linalg.solve(a.t() @ h @ a, a.t() @ h @ w[r].double())
    return out


def _h_loss(w, deq, h):
    e = (w - deq).double()
    return ((e @ h.double()) * e).sum(dim=1)


@pytest.mark.parametrize(("gs", "in_f", "sym"), [(32, 96, False), (64, 200, False), (48, 96, True)])
def test_refit_scales_solves_each_rows_least_squares(gs, in_f, sym):
    w, h, _ = _problem(out_f=12, in_f=in_f)
    cfg = GPTQConfig(4, gs, sym, act_order=True, mse=True)
    qw, _ = gptq_quantize(w, h, cfg)
    refit = refit_scales(w, h, qw, cfg.damp)
    assert torch.equal(refit.codes, qw.codes) and torch.equal(refit.zeros, qw.zeros)
    before = _h_loss(w, qw.dequantize(torch.float32), h)
    after = _h_loss(w, refit.dequantize(torch.float32), h)
    assert bool((after <= before + 1e-9 * before.abs()).all())
    assert float(after.sum()) < 0.99 * float(before.sum())  # GPTQ's scales were not optimal
    changed = ~(refit.scales == qw.scales).all(dim=1)
    assert bool(changed.any())
    expected = _plain_refit(w, h, qw, cfg.damp)
    torch.testing.assert_close(
        refit.scales[changed].double(), expected[changed], rtol=1e-3, atol=1e-6
    )


def test_refit_is_part_of_gptq_when_asked():
    w, h, _ = _problem(out_f=12, in_f=96)
    plain, _ = gptq_quantize(w, h, GPTQConfig(4, 32, False))
    refit, _ = gptq_quantize(w, h, GPTQConfig(4, 32, False, refit=True))
    assert torch.equal(refit.codes, plain.codes)
    assert (
        _h_loss(w, refit.dequantize(torch.float32), h).sum()
        < _h_loss(w, plain.dequantize(torch.float32), h).sum()
    )


def test_given_group_params_are_used_as_they_are():
    w, h, _ = _problem(out_f=12, in_f=96)
    first, _ = gptq_quantize(w, h, GPTQConfig(4, 32, False, act_order=True, mse=True))
    scales = first.scales * 1.05  # not what any range rule would give
    again, _ = gptq_quantize(
        w, h, GPTQConfig(4, 32, False, act_order=False), params=(scales, first.zeros)
    )
    assert torch.equal(again.scales, scales) and torch.equal(again.zeros, first.zeros)


@pytest.mark.parametrize("act_order", [False, True])
def test_refit_rounds_alternate_codes_and_scales(act_order):
    """A second round is GPTQ under the first round's re-fitted scales, re-fitted again; each
    row keeps the round with the lower (w - q)^T H (w - q), so no row does worse, and on
    correlated inputs some rows do better."""
    w, h, _ = _problem(out_f=64, in_f=192, tokens=800)
    one = GPTQConfig(4, 64, False, act_order=act_order, mse=True, refit=True)
    first, _ = gptq_quantize(w, h, one)
    two, _ = gptq_quantize(w, h, replace(one, refit_rounds=2))
    by_hand, _ = gptq_quantize(w, h, one, params=(first.scales, first.zeros))
    loss = {
        name: _h_loss(w, q.dequantize(torch.float32), h)
        for name, q in (("first", first), ("two", two), ("by_hand", by_hand))
    }
    kept = loss["by_hand"] < loss["first"]
    assert 0 < int(kept.sum()) < len(kept)  # each round wins some rows here
    for name in ("codes", "scales"):
        expected = torch.where(kept[:, None], getattr(by_hand, name), getattr(first, name))
        assert torch.equal(getattr(two, name), expected)
    assert bool((loss["two"] <= loss["first"] + 1e-6 * loss["first"]).all())
    assert float(loss["two"].sum()) < float(loss["first"].sum())


def test_propagation_target_fits_the_float_models_outputs():
    # X~ = X + noise: the quantized model's inputs. alpha = 1 gives argmin ||W X - V X~||.
    w, _, x = _problem(out_f=8, in_f=48, tokens=600)
    g = torch.Generator().manual_seed(3)
    xq = x + 0.1 * x.std() * torch.randn(x.shape, generator=g)
    h, _ = accumulate_hessian(torch.zeros(48, 48), 0, xq)
    c = 2 / xq.shape[0] * (x - xq).t() @ xq
    v = propagation_target(w, h, c, alpha=1.0, damp=1e-9)
    expected = torch.linalg.lstsq(xq.double(), (x @ w.t()).double()).solution.t()
    torch.testing.assert_close(v.double(), expected, rtol=1e-3, atol=1e-3)
    half = propagation_target(w, h, c, alpha=0.5, damp=1e-9)
    torch.testing.assert_close(half, (w + v) / 2, rtol=1e-4, atol=1e-4)
    assert torch.equal(w, _problem(out_f=8, in_f=48, tokens=600)[0])  # w itself untouched


def _plain_descent(w, h, qw, damp, passes):
    """Coordinate descent written out, float64: for each column in turn and each row, every
    code of the grid is tried on the row's whole loss (w - q)^T H (w - q); the best is kept."""
    h = h.double() + damp * torch.diag(h).double().mean() * torch.eye(
        h.shape[0], dtype=torch.double
    )
    out_f, in_f = w.shape
    group = torch.arange(in_f) // qw.group_size
    s = qw.scales.double()[:, group]
    z = qw.zeros.double()[:, group]
    codes = qw.codes.long().clone()
    grid = torch.arange(2**qw.bits, dtype=torch.double)
    for _ in range(passes):
        for c in range(in_f):
            for r in range(out_f):
                q = (codes[r].double() - z[r]) * s[r]
                tries = q.repeat(len(grid), 1)
                tries[:, c] = (grid - z[r, c]) * s[r, c]
                e = w[r].double() - tries
                codes[r, c] = int(torch.argmin(((e @ h) * e).sum(dim=1)))
    return codes


@pytest.mark.parametrize(("gs", "in_f", "block", "passes"), [(32, 96, 128, 1), (32, 80, 24, 2)])
def test_descent_is_exact_coordinate_descent(gs, in_f, block, passes):
    """Each column's codes are the best of the whole grid for each row's loss with the other
    codes held, as found by trying every code: the blocked updates change nothing."""
    w, h, _ = _problem(out_f=10, in_f=in_f)
    cfg = GPTQConfig(3, gs, False, act_order=True, mse=True)
    qw, _ = gptq_quantize(w, h, cfg)
    down = descend_codes(w, h, qw, cfg.damp, passes, block_size=block)
    assert torch.equal(down.scales, qw.scales) and torch.equal(down.zeros, qw.zeros)
    expected = _plain_descent(w, h, qw, cfg.damp, passes)
    assert bool((down.codes.long() != qw.codes.long()).any())  # it did move codes
    assert torch.equal(down.codes.long(), expected)


def test_descent_never_raises_a_rows_loss_and_lowers_the_total():
    w, h, _ = _problem(out_f=48, in_f=192, tokens=800)
    cfg = GPTQConfig(4, 64, False, act_order=True, mse=True, refit=True)
    qw, _ = gptq_quantize(w, h, cfg)
    hd = h + cfg.damp * torch.diag(h).mean() * torch.eye(192)
    before = _h_loss(w, qw.dequantize(torch.float32), hd)
    one = descend_codes(w, h, qw, cfg.damp, 1)
    two = descend_codes(w, h, qw, cfg.damp, 2)
    after_one = _h_loss(w, one.dequantize(torch.float32), hd)
    after_two = _h_loss(w, two.dequantize(torch.float32), hd)
    assert bool((after_one <= before * (1 + 1e-6)).all())
    assert bool((after_two <= after_one * (1 + 1e-6)).all())
    assert float(after_two.sum()) < 0.995 * float(before.sum())
    # As a GPTQ option: descent then a refit of the scales to the new codes.
    both, _ = gptq_quantize(w, h, replace(cfg, descent_passes=2))
    assert torch.equal(both.scales, refit_scales(w, h, two, cfg.damp).scales)
    assert torch.equal(both.codes, two.codes)


def test_damping_grows_with_width_per_calibration_token():
    assert data_damp(0.01, 0.0, 576, 4096) == 0.01
    assert data_damp(0.01, 0.7, 576, 4096) == pytest.approx(0.7 * 576 / 4096)
    assert data_damp(0.01, 0.7, 1536, 4096) == pytest.approx(3 * data_damp(0.01, 0.7, 512, 4096))
    assert data_damp(0.01, 0.7, 576, 4096 * 1000) == 0.01  # plenty of data: the floor
    with pytest.raises(ValueError, match="at least one token"):
        data_damp(0.01, 0.7, 576, 0)
