"""Decode kernel (M <= 16): split-K GEMV over packed weights, dequantized in registers.

Each program owns BLOCK_N output columns and one slice of K for all M rows. With one slice it
writes the output (and bias) directly; with several, each slice writes its fp32 partial sums to
a workspace [SPLIT_K, M, N] and a second small kernel adds them in a fixed order, adds bias and
rounds to the output dtype. The two-pass reduction is deterministic (atomics are not: the float
sum would depend on arrival order), which keeps verification numbers reproducible run to run,
and it is idempotent, so the autotuner can re-run configs without zeroing anything.
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

MAX_M = 16


def _configs() -> list[triton.Config]:
    if interpreting():
        # The interpreter runs each program as numpy: one config, few and large programs.
        return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4)]
    shapes = [
        (32, 128, 4),
        (64, 128, 4),
        (64, 256, 4),
        (128, 64, 4),
        (128, 128, 4),
        (128, 256, 8),
        (256, 64, 8),
        (32, 256, 4),
    ]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=3)
        for bn, bk, w in shapes
    ]


CONFIGS = _configs()
# Split boundaries are multiples of every config's BLOCK_K, so tiles never straddle a split and
# a tile start is always a multiple of BLOCK_K (which the one-group-per-tile path relies on).
SPLIT_ALIGN = max(c.kwargs["BLOCK_K"] for c in CONFIGS)


@triton.autotune(configs=CONFIGS, key=["N", "K", "k_per_split", "BLOCK_M"])
@triton.jit
def _gemv_kernel(
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
    k_per_split,
    stride_xm,
    stride_om,
    stride_os,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_GIDX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MMA_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    k_start = pid_s * k_per_split
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, k_per_split, BLOCK_K):
        k0 = k_start + i
        offs_k = k0 + tl.arange(0, BLOCK_K)
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
        w = w.to(MMA_DTYPE)
        if BLOCK_M == 1:
            # One row: multiply and reduce over K on the CUDA cores, rather than pad the row to
            # the 16 a tensor-core dot needs.
            x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        else:
            x_mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0
            )
            acc = tl.dot(x.to(MMA_DTYPE), tl.trans(w), acc, input_precision="ieee")
    out_base = out_ptr + pid_s * stride_os
    mask_n = offs_n < N
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if BLOCK_M == 1:
            acc += bias
        else:
            acc += bias[None, :]
    if BLOCK_M == 1:
        tl.store(out_base + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        ptrs = out_base + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_n)


@triton.jit
def _splitk_reduce_kernel(
    ws_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    SPLIT,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0)
    m = offs // N
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=mask)


def default_split_k(n: int, k: int, device: torch.device) -> int:
    """Enough K slices that the grid covers the GPU about twice (1 off CUDA)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    n_tiles = triton.cdiv(n, 64)
    return max(1, min(triton.cdiv(2 * sms, n_tiles), k // (2 * SPLIT_ALIGN)))


def gemv(
    x: torch.Tensor,
    w: PackedWeight,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    split_k: int | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ W.T (+ bias) for x [M <= 16, K]; returns `out` ([M, N], x's dtype).

    `split_k` slices K (None: a heuristic); `workspace` is an optional fp32 buffer of at least
    split * M * N elements for the partial sums (reuse it to avoid an allocation per call).
    """
    x = check_inputs(x, w, bias)
    m, k = x.shape
    n = w.out_features
    if m > MAX_M:
        raise ValueError(f"gemv takes at most {MAX_M} rows, got {m}; use gemm")
    out = check_out(out, x, n)
    if m == 0:
        return out
    split = split_k or default_split_k(n, k, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, split), SPLIT_ALIGN) * SPLIT_ALIGN
    split = triton.cdiv(k, k_per_split)
    if split == 1:
        target, stride_om, stride_os, has_bias = out, out.stride(0), 0, bias is not None
    else:
        need = split * m * n
        if workspace is None:
            workspace = torch.empty(need, dtype=torch.float32, device=x.device)
        if workspace.dtype != torch.float32 or workspace.numel() < need:
            raise ValueError(f"workspace must be fp32 with at least {need} elements")
        target, stride_om, stride_os, has_bias = workspace, n, m * n, False
    # Absent optional tensors: any pointer will do, the constexpr flags keep it unread.
    dummy = w.qweight
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
    _gemv_kernel[grid](
        x,
        w.qweight,
        w.scales,
        dummy if w.zeros is None else w.zeros,
        dummy if w.g_idx is None else w.g_idx,
        dummy if bias is None else bias,
        target,
        m,
        n,
        k,
        w.qweight.shape[1],
        w.n_groups,
        k_per_split,
        x.stride(0),
        stride_om,
        stride_os,
        BITS=w.bits,
        GROUP_SIZE=kernel_group_size(w),
        HAS_ZEROS=w.zeros is not None,
        HAS_GIDX=w.g_idx is not None,
        HAS_BIAS=has_bias,
        MMA_DTYPE=mma_dtype(x.dtype),
        BLOCK_M=1 if m == 1 else 16,
    )
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            workspace,
            dummy if bias is None else bias,
            out,
            m,
            n,
            split,
            out.stride(0),
            HAS_BIAS=bias is not None,
            BLOCK=block,
        )
    return out
