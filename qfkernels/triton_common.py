"""Pieces shared by the Triton GEMV and GEMM kernels. Importing this module imports triton,
so only the kernel modules import it (and they are imported lazily by QuantLinear)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qfkernels.packed_weight import PackedWeight

# Passed as GROUP_SIZE for a per-channel weight (one group): k // 2**30 == 0 for every column,
# and every power-of-two BLOCK_K divides it, so per-channel takes the one-group-per-tile path.
PER_CHANNEL_GROUP = 1 << 30

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run as numpy on the CPU, very slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def mma_dtype(x_dtype: torch.dtype) -> tl.dtype:
    """The dtype both operands enter the product in (accumulation is always fp32).

    fp32 activations multiply in fp32 (`input_precision="ieee"`, not tf32). Under the
    interpreter bf16 does too: its numpy emulation stores bf16 as raw uint16 and its tl.dot
    multiplies those integers, so bf16 operands would be garbage there.
    """
    if x_dtype == torch.float32 or (x_dtype == torch.bfloat16 and interpreting()):
        return tl.float32
    return tl.float16 if x_dtype == torch.float16 else tl.bfloat16


def kernel_group_size(w: PackedWeight) -> int:
    """GROUP_SIZE for the kernels: the weight's, or PER_CHANNEL_GROUP for a single group."""
    if w.g_idx is None and w.n_groups == 1:
        return PER_CHANNEL_GROUP
    return w.group_size


def check_inputs(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """Validate a 2-D activation against the weight; return it with unit stride along K."""
    if x.dim() != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"x must be [M, {w.in_features}], got {tuple(x.shape)}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"activation dtype {x.dtype} not in {ACTIVATION_DTYPES}")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device}, the weight on {w.device}")
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on a CPU)")
    if bias is not None and tuple(bias.shape) != (w.out_features,):
        raise ValueError(f"bias must be [{w.out_features}], got {tuple(bias.shape)}")
    return x if x.stride(1) == 1 else x.contiguous()


def check_out(out: torch.Tensor | None, x: torch.Tensor, n: int) -> torch.Tensor:
    """The output buffer [M, N] (new unless given; a given one must be row-major)."""
    if out is None:
        return torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    if tuple(out.shape) != (x.shape[0], n) or out.stride(1) != 1:
        raise ValueError(f"out must be a row-major [{x.shape[0]}, {n}] tensor")
    return out


@triton.jit
def dequant_tile(
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
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_GIDX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The fp32 tile W[offs_n, offs_k] = (code - zero) * scale, [BLOCK_N, BLOCK_K].

    offs_k = k0 + arange(BLOCK_K) with k0 a multiple of BLOCK_K. Rows n >= N come out as 0
    (masked scale); columns k >= K may not, so callers load x with zeros there (which is also
    what makes a tile past the end of K add nothing).
    """
    mask_k = offs_k < K
    mask_n = offs_n < N
    mask = mask_n[:, None] & mask_k[None, :]
    if (32 // BITS) * BITS == 32:
        # 2/4/8 bits: load each word once ([BLOCK_N, BLOCK_K / per-word], contiguous along K)
        # and split it into its codes in registers; codes of one word are adjacent columns.
        PER_WORD: tl.constexpr = 32 // BITS
        offs_w = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
        words = tl.load(
            qw_ptr + offs_n[:, None] * KW + offs_w[None, :],
            mask=mask_n[:, None] & (offs_w < KW)[None, :],
            other=0,
        )
        shifts = tl.arange(0, PER_WORD) * BITS
        # int32 >> is arithmetic; the mask drops the sign bits it drags in.
        codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        codes = tl.reshape(codes, (BLOCK_N, BLOCK_K)).to(tl.float32)
    else:
        # 3 bits (10 codes per word, not a power of two): read each code's word and bit offset.
        words = tl.load(
            qw_ptr + offs_n[:, None] * KW + (offs_k // (32 // BITS))[None, :], mask=mask, other=0
        )
        shifts = (offs_k % (32 // BITS)) * BITS
        codes = ((words >> shifts[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
    if HAS_GIDX or GROUP_SIZE % BLOCK_K != 0:
        # A tile may span several groups (act-order, or groups narrower than the tile):
        # gather scale and zero per element.
        if HAS_GIDX:
            g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
        else:
            g = offs_k // GROUP_SIZE
        sg = offs_n[:, None] * G + g[None, :]
        scale = tl.load(s_ptr + sg, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + sg, mask=mask, other=0).to(tl.float32)
            w = (codes - zero) * scale
        else:
            w = (codes - (1 << (BITS - 1))) * scale
    else:
        # BLOCK_K divides GROUP_SIZE and tiles start at multiples of BLOCK_K: one group per
        # tile, so one scale (and zero) per row.
        g = k0 // GROUP_SIZE
        scale = tl.load(s_ptr + offs_n * G + g, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + offs_n * G + g, mask=mask_n, other=0).to(tl.float32)
            w = (codes - zero[:, None]) * scale[:, None]
        else:
            w = (codes - (1 << (BITS - 1))) * scale[:, None]
    return w
