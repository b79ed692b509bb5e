"""The dtype the calibration forwards run in.

A float32 model's calibration passes (the block passes that collect statistics and feed the
next block, AWQ's scale search) can run their matmuls in bfloat16 under autocast, as a model
loaded in bfloat16 would. What the methods compute from those passes stays float32: weights,
Hessians (accumulated in float32 from the inputs the Linears saw), GPTQ's and AWQ's math, and
the check that AWQ's folds leave the float block unchanged. On a CPU with AVX512-BF16 a
bfloat16 matmul is about 4.5x a float32 one (SmolLM2's shapes, 2 cores); on SmolLM2 w4 g64
GPTQ that made the run 0.74x the time, with held-out perplexity within seed noise and KL 1.9%
higher over five seeds. AWQ rounds with statistics of the recorded inputs themselves (its
clipping search, its scale refit), and bfloat16 cost it half a point of perplexity on each of
three seeds: "auto" keeps AWQ in float32 (bench/results/quality-cpu-2core.txt).

The walker sets the dtype for one walk (`forward_dtype`); module runs inside it enter
`module_runs`. Code outside such a block (the methods' math) never sees autocast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

from quantcore.errors import BadRequestError

FORWARD_DTYPES = ("auto", "float32", "bfloat16")

_ACTIVE: ContextVar[torch.dtype | None] = ContextVar("quantcore_forward_dtype", default=None)


def fast_bfloat16(device: str | torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively (not by converting to float32):
    a CUDA GPU of compute capability 8.0 or later, or a CPU with AVX512-BF16 or AMX."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(dev)[0] >= 8
    if dev.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve(
    requested: str, device: str | torch.device, auto_bfloat16: bool = True
) -> torch.dtype | None:
    """The autocast dtype of a float32 model's calibration forwards on `device`, or None for
    float32 itself. "auto" is bfloat16 where the device has fast bfloat16 matmuls and the
    method takes it (`auto_bfloat16`: a method's own attribute of that name)."""
    if requested not in FORWARD_DTYPES:
        raise BadRequestError(
            f"calibration forward_dtype must be one of {', '.join(FORWARD_DTYPES)}, "
            f"got {requested!r}"
        )
    if requested == "float32":
        return None
    if requested == "bfloat16" or (auto_bfloat16 and fast_bfloat16(device)):
        return torch.bfloat16
    return None


@contextlib.contextmanager
def forward_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Module runs inside this block (`module_runs`) autocast to `dtype` (None: no autocast)."""
    token = _ACTIVE.set(dtype)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> torch.dtype | None:
    return _ACTIVE.get()


def module_runs(
    device: str | torch.device, weight_dtype: torch.dtype
) -> contextlib.AbstractContextManager:
    """Autocast for running modules whose weights are `weight_dtype` on `device`, when a
    forward dtype is set and the weights are float32 (a bfloat16 or float16 model already runs
    in its own dtype)."""
    dtype = _ACTIVE.get()
    if dtype is None or weight_dtype != torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
