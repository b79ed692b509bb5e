"""Kernel speed: the packed-weight kernels against a dense fp16 matmul, on Llama linear shapes.

    python bench/kernel_speed.py [--bits 4] [--group-size 128] [--symmetric] [--reps 50]

On a GPU: median time (CUDA events, after warm-up and autotuning) of QuantLinear's Triton path
and of fp16 torch.matmul for the Llama-7B and 70B linear shapes at M = 1, 4, 16, 64, with the
bytes each moves per call as achieved GB/s and as a percentage of the device-to-device copy
bandwidth measured in the same run. Weights rotate through enough copies to exceed the L2
cache, so each call reads its weight from HBM as in a real forward pass.

Without a GPU it says so and times the CPU torch reference (unpack, dequantize, matmul) on a
few smaller shapes instead; that mode takes well under a minute.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Run as a script, this folder is first on sys.path; put the repository root there instead,
# so that `qfkernels` imports without an install.
if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
    sys.path[0] = str(HERE.parent)

import torch  # noqa: E402

from qfkernels.packed_weight import PackedWeight  # noqa: E402
from qfkernels.quant_linear import quant_matmul  # noqa: E402
from qfkernels.reference import reference_linear  # noqa: E402

# (name, in_features K, out_features N)
GPU_SHAPES = [
    ("7B qkv/o", 4096, 4096),
    ("7B gate/up", 4096, 11008),
    ("7B down", 11008, 4096),
    ("70B q/o", 8192, 8192),
    ("70B gate/up", 8192, 28672),
    ("70B down", 28672, 8192),
]
GPU_MS = [1, 4, 16, 64]
CPU_SHAPES = [("1k x 1k", 1024, 1024), ("1k x 2.8k", 1024, 2816), ("2.8k x 1k", 2816, 1024)]
CPU_MS = [1, 16, 64]
# Rotate weight copies until they exceed this, so that no call finds its weight in L2.
ROTATE_BYTES = 256 * 1024**2


def random_packed(
    n: int, k: int, bits: int, group_size: int, symmetric: bool, device: torch.device
) -> PackedWeight:
    """Random packed weight made on the device (any int32 word is a valid set of codes)."""
    pf = 32 // bits
    words = (k + pf - 1) // pf
    gs = k if group_size == -1 else group_size
    groups = (k + gs - 1) // gs
    qweight = torch.randint(-(2**31), 2**31 - 1, (n, words), dtype=torch.int32, device=device)
    if 32 % bits:  # 3-bit: keep the two unused top bits clear, as the packer does
        qweight &= (1 << (pf * bits)) - 1
    scales = (torch.rand(n, groups, device=device) * 0.01 + 0.001).half()
    zeros = (
        None
        if symmetric
        else torch.randint(0, 1 << bits, (n, groups), dtype=torch.uint8, device=device)
    )
    return PackedWeight(qweight, scales, zeros, None, bits, gs, k)


def cuda_median_us(fn: Callable[[int], object], reps: int, warmup: int = 10) -> float:
    """Median of per-call CUDA-event times in µs; fn(i) runs call i."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    for i, (start, end) in enumerate(events):
        start.record()
        fn(i)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


