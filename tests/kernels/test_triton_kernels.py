"""The Triton GEMV and GEMM kernels against the torch reference, over schemes, shapes, dtypes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qfkernels.reference import dequantize, reference_linear
from qfkernels.triton_gemm import gemm
from qfkernels.triton_gemv import gemv
from tests.kernels.factory import TOLERANCE, random_input, random_weight, rel_error

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

# (bits, group_size, symmetric, act_order, activation dtype, scale dtype, K, N, bias).
# Each row is one scheme; every scheme runs at every M. Between them they cover bits 2/3/4/8,
# groups 32/64/128/per-channel, partial last groups (576 with 128, 100 with 32), packed tails
# (3-bit: 576 = 57 words + 6 codes; 4-bit K=100), g_idx, three activation dtypes, three scale
# dtypes, with and without bias, and both the one-group-per-tile and per-element scale paths.
SCHEMES = [
    (4, 128, False, False, F32, F16, 576, 96, True),
    (4, 128, True, False, F16, F16, 576, 32, False),
    (4, 32, False, True, F32, F32, 192, 96, False),
    (4, -1, False, False, F16, F16, 576, 96, True),
    (4, 32, False, False, F16, F16, 100, 32, True),
    (4, 64, False, True, BF16, BF16, 576, 96, True),
    (8, 64, False, False, BF16, BF16, 192, 32, False),
    (8, -1, True, False, F32, F32, 64, 32, True),
    (2, 64, False, False, F32, F16, 192, 96, False),
    (2, 32, True, True, F16, F16, 64, 32, True),
    (3, 128, False, False, F32, F16, 576, 32, True),
    (3, 64, True, True, BF16, F32, 192, 96, False),
]
MS = [1, 3, 16, 33]


def _scheme_id(s: tuple) -> str:
    bits, gs, sym, act, dt, sdt, k, n, bias = s
    group = "pc" if gs == -1 else f"g{gs}"
    return (
        f"w{bits}{group}-{'sym' if sym else 'asym'}{'-act' if act else ''}-"
        f"{str(dt)[6:]}-s{str(sdt)[6:]}-k{k}n{n}{'-bias' if bias else ''}"
    )


def _poisoned(m: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((m, n), float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("scheme", SCHEMES, ids=_scheme_id)
def test_kernels_match_reference(scheme, m, device):
    bits, gs, sym, act, dt, sdt, k, n, with_bias = scheme
    w = random_weight(n, k, bits, gs, sym, act, sdt, seed=m).to(device)
    x = random_input(m, k, dt, seed=m + 1).to(device)
    bias = torch.randn(n).to(dt).to(device) if with_bias else None
    ref = reference_linear(x, w, bias, out_dtype=torch.float32)
    tol = TOLERANCE[dt]

    runs = {"gemm": lambda out: gemm(x, w, bias, out=out)}
    if m <= 16:
        runs["gemv"] = lambda out: gemv(x, w, bias, out=out, split_k=1)

        def gemv_split(out):
            # Three K slices (K=64 has one); the workspace is poisoned too, so a slice that
            # wrote nothing shows up as NaN after the reduction.
            ws = torch.full((3 * m * n,), float("nan"), dtype=torch.float32, device=device)
            return gemv(x, w, bias, out=out, split_k=3, workspace=ws)

        runs["gemv_split3"] = gemv_split
    for name, run in runs.items():
        out = _poisoned(m, n, dt, device)
        y = run(out)
        assert y is out and y.dtype == dt
        assert torch.isfinite(y).all(), f"{name}: unwritten outputs"
        err = rel_error(y, ref)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("n", [32, 96])
@pytest.mark.parametrize("k", [64, 192, 576])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize(
    "scheme", [(128, False, False, F16), (64, True, True, F32)], ids=["g128-asym", "g64-sym-act"]
)
def test_shape_grid(scheme, m, k, n, device):
    # The full M x K x N grid for two 4-bit schemes (K=64 with g128 is a single partial group).
    gs, sym, act, dt = scheme
    w = random_weight(n, k, 4, gs, sym, act, seed=k + n).to(device)
    x = random_input(m, k, dt, seed=m).to(device)
    ref = reference_linear(x, w, out_dtype=F32)
    kernels = [gemm] + ([gemv, lambda x, w, out: gemv(x, w, out=out, split_k=4)] if m <= 16 else [])
    for kernel in kernels:
        y = kernel(x, w, out=_poisoned(m, n, dt, device))
        assert rel_error(y, ref) < TOLERANCE[dt]


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 40),
    k=st.integers(1, 160),
    n=st.integers(1, 48),
    bits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([-1, 16, 32, 48, 64, 128]),
    symmetric=st.booleans(),
    act_order=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_shape_matches_reference(m, k, n, bits, group_size, symmetric, act_order, seed):
    # Odd shapes: K not a multiple of a word or a group, N not a multiple of a tile, groups
    # that do not divide the tile (48) or exceed K.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    w = random_weight(n, k, bits, group_size, symmetric, act_order, F32, seed=seed).to(device)
    x = random_input(m, k, F32, seed=seed + 1).to(device)
    ref = reference_linear(x, w)
    kernel = gemv if m <= 16 else gemm
    y = kernel(x, w, out=_poisoned(m, n, F32, device))
    # Relative to the summed magnitudes |x| @ |W|.T (the dot-product error bound), so that an
    # output that cancels to nearly zero in a tiny random case does not count as an error.
    magnitude = (x.abs() @ dequantize(w).abs().t()).max().clamp_min(1e-12)
    err = ((y - ref).abs().max() / magnitude).item()
    assert err < TOLERANCE[F32]


def test_default_arguments_allocate_output(device):
    w = random_weight(32, 192, 4, 64, False).to(device)
    for m, kernel in ((2, gemv), (20, gemm)):
        x = random_input(m, 192, F16).to(device)
        y = kernel(x, w)
        assert y.shape == (m, 32) and y.dtype == F16
        assert rel_error(y, reference_linear(x, w, out_dtype=F32)) < TOLERANCE[F16]


def test_non_contiguous_rows(device):
    # A row stride larger than K (a slice of a wider buffer) is read correctly.
    w = random_weight(32, 64, 4, 32, False).to(device)
    wide = random_input(20, 128, F32).to(device)
    x = wide[:, 32:96]
    ref = reference_linear(x, w)
    assert rel_error(gemv(x[:5], w), ref[:5]) < TOLERANCE[F32]
    assert rel_error(gemm(x, w), ref) < TOLERANCE[F32]


def test_rejects_bad_input(device):
    w = random_weight(32, 64, 4, 32, False).to(device)
    with pytest.raises(ValueError, match="at most 16 rows"):
        gemv(random_input(17, 64, F32).to(device), w)
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        gemm(random_input(4, 65, F32).to(device), w)
    with pytest.raises(ValueError, match="activation dtype"):
        gemm(random_input(4, 64, F32).double().to(device), w)
    with pytest.raises(ValueError, match="bias must be"):
        gemv(random_input(1, 64, F32).to(device), w, torch.zeros(31, device=device))
    wide = random_weight(32, 576, 4, 64, False).to(device)
    with pytest.raises(ValueError, match="workspace must be fp32"):
        gemv(
            random_input(2, 576, F32).to(device),
            wide,
            split_k=3,
            workspace=torch.empty(3 * 2 * 32 - 1, device=device),
        )
