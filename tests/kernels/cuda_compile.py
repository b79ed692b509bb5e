"""Compile the Triton kernels for CUDA targets on a machine without a GPU (no launch).

The interpreter runs the kernels' arithmetic but not Triton's compiler: layouts, dot shapes,
constexpr branches and shared-memory needs are only checked by compiling for a real target.
Run by test_cuda_compile.py in a subprocess without TRITON_INTERPRET; prints one line a kernel.
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compile checks need the real compiler"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qfkernels import triton_gemm, triton_gemv  # noqa: E402

MMA = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}


def compile_kernel(
    jit, pointers: dict[str, str], constexprs: dict, config: triton.Config, arch: int
) -> int:
    """Compile for sm_<arch>; returns the shared memory the kernel needs, in bytes."""
    signature = {
        name: "constexpr" if name in constexprs else pointers.get(name, "i32")
        for name in jit.arg_names
    }
    kernel = triton.compile(
        ASTSource(jit, signature, constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    return kernel.metadata.shared


def pointers(act: str) -> dict[str, str]:
    return {
        "x_ptr": f"*{act}",
        "qw_ptr": "*i32",
        "s_ptr": "*fp16",
        "z_ptr": "*u8",
        "g_ptr": "*i32",
        "b_ptr": f"*{act}",
        "out_ptr": f"*{act}",
    }


def main() -> None:
    # (bits, group size, zeros, g_idx): word-splitting path with one group per tile, and the
    # per-code gather path (3-bit) with per-element scales (act-order).
    schemes = [(4, 128, True, False), (3, 32, False, True)]
    cases = []
    for act in ("fp16", "bf16"):
        for bits, gs, zeros, gidx in schemes:
            flags = {
                "BITS": bits,
                "GROUP_SIZE": gs,
                "HAS_ZEROS": zeros,
                "HAS_GIDX": gidx,
                "HAS_BIAS": True,
                "MMA_DTYPE": MMA[act],
            }
            for block_m in (1, 16):
                cfg = triton_gemv.CONFIGS[1]
                cases.append(
                    (
                        "gemv",
                        triton_gemv._gemv_kernel.fn,
                        pointers(act),
                        {**flags, "BLOCK_M": block_m, **cfg.kwargs},
                        cfg,
                        90,
                    )
                )
            cfg = triton_gemm._configs()[2]
            cases.append(
                (
                    "gemm",
                    triton_gemm._gemm_kernel.fn,
                    pointers(act),
                    {**flags, **cfg.kwargs},
                    cfg,
                    90,
                )
            )
    fp32 = {
        "BITS": 8,
        "GROUP_SIZE": 64,
        "HAS_ZEROS": True,
        "HAS_GIDX": False,
        "HAS_BIAS": False,
        "MMA_DTYPE": tl.float32,
    }
    cfg = triton_gemm._configs()[1]
    cases.append(
        ("gemm", triton_gemm._gemm_kernel.fn, pointers("fp32"), {**fp32, **cfg.kwargs}, cfg, 80)
    )
    reduce_ptrs = {"ws_ptr": "*fp32", "b_ptr": "*fp16", "out_ptr": "*fp16"}
    cases.append(
        (
            "splitk_reduce",
            triton_gemv._splitk_reduce_kernel,
            reduce_ptrs,
            {"HAS_BIAS": True, "BLOCK": 1024},
            triton.Config({}, num_warps=4),
            90,
        )
    )
    for name, jit, ptrs, constexprs, cfg, arch in cases:
        shared = compile_kernel(jit, ptrs, constexprs, cfg, arch)
        label = ",".join(f"{k}={v}" for k, v in constexprs.items() if k != "MMA_DTYPE")
        print(f"ok {name} sm_{arch} {ptrs['out_ptr']} {label} shared={shared}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
