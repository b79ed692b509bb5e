"""How closely a quantized model follows its base model on held-out text: mean token
KL(base || quant) and top-1 agreement, window by window (GPTQ-paper windows)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Agreement:
    kl: float  # mean over tokens, nats
    top1: float  # fraction of tokens whose argmax agrees
    tokens: int


def window_stats(base_logits: torch.Tensor, quant_logits: torch.Tensor) -> tuple[float, int, int]:
    """(sum of token KL, agreeing tokens, tokens) for logits [T, V]."""
    lp = torch.log_softmax(base_logits.float(), dim=-1)
    lq = torch.log_softmax(quant_logits.float(), dim=-1)
    kl = (lp.exp() * (lp - lq)).sum(dim=-1)
    agree = (base_logits.argmax(-1) == quant_logits.argmax(-1)).sum()
    return float(kl.sum()), int(agree), base_logits.shape[0]


@torch.no_grad()
def agreement(
    base: nn.Module,
    quant: nn.Module,
    tokens: torch.Tensor,
    seq_len: int,
    max_windows: int | None = None,
    device: str | torch.device = "cpu",
) -> Agreement:
    n = tokens.shape[1] // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    kl_sum, agree, count = 0.0, 0, 0
    for i in range(n):
        window = tokens[:, i * seq_len : (i + 1) * seq_len].to(device)
        a = base(input_ids=window, use_cache=False).logits[0]
        b = quant(input_ids=window, use_cache=False).logits[0]
        k, g, c = window_stats(a, b)
        kl_sum, agree, count = kl_sum + k, agree + g, count + c
    return Agreement(kl_sum / count, agree / count, count)
