"""Load a causal LM and find its decoder blocks generically."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quantcore.errors import ModelNotFoundError, UnsupportedModelError
from quantcore.models.hub import resolve_snapshot


def load_causal_lm(
    model_id: str, revision: str = "main", dtype: torch.dtype | str = "auto"
) -> tuple[nn.Module, object, Path]:
    """(model on CPU in eval mode, tokenizer, snapshot dir) for a Hub id or local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    snapshot = resolve_snapshot(model_id, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(snapshot)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"{model_id}: no usable tokenizer in {snapshot}: {e}") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=dtype)
    except ValueError as e:
        raise UnsupportedModelError(f"{model_id}: transformers cannot load it: {e}") from e
    model.eval()
    return model, tokenizer, snapshot


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the largest list of identical-class blocks.

    A generic rule instead of a table per architecture: every decoder-only model in
    transformers keeps its blocks in one ModuleList that holds most of the parameters.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        n = sum(p.numel() for p in mod.parameters())
        if best is None or n > best[0]:
            best = (n, name, mod)
    total = sum(p.numel() for p in model.parameters())
    if best is None or best[0] < 0.3 * total:
        raise UnsupportedModelError(
            f"{type(model).__name__}: found no ModuleList of decoder blocks holding most of the "
            "parameters; only decoder-only models with one list of blocks are supported"
        )
    return best[1], best[2]


def linear_modules(block: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers of one block, in registration (= execution) order."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
