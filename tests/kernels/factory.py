"""Random packed weights and the error measure the kernel tests share."""

from __future__ import annotations

import torch

from qfkernels.packed_weight import PackedWeight

# Max error relative to the largest reference output, by activation dtype. fp32 is the math
# itself; fp16/bf16 outputs are rounded once to the dtype (bf16: 8 bits of mantissa, and the
# interpreter truncates rather than rounds), on top of a different summation order.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def random_weight(
    n: int,
    k: int,
    bits: int,
    group_size: int,
    symmetric: bool,
    act_order: bool = False,
    scale_dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> PackedWeight:
    """Random codes, positive scales (never zero) and zero points; `group_size=-1` per-channel.

    act_order: g_idx is a random permutation of the static groups (column // group_size), the
    shape GPTQ's act-order gives.
    """
    gen = torch.Generator().manual_seed(seed)
    gs = k if group_size == -1 else group_size
    n_groups = (k + gs - 1) // gs
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, n_groups, generator=gen) * 0.05 + 0.01).to(scale_dtype)
    zeros = None
    if not symmetric:
        zeros = torch.randint(0, 1 << bits, (n, n_groups), generator=gen, dtype=torch.uint8)
    g_idx = None
    if act_order:
        g_idx = (torch.arange(k) // gs)[torch.randperm(k, generator=gen)].to(torch.int32)
    return PackedWeight.from_codes(codes, scales, zeros, bits, group_size, g_idx)


def random_input(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).to(dtype)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|; NaN (an unwritten, poisoned element) stays NaN.

    (A reference of all zeros, which a tiny random case can give, counts as scale 1e-12.)
    """
    scale = ref.float().abs().max().clamp_min(1e-12)
    return ((out.float() - ref.float()).abs().max() / scale).item()