def cpu_median_us(fn: Callable[[int], object], reps: int, warmup: int = 2) -> float:
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(reps):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def copy_bandwidth(device: torch.device, reps: int) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    nbytes = 1024**3 if device.type == "cuda" else 256 * 1024**2
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = cuda_median_us if device.type == "cuda" else cpu_median_us
    us = timer(lambda i: dst.copy_(src), max(5, reps // 5))
    return 2 * nbytes / us / 1e3


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def gpu_rows(
    args: argparse.Namespace, name: str, k: int, n: int, copy_bw: float
) -> list[list[str]]:
    """One shape at every M: ours (Triton, through quant_matmul's dispatch) and fp16 matmul."""
    device = torch.device("cuda")
    scheme = (args.bits, args.group_size, args.symmetric, device)
    probe = random_packed(n, k, *scheme)
    packed = [probe] + [
        random_packed(n, k, *scheme) for _ in range(-(-ROTATE_BYTES // probe.nbytes()))
    ]
    dense = [
        torch.randn(n, k, device=device, dtype=torch.float16) * 0.02
        for _ in range(1 + -(-ROTATE_BYTES // (n * k * 2)))
    ]
    rows = []
    for m in GPU_MS:
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        ours = cuda_median_us(
            lambda i, x=x: quant_matmul(x, packed[i % len(packed)], backend="triton"), args.reps
        )
        ref = cuda_median_us(lambda i, x=x: torch.matmul(x, dense[i % len(dense)].t()), args.reps)
        moved = probe.nbytes() + 2 * m * (k + n)  # packed weight + fp16 x and y
        gbs = moved / ours / 1e3
        rows.append(
            [
                name,
                f"{k}x{n}",
                str(m),
                f"{ours:.1f}",
                f"{ref:.1f}",
                f"{ref / ours:.2f}x",
                f"{gbs:.0f}",
                f"{100 * gbs / copy_bw:.0f}%",
            ]
        )
    return rows


def bench_gpu(args: argparse.Namespace) -> None:
    device = torch.device("cuda")
    copy_bw = copy_bandwidth(device, args.reps)
    scheme = f"w{args.bits} g{args.group_size} {'sym' if args.symmetric else 'asym'}"
    print(f"{torch.cuda.get_device_name(device)}: device-to-device copy {copy_bw:.0f} GB/s")
    print(
        f"Triton kernels ({scheme}, fp16 activations) vs fp16 torch.matmul; median of "
        f"{args.reps} calls, weights rotated past L2\n"
    )
    rows = []
    for name, k, n in GPU_SHAPES:
        rows += gpu_rows(args, name, k, n, copy_bw)
        torch.cuda.empty_cache()
    print_table(["layer", "KxN", "M", "ours us", "fp16 us", "speedup", "GB/s", "% copy"], rows)


def bench_cpu(args: argparse.Namespace) -> None:
    device = torch.device("cpu")
    copy_bw = copy_bandwidth(device, args.reps)
    scheme = f"w{args.bits} g{args.group_size} {'sym' if args.symmetric else 'asym'}"
    print(
        "No CUDA device: these are CPU timings of the torch reference (qfkernels.reference: "
        "unpack, dequantize, fp32 matmul), NOT of the Triton kernels, on smaller shapes."
    )
    print(
        f"CPU copy bandwidth {copy_bw:.1f} GB/s; {scheme}, fp32 activations vs a dense fp32 "
        f"matmul; median of {args.cpu_reps} calls, {torch.get_num_threads()} threads\n"
    )
    rows = []
    for name, k, n in CPU_SHAPES:
        w = random_packed(n, k, args.bits, args.group_size, args.symmetric, device)
        dense_t = (torch.randn(n, k) * 0.02).t()
        for m in CPU_MS:
            x = torch.randn(m, k)
            ours = cpu_median_us(lambda i, x=x, w=w: reference_linear(x, w), args.cpu_reps)
            ref = cpu_median_us(lambda i, x=x, d=dense_t: torch.matmul(x, d), args.cpu_reps)
            moved = w.nbytes() + 4 * m * (k + n)
            gbs = moved / ours / 1e3
            rows.append(
                [
                    name,
                    f"{k}x{n}",
                    str(m),
                    f"{ours:.0f}",
                    f"{ref:.0f}",
                    f"{ref / ours:.2f}x",
                    f"{gbs:.2f}",
                    f"{100 * gbs / copy_bw:.1f}%",
                ]
            )
    print_table(["layer", "KxN", "M", "ref us", "fp32 us", "speedup", "GB/s", "% copy"], rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=128, help="-1 for per-channel")
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--reps", type=int, default=50, help="timed calls per point on a GPU")
    p.add_argument("--cpu-reps", type=int, default=5, help="timed calls per point on a CPU")
    p.add_argument("--cpu", action="store_true", help="CPU mode even when a GPU is present")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if torch.cuda.is_available() and not args.cpu:
        bench_gpu(args)
    else:
        bench_cpu(args)


if __name__ == "__main__":
    main()
