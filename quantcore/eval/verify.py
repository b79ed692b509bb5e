"""Verification of an artifact against its base model, in lockstep: for each held-out window
the base model (from the snapshot) and the quantized model (every quantized Linear a
QuantLinear over the artifact's packed bytes) see the same tokens; perplexity of both, KL
divergence and top-1 agreement come from the same forward passes. Then a decode benchmark
of the quantized model and its size on disk."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from quantcore.errors import CancelledError
from quantcore.eval.agreement import window_stats
from quantcore.eval.decode_bench import decode_benchmark
from quantcore.eval.perplexity import num_windows, window_nll


@dataclass(frozen=True)
class Verification:
    ppl_base: float
    ppl_quant: float
    ppl_change_pct: float
    kl: float  # mean KL(base || quant) per token, nats
    top1: float  # fraction of positions whose argmax agrees
    eval_tokens: int
    eval_windows: int
    seq_len: int
    ms_per_token_b1: float | None
    tokens_per_s_b8: float | None
    size_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Lockstep:
    ppl_base: float
    ppl_quant: float
    kl: float
    top1: float
    tokens: int
    windows: int


@torch.no_grad()
def lockstep(
    base: nn.Module,
    quant: nn.Module,
    tokens: torch.Tensor,
    seq_len: int,
    max_windows: int | None,
    device: str | torch.device,
    on_window: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Lockstep:
    """Both models over the same windows; stops between windows when `should_cancel()`."""
    n = num_windows(tokens, seq_len, max_windows)
    nll_b = nll_q = kl = 0.0
    agree = positions = 0
    for i in range(n):
        window = tokens[:, i * seq_len : (i + 1) * seq_len].to(device)
        a = base(input_ids=window, use_cache=False).logits[0]
        b = quant(input_ids=window, use_cache=False).logits[0]
        nll_b += window_nll(a, window[0])
        nll_q += window_nll(b, window[0])
        k, g, c = window_stats(a, b)
        kl, agree, positions = kl + k, agree + g, positions + c
        if on_window is not None:
            on_window(i + 1, n)
        if should_cancel is not None and i + 1 < n and should_cancel():
            raise CancelledError(f"cancelled during verification (window {i + 1} of {n})")
    predicted = n * (seq_len - 1)
    return Lockstep(
        math.exp(nll_b / predicted),
        math.exp(nll_q / predicted),
        kl / positions,
        agree / positions,
        predicted,
        n,
    )


def weights_bytes(artifact_dir: Path) -> int:
    """Bytes of the artifact's weight files (what a server loads)."""
    return sum(f.stat().st_size for f in artifact_dir.glob("*.safetensors"))


def verify(
    snapshot: Path,
    artifact_dir: Path,
    eval_tokens: torch.Tensor,
    seq_len: int,
    max_windows: int | None,
    device: str | torch.device,
    on_window: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    decode_tokens: int = 32,
) -> Verification:
    """Measure the artifact against the base model in `snapshot` (see the module doc).
    `decode_tokens=0` skips the decode benchmark."""
    from transformers import AutoModelForCausalLM

    from quantcore.artifact import load_quantized

    quant = load_quantized(artifact_dir).to(device)
    base = AutoModelForCausalLM.from_pretrained(snapshot, dtype="auto").eval().to(device)
    m = lockstep(base, quant, eval_tokens, seq_len, max_windows, device, on_window, should_cancel)
    del base
    ms_b1 = tps_b8 = None
    if decode_tokens:
        speed = decode_benchmark(quant, eval_tokens, device, new_tokens=decode_tokens)
        ms_b1, tps_b8 = speed.ms_per_token_b1, speed.tokens_per_s_b8
    return Verification(
        ppl_base=m.ppl_base,
        ppl_quant=m.ppl_quant,
        ppl_change_pct=100.0 * (m.ppl_quant / m.ppl_base - 1.0),
        kl=m.kl,
        top1=m.top1,
        eval_tokens=m.tokens,
        eval_windows=m.windows,
        seq_len=seq_len,
        ms_per_token_b1=ms_b1,
        tokens_per_s_b8=tps_b8,
        size_bytes=weights_bytes(artifact_dir),
    )
