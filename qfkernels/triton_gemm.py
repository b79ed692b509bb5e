"""Prefill kernel (larger M): tiled GEMM over packed weights.

Each program computes one [BLOCK_M, BLOCK_N] output tile, walking K in BLOCK_K steps: it
dequantizes the [BLOCK_K, BLOCK_N] weight tile in registers, rounds it to the activation dtype
and feeds the tensor cores (fp32 accumulation). Programs are ordered in groups of GROUP_M row
tiles so that neighbouring programs share weight tiles in L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qfkernels.packed_weight import PackedWeight
from qfkernels.triton_common import (
    check_inputs,
    check_out,
    dequant_tile,
    interpreting,
    kernel_group_size,
    mma_dtype,
)


def _configs() -> list[triton.Config]:
    if interpreting():
        # The interpreter runs each program as numpy: one config, few and large programs.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8})]
    shapes = [
        (32, 64, 128, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 256, 32, 8, 3),
        (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
    ]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s
        )
        for bm, bn, bk, w, s in shapes
    ]


def m_bucket(m: int) -> int:
    """Autotuning key for M: powers of two up to 1024, so prefill lengths share a tuning."""
    return min(triton.next_power_of_2(m), 1024)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"])
@triton.jit
def _gemm_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    g_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    KW,
    G,
    M_BUCKET,
    stride_xm,
    stride_om,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_GIDX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MMA_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_rows
    pid_n = (pid % num_pid_in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=mask_m[:, None] & (offs_k < K)[None, :],
            other=0.0,
        )
        w = dequant_tile(
            qw_ptr,
            s_ptr,
            z_ptr,
            g_ptr,
            offs_k,
            offs_n,
            k0,
            K,
            N,
            KW,
            G,
            BITS,
            GROUP_SIZE,
            HAS_ZEROS,
            HAS_GIDX,
            BLOCK_N,
            BLOCK_K,
        )
        # Round the weight to the activation dtype, as the dequantized model would hold it.
        acc = tl.dot(x.to(MMA_DTYPE), tl.trans(w.to(MMA_DTYPE)), acc, input_precision="ieee")
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gemm(
    x: torch.Tensor,
    w: PackedWeight,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ W.T (+ bias) for x [M, K] (any M); returns `out` ([M, N], x's dtype)."""
    x = check_inputs(x, w, bias)
    m, k = x.shape
    n = w.out_features
    out = check_out(out, x, n)
    if m == 0:
        return out
    dummy = w.qweight  # stands in for absent optional tensors; constexpr flags keep it unread
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),
    )
    _gemm_kernel[grid](
        x,
        w.qweight,
        w.scales,
        dummy if w.zeros is None else w.zeros,
        dummy if w.g_idx is None else w.g_idx,
        dummy if bias is None else bias,
        out,
        m,
        n,
        k,
        w.qweight.shape[1],
        w.n_groups,
        m_bucket(m),
        x.stride(0),
        out.stride(0),
        BITS=w.bits,
        GROUP_SIZE=kernel_group_size(w),
        HAS_ZEROS=w.zeros is not None,
        HAS_GIDX=w.g_idx is not None,
        HAS_BIAS=bias is not None,
        MMA_DTYPE=mma_dtype(x.dtype),
    )
    return out
