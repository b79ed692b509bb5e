"""Decode speed of a causal LM: greedy steps with a KV cache after a prefill, timed apart
from the prefill (ms per token at batch 1, tokens per second at batch 8)."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DecodeSpeed:
    ms_per_token_b1: float
    tokens_per_s_b8: float
    new_tokens: int
    prompt_len: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_argument(model: nn.Module) -> str:
    """The name under which `model.forward` takes the KV cache: `cache` from transformers
    5.25 on (its `past_key_values` is deprecated, to be removed in 5.40), else the old one."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def decode_seconds(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds for `new_tokens` greedy decode steps after prefilling `prompt` [B, P]."""
    arg = _cache_argument(model)
    out = model(input_ids=prompt, use_cache=True)
    past, nxt = _cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(prompt.device)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, use_cache=True, **{arg: past})
        past, nxt = _cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(prompt.device)
    return time.perf_counter() - t0


def decode_benchmark(
    model: nn.Module,
    tokens: torch.Tensor,
    device: str | torch.device,
    new_tokens: int = 32,
    prompt_len: int = 32,
) -> DecodeSpeed:
    """Prompts are the first windows of `tokens` ([1, T]); one short warm-up per batch size
    first (Triton compiles its kernels on first use)."""
    device = torch.device(device)
    need = 8 * prompt_len
    if tokens.shape[1] < need:
        raise ValueError(f"decode benchmark needs {need} prompt tokens, got {tokens.shape[1]}")
    prompts = tokens[0, :need].reshape(8, prompt_len).to(device)
    for b in (1, 8):
        decode_seconds(model, prompts[:b], 2)
    t1 = decode_seconds(model, prompts[:1], new_tokens)
    t8 = decode_seconds(model, prompts, new_tokens)
    return DecodeSpeed(1000 * t1 / new_tokens, 8 * new_tokens / t8, new_tokens, prompt_len)
