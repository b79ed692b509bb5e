"""Perplexity by the GPTQ paper's protocol: non-overlapping windows of `seq_len` tokens over
text tokenized once, mean token negative log-likelihood, exp."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int


def num_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None) -> int:
    """How many non-overlapping windows of `seq_len` the protocol evaluates."""
    n = tokens.shape[1] // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"{tokens.shape[1]} evaluation tokens do not fill one window of {seq_len}")
    return n


def window_nll(logits: torch.Tensor, window: torch.Tensor) -> float:
    """Summed NLL of a window [T] under its logits [T, V]: every token but the first is
    predicted from the ones before it."""
    return float(nn.functional.cross_entropy(logits[:-1].float(), window[1:], reduction="sum"))


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seq_len: int,
    max_windows: int | None = None,
    device: str | torch.device = "cpu",
    on_window: Callable[[int, int], None] | None = None,
) -> Perplexity:
    """Perplexity of `model` on `tokens` ([1, T]); `on_window(i, n)` after each window."""
    n = num_windows(tokens, seq_len, max_windows)
    total_nll = 0.0
    count = 0
    for i in range(n):
        window = tokens[:, i * seq_len : (i + 1) * seq_len].to(device)
        logits = model(input_ids=window, use_cache=False).logits
        total_nll += window_nll(logits[0], window[0])
        count += seq_len - 1
        if on_window is not None:
            on_window(i + 1, n)
    mean = total_nll / count
    return Perplexity(math.exp(mean), mean, count, n, seq_len)
